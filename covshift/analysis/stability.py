"""Stability of each run: how rough its loss curve is and how often validation loss
spikes, as a table and findings.

**Stability.** ``roughness`` = the sample standard deviation (ddof 1) of Δ ln L between
consecutive recorded steps of the finite loss: the std of the step-to-step change of log loss.
It is scale-free (multiplying the loss by a constant leaves it unchanged) and does not blow up
on a flat run. NaN with fewer than 3 losses or any loss ≤ 0. :func:`pair_roughness` compares
two runs over the same range of loss levels.

``val_spikes`` = number of evaluations whose ``val_loss`` rose over the previous evaluation
by more than 10% *and* by more than the noise of the two estimates:
``L_i − L_{i−1} > VAL_SPIKE |L_{i−1}|`` and ``L_i − L_{i−1} > SPIKE_SE √(s_i² + s_{i−1}²)``,
where ``s`` is ``val_loss_se``, the standard error of the mean validation loss that
``covshift trace`` records with each evaluation. Where either standard error is missing (a
Tracer in your own loop, or a loss without per-example values) the relative rule alone
decides; ``spike_rule`` says which rule the run's evaluations had ("relative and SE",
"relative", or "mixed"). NaN without ``val_loss``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import common
from .common import Finding

VAL_SPIKE = 0.10           #: a spike is a relative rise of val_loss above this ...
SPIKE_SE = 2.0             #: ... and above this many standard errors of the difference
MIN_STEPS = 20             #: pair_roughness needs this many steps in the shared range per run


def roughness(values: np.ndarray) -> float:
    """Sample std (ddof 1) of Δ ln L over consecutive values; NaN with < 3 values or a loss ≤ 0."""
    values = np.asarray(values, dtype=float)
    if len(values) < 3 or not np.all(values > 0):
        return math.nan
    return float(np.std(np.diff(np.log(values)), ddof=1))


def pair_roughness(losses_bn: tuple[np.ndarray, np.ndarray],
                   losses_nobn: tuple[np.ndarray, np.ndarray]) -> tuple[float, float, int]:
    """(roughness of bn, roughness of nobn, steps used) over the loss levels both runs cover.

    Each argument is a run's (steps, values), finite. The shared range is [max of the two
    runs' lowest smoothed loss, min of their first smoothed loss]; each run's roughness is the
    std of Δ ln L at its steps whose smoothed loss lies in that range (the change from the
    previous recorded step). The third value is the smaller of the two runs' step counts; a
    roughness is NaN when that run has fewer than :data:`MIN_STEPS` steps in the range."""
    curves = [np.asarray(v, dtype=float) for _, v in (losses_bn, losses_nobn)]
    if any(len(v) == 0 for v in curves):
        return math.nan, math.nan, 0
    smoothed = [common.smooth(v) for v in curves]
    low = max(float(s.min()) for s in smoothed)
    high = min(float(s[0]) for s in smoothed)
    out, counts = [], []
    for v, s in zip(curves, smoothed):
        inside = (s >= low) & (s <= high)
        inside[0] = False  # a change needs the step before
        counts.append(int(inside.sum()))
        if counts[-1] < MIN_STEPS or not np.all(v > 0):
            out.append(math.nan)
            continue
        change = np.diff(np.log(v))[inside[1:]]
        out.append(float(np.std(change, ddof=1)))
    return out[0], out[1], min(counts)


def spikes(values: np.ndarray, se: np.ndarray | None = None) -> tuple[float, list[int]]:
    """Number of spikes in the validation losses ``values`` and their indices (NaN without
    values). ``se``: the standard error of each value (NaN where unknown): a rise within
    ``SPIKE_SE`` standard errors of the difference is no spike."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return math.nan, []
    se = np.full(len(values), math.nan) if se is None else np.asarray(se, dtype=float)
    prev, cur = values[:-1], values[1:]
    rise = cur - prev
    noise = SPIKE_SE * np.hypot(se[:-1], se[1:])
    ok = np.isfinite(prev) & np.isfinite(cur)
    beyond_noise = ~np.isfinite(noise) | (rise > noise)  # no standard error: the relative rule alone
    hits = np.flatnonzero(ok & (rise > VAL_SPIKE * np.abs(prev)) & beyond_noise) + 1
    return float(len(hits)), hits.tolist()


def _rule(se: np.ndarray) -> str:
    known = np.isfinite(se)
    return "relative and SE" if len(se) and known.all() else "mixed" if known.any() else "relative"


def table(runs: list[str], losses: dict, run_frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run in runs:
        val_steps, val = common.series(run_frame, run, "val_loss")
        se_steps, se_values = common.series(run_frame, run, "val_loss_se")
        se = pd.Series(se_values, index=se_steps).reindex(val_steps).to_numpy(dtype=float)
        count, hits = spikes(val, se)
        rows.append({"run": run, "roughness": roughness(losses[run][1]), "val_spikes": count,
                     "val_evaluations": len(val), "spike_steps": [int(val_steps[i]) for i in hits],
                     "spike_rule": _rule(se)})
    return pd.DataFrame(rows, columns=["run", "roughness", "val_spikes", "val_evaluations", "spike_steps",
                                       "spike_rule"])


def findings(stab: pd.DataFrame) -> list[Finding]:
    out = []
    for _, r in stab.iterrows():
        rough = r["roughness"]
        if np.isfinite(rough):
            out.append(Finding("stability", f"The {r['run']} run's roughness (std of the step-to-step change of log "
                               f"loss) is {common.num(rough)}.", r["run"], value=float(rough)))
        if r["val_evaluations"] >= 2 and not pd.isna(r["val_spikes"]):
            n, steps = int(r["val_spikes"]), r["spike_steps"]
            rise = f"by more than {VAL_SPIKE:.0%}"
            if r["spike_rule"] != "relative":
                rise += f" and more than {SPIKE_SE:g} standard errors"
            if n:
                where = ", ".join(str(s) for s in steps)
                text = (f"The {r['run']} run's validation loss rose {rise} at {n} of its "
                        f"{r['val_evaluations']} evaluations (step{'s' if n > 1 else ''} {where})")
            else:
                text = (f"The {r['run']} run's validation loss never rose {rise} between "
                        f"consecutive evaluations ({r['val_evaluations']} evaluations)")
            text += {"relative": " (no standard error recorded: the relative rule alone).",
                     "mixed": " (the standard error is missing at some evaluations: there the relative rule "
                              "alone).", "relative and SE": "."}[r["spike_rule"]]
            out.append(Finding("stability", text, r["run"], None, steps[0] if steps else None, float(n)))
    return out
