"""Convergence of each run: how fast and how far its loss falls, as a table and findings.

**Convergence** (one row per run).
``final_loss`` = last finite loss; ``min_loss`` = lowest finite loss; ``min_smoothed_loss``
= lowest smoothed loss. ``target_loss`` = max over runs of ``min_smoothed_loss``, the
lowest level every run reaches (a single run: its own minimum). ``steps_to_target`` = first
step whose smoothed loss is ≤ ``target_loss + 1e-12`` (NaN without a finite loss).
``loss_auc`` = ∫ L dt / (t_last − t_first), by the trapezoid rule over the recorded steps:
the time-averaged raw loss (the loss itself for a single step).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from . import common
from .common import Finding

TARGET_TOLERANCE = 1e-12   #: slack when comparing the smoothed loss with the target


def table(runs: list[str], losses: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    rows = []
    for run in runs:
        steps, values = losses[run]
        row: dict[str, Any] = {"run": run, "final_loss": math.nan, "min_loss": math.nan,
                               "min_smoothed_loss": math.nan, "smoothing_window": common.window(len(values)),
                               "loss_auc": math.nan}
        if len(values):
            row.update(final_loss=values[-1], min_loss=values.min(), min_smoothed_loss=common.smooth(values).min())
            span = steps[-1] - steps[0]
            row["loss_auc"] = float(np.trapezoid(values, steps) / span) if span > 0 else float(values.mean())
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["run", "final_loss", "min_loss", "min_smoothed_loss",
                                        "smoothing_window", "loss_auc"])
    mins = common.finite(frame["min_smoothed_loss"].to_numpy(dtype=float))
    target = float(mins.max()) if mins.size else math.nan
    frame["target_loss"] = target
    reach = []
    for run in runs:
        steps, values = losses[run]
        reach.append(common.first_step(steps, common.smooth(values) <= target + TARGET_TOLERANCE) if len(values)
                     else math.nan)
    frame["steps_to_target"] = reach
    return frame[["run", "final_loss", "min_loss", "target_loss", "steps_to_target", "loss_auc",
                  "min_smoothed_loss", "smoothing_window"]]


def findings(conv: pd.DataFrame, pair: tuple[str, str] | None) -> list[Finding]:
    ok = conv[conv["steps_to_target"].notna()]
    if ok.empty:
        return []
    out = []
    target = float(ok["target_loss"].iloc[0])
    if len(ok) == 1:
        r = ok.iloc[0]
        step = common.step(r["steps_to_target"])
        out.append(Finding("convergence", f"The {r['run']} run's smoothed loss (window {r['smoothing_window']}) "
                           f"reaches its minimum {common.num(target)} at step {step}; its final loss is "
                           f"{common.num(r['final_loss'])}.", r["run"], None, step, target))
        return out
    setter = ok.loc[ok["min_smoothed_loss"].idxmax(), "run"]
    out.append(Finding("convergence", f"Target loss {common.num(target)}: the lowest smoothed loss every run reaches "
                       f"(the minimum of the {setter} run).", setter, None, None, target))
    for _, r in ok.iterrows():
        step = common.step(r["steps_to_target"])
        out.append(Finding("convergence", f"The {r['run']} run reaches the target loss at step {step}; its lowest "
                           f"smoothed loss is {common.num(r['min_smoothed_loss'])} and its final loss "
                           f"{common.num(r['final_loss'])}.", r["run"], None, step, float(step)))
    if pair and set(pair) <= set(ok["run"]):
        a, b = (ok.set_index("run").loc[p, "steps_to_target"] for p in pair)
        if a == b:
            text = f"The {pair[0]} and {pair[1]} runs reach the target loss at the same step ({int(a)})."
        else:
            fast, slow = (pair[0], pair[1]) if a < b else (pair[1], pair[0])
            text = (f"The {fast} run reaches the target loss {int(abs(b - a))} steps before the {slow} run "
                    f"(step {int(min(a, b))} vs {int(max(a, b))}).")
        out.append(Finding("convergence", text, None, None, None, float(abs(b - a))))
    return out
