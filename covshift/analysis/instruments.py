"""The gradient-based measurements of Santurkar et al. (2018) as the analysis reads them.

They are taken while training by :mod:`covshift.ics` (``covshift trace --ics-every N``) and
stored as layer metrics ``ics_l2``, ``ics_rel``, ``ics_cos`` and run metrics
``loss_variation``, ``grad_predictiveness`` (the max over step sizes),
``grad_predictiveness_min``, ``beta_smoothness``, ``landscape_loss_min`` and
``landscape_loss_max``. A trace without them gives empty frames.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..store import Trace

ICS_LAYER_METRICS = ("ics_l2", "ics_rel", "ics_cos")
#: The run metrics of the loss-landscape measurements.
ICS_RUN_METRICS = ("loss_variation", "grad_predictiveness", "beta_smoothness")
#: The figures of the gradient-based measurements, drawn by :mod:`covshift.report.instrument_figures`.
ICS_FILES = {"ics": "ics.png", "landscape": "landscape.png"}
ICS_LABELS = {"ics_l2": "‖G − G′‖₂", "ics_rel": "‖G − G′‖ / ‖G‖", "ics_cos": "cos(G, G′)", "loss_variation": "loss variation (max − min)",
              "grad_predictiveness": "max ‖∇L(θ) − ∇L(θ − ηg)‖₂", "beta_smoothness": "effective β-smoothness"}
ALL_METRICS = (*ICS_LAYER_METRICS, *ICS_RUN_METRICS, "grad_predictiveness_min", "landscape_loss_min",
               "landscape_loss_max")


def measurements(trace: Trace, metrics: tuple[str, ...] = ALL_METRICS) -> pd.DataFrame:
    """The finite rows of ``metrics`` (``run, step, layer, metric, value``)."""
    frame = trace.scalars(metric=list(metrics))
    return frame[np.isfinite(frame["value"].to_numpy(dtype=float))]
