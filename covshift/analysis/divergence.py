"""Divergence of each run: whether and where its loss or a layer's output first went
non-finite, as a table and findings.

**Divergence.** ``diverged_at`` and ``first_nonfinite_layer`` from the run's config when
set; otherwise ``diverged_at`` = the first step with a non-finite loss or a layer with
``nonfinite`` > 0, and ``first_nonfinite_layer`` = the earliest layer in forward order with
``nonfinite`` > 0 at the first step any has.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..store import Trace

from . import common
from .common import Finding


def table(trace: Trace, runs: list[str], losses_raw: dict, layer_frame: pd.DataFrame,
          info: pd.DataFrame) -> pd.DataFrame:
    nonfinite = layer_frame[(layer_frame["metric"] == "nonfinite") & (layer_frame["value"] > 0)]
    nonfinite = nonfinite.merge(info[["run", "layer", "position"]], on=["run", "layer"])
    rows = []
    for run in runs:
        config = trace.config(run)
        bad = nonfinite[nonfinite["run"] == run].sort_values(["step", "position"])
        layer_step = float(bad["step"].iloc[0]) if len(bad) else math.nan
        layer = str(bad["layer"].iloc[0]) if len(bad) else None
        steps, values = losses_raw[run]
        loss_step = common.first_step(steps, ~np.isfinite(values))
        derived = np.nanmin([layer_step, loss_step]) if not (math.isnan(layer_step) and math.isnan(loss_step)) \
            else math.nan
        at = config.get("diverged_at")
        name = config.get("first_nonfinite_layer")
        source = "config" if at is not None else "trace" if not math.isnan(derived) else None
        rows.append({"run": run, "diverged_at": float(at) if at is not None else float(derived),
                     "first_nonfinite_layer": str(name) if name is not None else layer, "source": source})
    return pd.DataFrame(rows, columns=["run", "diverged_at", "first_nonfinite_layer", "source"])


def findings(div: pd.DataFrame) -> list[Finding]:
    diverged = div[div["diverged_at"].notna()]
    if diverged.empty:
        if div.empty:
            return []
        return [Finding("divergence", f"No run diverged: none of the {len(div)} runs recorded a non-finite "
                        "loss or layer output." if len(div) > 1 else
                        f"The {div['run'].iloc[0]} run did not diverge: it recorded no non-finite loss or layer "
                        "output.")]
    out = []
    for _, r in div.iterrows():
        if pd.isna(r["diverged_at"]):
            out.append(Finding("divergence", f"The {r['run']} run did not diverge.", r["run"]))
            continue
        step = common.step(r["diverged_at"])
        text = f"The {r['run']} run diverged at step {step}"
        layer = common.name(r["first_nonfinite_layer"])
        if layer is not None:
            text += f"; the first non-finite output is in `{layer}`"
        out.append(Finding("divergence", text + ".", r["run"], layer, step, float(step)))
    return out
