"""What the sections of an analysis share: :class:`Finding`, number formatting and coercion,
the loss every section reads (its finite part and its smoothing) and the pair of runs the findings
compare.

**Loss used.** The training ``loss`` run metric up to, not including, its first non-finite
value (the *finite part*; all of it when the run never diverged). With ``n`` finite steps,
the *smoothed* loss is a trailing (backward-looking) rolling mean over ``w`` steps,
``w = max(1, round(0.02 n))``: the smoothed loss at a step averages that step and the
``w − 1`` before it, never a later one; the first ``w − 1`` steps average the steps that exist.

**Findings** compare two runs where the trace holds a BN pair (runs whose config
``variant`` or name is ``bn`` and ``nobn``), or else exactly two runs. Layer names appear
in backticks; text is not escaped for HTML or Markdown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..store import Trace

SMOOTH_FRACTION = 0.02     #: smoothing window, as a fraction of a run's steps


@dataclass
class Finding:
    """One sentence computed from the numbers, with what it is about."""
    section: str
    text: str
    run: str | None = None
    layer: str | None = None
    step: int | None = None
    value: float | None = None
    runs: tuple[str, ...] = ()  # the runs a comparison names, e.g. a sweep's (bn run, nobn run)


def num(x: float) -> str:
    return f"{x:.3g}"


def pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def step(x: Any) -> int | None:
    return None if x is None or pd.isna(x) else int(x)


def name(x: Any) -> str | None:
    """A text cell as str, or None where pandas holds a missing value."""
    return None if x is None or (not isinstance(x, str) and pd.isna(x)) else str(x)


def finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def series(frame: pd.DataFrame, run: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of one run metric, sorted, one value per step (the last logged)."""
    rows = frame[(frame["run"] == run) & (frame["metric"] == metric)]
    rows = rows.drop_duplicates("step", keep="last").sort_values("step")
    return rows["step"].to_numpy(dtype=np.int64), rows["value"].to_numpy(dtype=float)


def finite_part(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bad = np.flatnonzero(~np.isfinite(values))
    end = bad[0] if bad.size else len(values)
    return steps[:end], values[:end]


def window(n: int) -> int:
    """The smoothing window of a run with ``n`` finite steps: ``max(1, round(SMOOTH_FRACTION n))``."""
    return max(1, int(round(SMOOTH_FRACTION * n)))


def smooth(values: np.ndarray) -> np.ndarray:
    """Trailing rolling mean over :func:`window` steps (min_periods=1): it never looks ahead.

    >>> smooth(np.arange(100.0))[:4]  # window 2
    array([0. , 0.5, 1.5, 2.5])
    """
    w = window(len(values))
    return pd.Series(values, dtype=float).rolling(w, min_periods=1).mean().to_numpy()


def first_step(steps: np.ndarray, mask: np.ndarray) -> float:
    hit = np.flatnonzero(mask)
    return float(steps[hit[0]]) if hit.size else math.nan


def seed_pairs(trace: Trace) -> pd.DataFrame:
    """The trace's BN pairs, one row per seed: ``seed, bn, nobn`` (run names).

    Runs outside a sweep whose config ``variant`` is bn or nobn, grouped by config ``seed``
    (runs without one form one group), first run of each variant per seed; seeds with both
    variants, in seed order. Without such runs: the runs named bn and nobn, else the two
    runs of a two-run trace (the first on the bn side).
    """
    found: dict[Any, dict[str, str]] = {}
    for run in trace.runs:
        config = trace.config(run)
        variant = config.get("variant")
        if variant in ("bn", "nobn") and not config.get("sweep"):
            found.setdefault(config.get("seed"), {}).setdefault(variant, run)
    rows = [(seed, g["bn"], g["nobn"]) for seed, g in found.items() if len(g) == 2]
    if not rows:
        runs = trace.runs
        if {"bn", "nobn"} <= set(runs):
            rows = [(None, "bn", "nobn")]
        elif len(runs) == 2:
            rows = [(None, runs[0], runs[1])]
    rows.sort(key=lambda r: (r[0] is None, r[0] if isinstance(r[0], (int, float)) else 0))
    return pd.DataFrame(rows, columns=["seed", "bn", "nobn"])


def row(frame: pd.DataFrame, run: str) -> pd.Series | None:
    rows = frame[frame["run"] == run] if "run" in frame else frame.iloc[0:0]
    return None if rows.empty else rows.iloc[0]


def all_finite(*values: object) -> bool:
    """Whether every value is a finite number (numpy scalars included; None is not)."""
    try:
        return all(math.isfinite(float(v)) for v in values)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
