"""The classic BatchNorm claims, checked against an analysis: each :class:`Claim` is marked
supported, not supported, or not measured in this trace, with the numbers and the figure that
decide it. BN must beat no-BN by a relative margin, :data:`MARGIN`.

One pair of runs decides faster convergence, smoother training, reduced (distributional)
covariate shift and better generalization; a sweep decides the learning-rate and initialization
claims (:mod:`covshift.analysis.sweep_findings`).

The gradient-based internal covariate shift and loss-landscape measurements (Santurkar et al.
2018) decide their rows when a trace has them (:func:`claim_rows`). The measurements themselves
are taken while training by :mod:`covshift.ics` (``covshift trace --ics-every N``) and stored as
layer metrics ``ics_l2``, ``ics_rel``, ``ics_cos`` and run metrics ``loss_variation``,
``grad_predictiveness``, ``beta_smoothness``. :func:`claim_rows` returns nothing when a trace has
none; :mod:`covshift.report.instrument_figures` draws them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..store import Trace
from . import Analysis, common, convergence, stability, sweep_findings, sweep_tables
from .sweep_tables import SweepAnalysis


#: A claim is supported only when BN beats no-BN by this relative margin.
MARGIN = 0.10


@dataclass
class Claim:
    claim: str
    verdict: str  # "supported", "not supported", "not measured in this trace"
    evidence: str
    figure: str


CLAIMS = ("faster convergence", "smoother, stabler training", "higher usable learning rate",
          "lower sensitivity to initialization", "reduced internal covariate shift", "smoother loss landscape",
          "better generalization")
NOT_MEASURED = "not measured in this trace"
#: The claims a sweep decides: claim -> (the sweep option it needs, its figure, its verdict and evidence).
SWEEP_CLAIMS = {
    "higher usable learning rate": ("--lr", sweep_tables.FILES["lr"], sweep_findings.lr_verdict),
    "lower sensitivity to initialization": ("--init-scale", sweep_tables.FILES["init"],
                                            lambda s: sweep_findings.init_verdict(s, MARGIN)),
}


def claims(a: Analysis, pair: tuple[str, str] = ("bn", "nobn"), sweep: SweepAnalysis | None = None,
           measured: dict[str, tuple[str, str, str]] | None = None) -> list[Claim]:
    """The classic BatchNorm claims: the learning-rate and initialization claims from ``sweep``,
    the others from the runs ``pair`` = (bn run, nobn run) of ``a``; ``measured`` (claim ->
    verdict, evidence, figure) overrides rows with the gradient-based measurements."""
    has_pair = set(pair) <= set(a.runs)
    why = "needs a bn and a nobn run (covshift trace records both)"
    found = {c.claim: c for c in _pair_claims(a, *pair)} if has_pair else {}
    if has_pair:
        found["smoother loss landscape"] = Claim("smoother loss landscape", NOT_MEASURED,
                                                 "measured only with covshift trace --ics-every N", "")
    for claim, (option, figure, decide) in SWEEP_CLAIMS.items():
        if sweep is not None:
            found[claim] = Claim(claim, *decide(sweep), figure)
        else:
            found[claim] = Claim(claim, NOT_MEASURED, f"one pair of runs cannot show it: it needs a sweep over "
                                 f"{option}" if has_pair else why, "")
    if has_pair:
        found.update({c: Claim(c, *row) for c, row in (measured or {}).items()})
    return [found.get(c, Claim(c, NOT_MEASURED, why, "")) for c in CLAIMS]


def _pair_claims(a: Analysis, b_run: str, n_run: str) -> list[Claim]:
    """The claims one pair of runs decides."""
    out = []
    level, b, n = convergence.pair_steps(a.convergence, b_run, n_run)
    if common.all_finite(level, b, n):
        verdict = "supported" if b <= (1 - MARGIN) * n else "not supported"
        evidence = f"steps to reach {level:.0%} of the initial training loss: bn {int(b)}, nobn {int(n)}"
    else:
        verdict = "not measured in this trace"
        evidence = "the runs reach no common level of 90/50/10% of their initial loss"
    out.append(Claim("faster convergence", verdict, evidence, "batchnorm_training_loss.png"))

    bs, ns = common.row(a.stability, b_run), common.row(a.stability, n_run)
    if b_run in a.losses and n_run in a.losses:
        bo, no, used = stability.pair_roughness(a.losses[b_run], a.losses[n_run])
    else:
        bo, no, used = float("nan"), float("nan"), 0
    if common.all_finite(bo, no):
        calmer = bo <= (1 - MARGIN) * no
        evidence = (f"roughness (std of the step-to-step change of log loss) over the loss levels both runs cover "
                    f"({used} steps): bn {bo:.3g}, nobn {no:.3g}")
        if bs is not None and ns is not None and common.all_finite(bs["val_spikes"], ns["val_spikes"]):
            calmer = calmer and bs["val_spikes"] <= ns["val_spikes"]
            evidence += f"; validation-loss spikes: bn {int(bs['val_spikes'])}, nobn {int(ns['val_spikes'])}"
        out.append(Claim("smoother, stabler training", "supported" if calmer else "not supported", evidence,
                         "batchnorm_training_loss.png"))
    else:
        out.append(Claim("smoother, stabler training", "not measured in this trace",
                         f"fewer than {stability.MIN_STEPS} steps of a run lie in the range of loss levels both "
                         "runs cover", "batchnorm_training_loss.png"))

    layers = a.shift_summary[a.shift_summary["layer"] != ""]  # "" rows are the per-run means
    shared = layers[layers["layer"].isin(set(layers.loc[layers["run"] == b_run, "layer"])
                                         & set(layers.loc[layers["run"] == n_run, "layer"]))]
    means = shared.groupby("run")["mean_w2_prev"].mean() if not shared.empty else pd.Series(dtype=float)
    means = means.rename({b_run: "bn", n_run: "nobn"})
    if common.all_finite(means.get("bn"), means.get("nobn")):
        less = means["bn"] <= (1 - MARGIN) * means["nobn"]
        out.append(Claim("reduced internal covariate shift", "supported" if less else "not supported",
                         f"mean drift between detail steps (W2 / std) over the {shared['layer'].nunique()} layers "
                         f"both runs share: bn {means['bn']:.3g}, nobn {means['nobn']:.3g} (distributional "
                         "shift, as Ioffe & Szegedy 2015 describe it)", "covariate_shift.png"))
    else:
        out.append(Claim("reduced internal covariate shift", "not measured in this trace",
                         "no per-unit statistics at two or more detail steps in both runs", "covariate_shift.png"))

    bg, ng = common.row(a.generalization, b_run), common.row(a.generalization, n_run)
    if common.all_finite(bg["val_accuracy"], ng["val_accuracy"]):
        better = bg["val_accuracy"] >= ng["val_accuracy"] + 0.01
        evidence = f"final validation accuracy: bn {bg['val_accuracy']:.1%}, nobn {ng['val_accuracy']:.1%}"
    elif common.all_finite(bg["val_loss"], ng["val_loss"]):
        better = bg["val_loss"] <= (1 - MARGIN) * ng["val_loss"]
        evidence = f"final validation loss: bn {bg['val_loss']:.4g}, nobn {ng['val_loss']:.4g}"
    else:
        better, evidence = None, "no validation metrics in the trace"
    verdict = "not measured in this trace" if better is None else ("supported" if better else "not supported")
    out.append(Claim("better generalization", verdict, evidence, "batchnorm_training_loss.png"))
    return out


#: The run metrics of the loss-landscape measurements (Santurkar et al. 2018).
ICS_RUN_METRICS = ("loss_variation", "grad_predictiveness", "beta_smoothness")
#: The figures of the gradient-based measurements, drawn by :mod:`covshift.report.instrument_figures`.
ICS_FILES = {"ics": "ics.png", "landscape": "landscape.png"}
ICS_LABELS = {"ics_l2": "‖G − G′‖₂", "ics_cos": "cos(G, G′)", "loss_variation": "loss variation (max − min)",
              "grad_predictiveness": "max ‖∇L(θ) − ∇L(θ − ηg)‖₂", "beta_smoothness": "effective β-smoothness"}


def measurements(trace: Trace, metrics: tuple[str, ...]) -> pd.DataFrame:
    frame = trace.scalars(metric=list(metrics))
    return frame[np.isfinite(frame["value"].to_numpy(dtype=float))]


def _median(frame: pd.DataFrame, run: str, metric: str, layers: set[str] | None = None) -> float:
    rows = frame[(frame["run"] == run) & (frame["metric"] == metric)]
    if layers is not None:
        rows = rows[rows["layer"].isin(layers)]
    return float(rows["value"].median()) if not rows.empty else float("nan")


def claim_rows(trace: Trace, bn: str, nobn: str, margin: float) -> dict[str, tuple[str, str, str]]:
    """Claim -> (verdict, evidence, figure) for "reduced internal covariate shift" (when ICS
    was measured in both runs) and "smoother loss landscape" (when the landscape was)."""
    out: dict[str, tuple[str, str, str]] = {}
    layers = measurements(trace, ("ics_rel",))
    shared = set(layers.loc[layers["run"] == bn, "layer"]) & set(layers.loc[layers["run"] == nobn, "layer"])
    if shared:
        b, n = _median(layers, bn, "ics_rel", shared), _median(layers, nobn, "ics_rel", shared)
        less = b <= (1 - margin) * n
        evidence = (f"median ‖G − G′‖ / ‖G‖ over the {len(shared)} layers both runs share and the measured steps: "
                    f"bn {b:.3g}, nobn {n:.3g} (gradient-based ICS, Santurkar et al. 2018)")
        if not less:
            evidence += "; BatchNorm did not reduce it here, as Santurkar et al. also found"
        out["reduced internal covariate shift"] = ("supported" if less else "not supported", evidence, ICS_FILES["ics"])
    runs = measurements(trace, ICS_RUN_METRICS)
    if {bn, nobn} <= set(runs["run"]):
        pairs = {m: (_median(runs, bn, m), _median(runs, nobn, m)) for m in ("beta_smoothness", "grad_predictiveness")}
        smoother = all(b <= (1 - margin) * n for b, n in pairs.values())
        evidence = "; ".join(f"median {ICS_LABELS[m]}: bn {b:.3g}, nobn {n:.3g}" for m, (b, n) in pairs.items())
        out["smoother loss landscape"] = ("supported" if smoother else "not supported", evidence,
                                          ICS_FILES["landscape"])
    return out
