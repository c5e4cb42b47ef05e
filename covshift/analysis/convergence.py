"""Convergence of each run: how fast and how far its loss falls, as a table and findings.

**Convergence** (one row per run, on the finite part of the loss and its backward-looking
smoothing, :func:`covshift.analysis.common.smooth`).
``initial_loss`` = the first finite loss; ``final_loss`` = the smoothed loss at the last finite
step. ``steps_to_90``, ``steps_to_50``, ``steps_to_10`` = the first recorded step whose
smoothed loss is ≤ F × ``initial_loss`` for F in :data:`LEVELS` (NaN when never reached).
``smoothing_window`` = the window of the smoothing. ``loss_auc`` = ∫ L dt / (t_last − t_first),
by the trapezoid rule over the recorded steps: the time-averaged raw loss (the loss itself for
a single step).

:func:`pair_steps` compares two runs at the deepest level both reach.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from . import common
from .common import Finding

LEVELS = (0.9, 0.5, 0.1)   #: fractions of the initial loss whose first crossing is reported
COLUMNS = ["run", "initial_loss", "final_loss", *(f"steps_to_{round(100 * f)}" for f in LEVELS),
           "smoothing_window", "loss_auc"]


def column(level: float) -> str:
    """The table column of a level: ``steps_to_90`` for 0.9."""
    return f"steps_to_{round(100 * level)}"


def table(runs: list[str], losses: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    rows = []
    for run in runs:
        steps, values = losses[run]
        row: dict[str, Any] = {c: math.nan for c in COLUMNS}
        row.update(run=run, smoothing_window=common.window(len(values)))
        if len(values):
            smoothed = common.smooth(values)
            initial = float(values[0])
            row.update(initial_loss=initial, final_loss=float(smoothed[-1]))
            for level in LEVELS:
                row[column(level)] = common.first_step(steps, smoothed <= level * initial)
            span = steps[-1] - steps[0]
            row["loss_auc"] = float(np.trapezoid(values, steps) / span) if span > 0 else float(values.mean())
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def pair_steps(conv: pd.DataFrame, bn: str, nobn: str) -> tuple[float, float, float]:
    """(level, steps of ``bn``, steps of ``nobn``) at the deepest of :data:`LEVELS` both runs
    reach; three NaNs when they share none (or a run is missing)."""
    a, b = common.row(conv, bn), common.row(conv, nobn)
    if a is None or b is None:
        return math.nan, math.nan, math.nan
    for level in sorted(LEVELS):  # deepest (smallest fraction) first
        sa, sb = a[column(level)], b[column(level)]
        if common.all_finite(sa, sb):
            return float(level), float(sa), float(sb)
    return math.nan, math.nan, math.nan


def findings(conv: pd.DataFrame, pair: tuple[str, str] | None) -> list[Finding]:
    out = []
    for _, r in conv.iterrows():
        if not common.all_finite(r["initial_loss"]):
            continue
        reached = [(level, common.step(r[column(level)])) for level in LEVELS if common.all_finite(r[column(level)])]
        head = (f"The {r['run']} run starts at loss {common.num(r['initial_loss'])} and ends at "
                f"{common.num(r['final_loss'])} (smoothed, window {r['smoothing_window']})")
        if reached:
            where = ", ".join(f"{common.pct(level)} of its initial loss at step {s}" for level, s in reached)
            text = f"{head}; its smoothed loss reaches {where}"
            deepest = min(LEVELS)
            if all(level != deepest for level, _ in reached):
                text += f"; it never reaches {common.pct(deepest)} of its initial loss"
            out.append(Finding("convergence", text + ".", r["run"], None, reached[-1][1], float(reached[-1][1])))
        else:
            out.append(Finding("convergence", f"{head}; it never reaches {common.pct(max(LEVELS))} of its "
                               "initial loss.", r["run"]))
    if pair:
        level, a, b = pair_steps(conv, *pair)
        if common.all_finite(level):
            goal = f"{common.pct(level)} of its initial loss"
            if a == b:
                text = f"The {pair[0]} and {pair[1]} runs reach {goal} at the same step ({int(a)})."
            else:
                fast, slow = (pair[0], pair[1]) if a < b else (pair[1], pair[0])
                text = (f"The {fast} run reaches {goal} {int(abs(b - a))} steps before the {slow} run "
                        f"(step {int(min(a, b))} vs {int(max(a, b))}; the deepest level both reach).")
            out.append(Finding("convergence", text, None, None, None, float(abs(b - a)), runs=pair))
    return out
