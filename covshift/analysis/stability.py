"""Stability of each run: how much its loss oscillates and how often validation loss
spikes, as a table and findings.

**Stability.** ``oscillation_index`` = Σ_t |L_{t+1} − L_t| / max(|L_first − L_last|, 1e-12)
on the raw finite loss: the loss's total variation over its net change. 1 means a monotone
curve, k means the loss travels k times the distance it gained; a constant loss counts
as 1, a single step as NaN. ``val_spikes`` = number of evaluations whose ``val_loss`` rose
by more than 10% over the previous evaluation, ``L_i − L_{i−1} > 0.1 |L_{i−1}|`` (NaN without
``val_loss``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import common
from .common import Finding

VAL_SPIKE = 0.10           #: a relative rise of val_loss above this is a spike
NET_CHANGE_FLOOR = 1e-12


def _oscillation(values: np.ndarray) -> float:
    if len(values) < 2:
        return math.nan
    travel = float(np.abs(np.diff(values)).sum())
    if travel == 0:
        return 1.0
    return travel / max(abs(values[0] - values[-1]), NET_CHANGE_FLOOR)


def _spikes(values: np.ndarray) -> tuple[float, list[int]]:
    """Number of spikes and their indices in ``values`` (NaN without two finite neighbours)."""
    if len(values) == 0:
        return math.nan, []
    prev, cur = values[:-1], values[1:]
    ok = np.isfinite(prev) & np.isfinite(cur)
    hits = np.flatnonzero(ok & (cur - prev > VAL_SPIKE * np.abs(prev))) + 1
    return float(len(hits)), hits.tolist()


def table(runs: list[str], losses: dict, run_frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run in runs:
        val_steps, val = common.series(run_frame, run, "val_loss")
        count, hits = _spikes(val)
        rows.append({"run": run, "oscillation_index": _oscillation(losses[run][1]), "val_spikes": count,
                     "val_evaluations": len(val), "spike_steps": [int(val_steps[i]) for i in hits]})
    return pd.DataFrame(rows, columns=["run", "oscillation_index", "val_spikes", "val_evaluations", "spike_steps"])


def findings(stab: pd.DataFrame) -> list[Finding]:
    out = []
    for _, r in stab.iterrows():
        idx = r["oscillation_index"]
        if np.isfinite(idx):
            out.append(Finding("stability", f"The {r['run']} run's loss oscillation index is {common.num(idx)}: its "
                               f"loss travels {common.num(idx)} times its net change (1 = monotone).", r["run"],
                               value=float(idx)))
        if r["val_evaluations"] >= 2 and not pd.isna(r["val_spikes"]):
            n, steps = int(r["val_spikes"]), r["spike_steps"]
            if n:
                where = ", ".join(str(s) for s in steps)
                text = (f"The {r['run']} run's validation loss rose by more than 10% at {n} of its "
                        f"{r['val_evaluations']} evaluations (step{'s' if n > 1 else ''} {where}).")
            else:
                text = (f"The {r['run']} run's validation loss never rose by more than 10% between "
                        f"consecutive evaluations ({r['val_evaluations']} evaluations).")
            out.append(Finding("stability", text, r["run"], None, steps[0] if steps else None, float(n)))
    return out
