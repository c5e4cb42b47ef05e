"""The tables of a sweep: one row per sweep run, and per variant over the learning rates and
over the init scales, with the quantities its verdicts read (see :mod:`covshift.analysis.sweep`).

**Per run** (:func:`sweep_runs`; the loss is the training ``loss`` up to its first non-finite
value, as in :mod:`covshift.analysis.common`, with ``n`` finite steps).

- ``diverged``: the config's ``diverged_at`` is set, or the trace holds a non-finite loss
  (then ``diverged_at`` is its step).
- ``initial_loss``: the first finite loss.
- ``final_loss``: mean loss over the last ``max(1, ⌈0.1 n⌉)`` steps; NaN for a diverged run.
- ``best_val_accuracy``: the highest logged ``val_accuracy``; NaN when none was logged.
- ``M`` (:attr:`SweepAnalysis.initial_loss`): the median ``initial_loss`` of the runs that
  did not diverge (of every run when all diverged). A run **trains** when it did not
  diverge and its ``final_loss ≤ 0.9 M``: it got at least 10% below where runs start (a run
  that stays on its plateau does not count).
- ``threshold = 0.5 M``. ``steps_to_threshold``: the first step whose smoothed loss (the
  trailing rolling mean of :mod:`covshift.analysis.common`, window ``max(1, round(0.02 n))``)
  is ≤ ``threshold``; NaN when it never is. A diverged run counts its finite part.
- ``mean_saturation``: mean of every finite ``saturation`` value of the run (all layers, all
  recorded steps). ``median_grad_ratio``: median over steps of the ``grad_rms`` of the first
  Linear/Conv layer over that of the last (the gradient-flow ratio of
  :mod:`covshift.analysis.gradient_flow`; < 0.1 vanishing, > 10 exploding).

**The grid.** The *reference init scale* is 1 when the sweep has it, else the scale with the
smallest |ln s|. The *reference learning rate* is the lr whose ln is closest to the median of
the ln of the sweep's distinct lrs. Ties go to the smaller value.
:attr:`SweepAnalysis.lr` holds, per variant and lr at the reference init scale, and
:attr:`SweepAnalysis.init`, per variant and init scale at the reference lr: ``runs``,
``diverged`` (runs that diverged), ``trains`` (runs that train), ``reached`` (non-diverged
runs that reach the threshold), and the mean, min and max (``_min``, ``_max``) over the
non-diverged runs of ``final_loss``, ``best_val_accuracy`` and ``steps_to_threshold``.

**Learning rate.** A variant's *usable lr* is the largest lr at the reference init scale at
which every one of its seeds trains (NaN when there is none); its per-seed usable lr is the
same for one seed. A *grid step* is one position in the sorted lrs at the reference scale.

**Initialization.** At the reference lr, a variant's *init spread* is the max − min over init
scales of the mean final loss over seeds (NaN with fewer than two scales with a non-diverged
run). An init scale *diverges* when any of its seeds diverges. The per-seed spread is the
same computed from one seed's runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..store import Trace
from . import common, gradient_flow
from .common import Finding
from .generalization import TAIL_FRACTION

VARIANTS = ("bn", "nobn")
THRESHOLD_FRACTION = 0.5   #: steps_to_threshold uses this fraction of the median initial loss
TRAINS_FRACTION = 0.9  #: a run trains when its final loss is at most this fraction of it
METRICS = ("final_loss", "best_val_accuracy", "steps_to_threshold")
FILES = {"lr": "lr_sensitivity.png", "init": "init_sensitivity.png", "grid": "sweep_grid.png"}
RUN_COLUMNS = ["run", "variant", "lr", "init_scale", "seed", "steps", "planned_steps", "diverged", "diverged_at",
               "first_nonfinite_layer", "initial_loss", "final_loss", "best_val_accuracy", "steps_to_threshold",
               "trains", "mean_saturation", "median_grad_ratio"]


@dataclass
class SweepAnalysis:
    """The tables and findings of a sweep (see the module docstring for every quantity)."""
    runs: pd.DataFrame
    lr: pd.DataFrame
    init: pd.DataFrame
    findings: list[Finding]
    initial_loss: float = math.nan   #: M, the median initial loss
    threshold: float = math.nan      #: 0.5 M
    init_scale: float = 1.0          #: the reference init scale
    ref_lr: float = math.nan         #: the reference learning rate
    summary: pd.DataFrame | None = None  #: per variant: usable_lr, init_spread, diverging_scales, ...
    by_seed: pd.DataFrame | None = None  #: per variant and seed: usable_lr, init_spread


# ------------------------------------------------------------------------------ per run

def median_initial(runs: pd.DataFrame) -> float:
    ok = runs.loc[~runs["diverged"].astype(bool), "initial_loss"].dropna()
    values = ok if len(ok) else runs["initial_loss"].dropna()
    return float(values.median()) if len(values) else math.nan


def sweep_runs(trace: Trace) -> pd.DataFrame:
    """One row per sweep run (columns ``RUN_COLUMNS``); empty when the trace has none."""
    configs = {run: trace.config(run) for run in trace.runs}
    names = [run for run, c in configs.items() if c.get("sweep") is True]
    if not names:
        return pd.DataFrame(columns=RUN_COLUMNS)
    frame = trace.scalars(run=names, layer="", metric=["loss", "val_accuracy"])
    layer_frame = trace.scalars(run=names, metric=["saturation", gradient_flow.METRIC])
    layer_frame = layer_frame[layer_frame["layer"] != ""]
    info = trace.layer_info()
    flow = gradient_flow.table(layer_frame, info[info["run"].isin(names)])
    ratios = flow.groupby("run")["ratio"].median()
    finite = np.isfinite(layer_frame["value"].to_numpy(dtype=float))
    saturation = layer_frame[(layer_frame["metric"] == "saturation") & finite].groupby("run")["value"].mean()
    rows, curves = [], {}
    for run in names:
        c = configs[run]
        raw_steps, raw = common.series(frame, run, "loss")
        steps, values = common.finite_part(raw_steps, raw)
        curves[run] = (steps, values)
        at = c.get("diverged_at")
        if at is None and len(values) < len(raw):
            at = int(raw_steps[len(values)])
        tail = max(1, math.ceil(TAIL_FRACTION * len(values)))
        _, acc = common.series(frame, run, "val_accuracy")
        acc = acc[np.isfinite(acc)]
        rows.append({
            "run": run, "variant": c.get("variant"), "lr": float(c.get("lr", math.nan)),
            "init_scale": float(c.get("init_scale", 1.0)), "seed": int(c.get("seed", 0)),
            "steps": int(c.get("steps", len(raw))),
            "planned_steps": int(c.get("planned_steps", c.get("steps", len(raw)))),
            "diverged": at is not None, "diverged_at": None if at is None else int(at),
            "first_nonfinite_layer": c.get("first_nonfinite_layer"),
            "initial_loss": float(values[0]) if len(values) else math.nan,
            "final_loss": float(values[-tail:].mean()) if len(values) and at is None else math.nan,
            "best_val_accuracy": float(acc.max()) if acc.size else math.nan,
            "mean_saturation": float(saturation.get(run, math.nan)),
            "median_grad_ratio": float(ratios.get(run, math.nan)),
        })
    runs = pd.DataFrame(rows)
    runs["diverged_at"] = runs["diverged_at"].astype("Int64")
    m = median_initial(runs)
    threshold = THRESHOLD_FRACTION * m
    reach = []
    for run in names:
        steps, values = curves[run]
        hit = np.flatnonzero(common.smooth(values) <= threshold) if len(values) else np.array([], dtype=int)
        reach.append(float(steps[hit[0]]) if hit.size else math.nan)
    runs["steps_to_threshold"] = reach
    runs["trains"] = (~runs["diverged"]) & (runs["final_loss"] <= TRAINS_FRACTION * m)
    return runs[RUN_COLUMNS]


# --------------------------------------------------------------------------- the grid

def _closest(values: list[float], target: float) -> float:
    """The value whose ln is closest to ``target`` (a ln); ties go to the smaller value."""
    ordered = sorted(values)
    dist = [abs(math.log(v) - target) for v in ordered]
    best = min(dist)
    return next(v for v, d in zip(ordered, dist) if d <= best + 1e-9)


def reference(values: pd.Series, centre: float | None) -> float:
    """1 (``centre`` None: init scales) when present, else the value closest to the median on a log scale."""
    distinct = sorted(v for v in set(values.tolist()) if v > 0)
    if not distinct:
        return float(values.iloc[0])
    if centre is None:
        return 1.0 if 1.0 in distinct else _closest(distinct, 0.0)
    return _closest(distinct, centre)


def aggregate(runs: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per group: run counts, and mean/min/max over the non-diverged runs of each metric."""
    columns = by + ["runs", "diverged", "trains", "reached"] + [
        f"{m}{s}" for m in METRICS for s in ("", "_min", "_max")]
    rows = []
    for keys, g in runs.groupby(by, sort=True):
        ok = g[~g["diverged"].astype(bool)]
        row: dict[str, Any] = dict(zip(by, keys))
        row.update(runs=len(g), diverged=int(g["diverged"].sum()), trains=int(g["trains"].sum()),
                   reached=int(ok["steps_to_threshold"].notna().sum()))
        for m in METRICS:
            v = ok[m].dropna()
            row.update({m: v.mean(), f"{m}_min": v.min(), f"{m}_max": v.max()} if len(v) else
                       {m: math.nan, f"{m}_min": math.nan, f"{m}_max": math.nan})
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def _usable(rows: pd.DataFrame) -> float:
    """The largest lr at which every run of ``rows`` trains; NaN when there is none."""
    per_lr = rows.groupby("lr")["trains"].all()
    ok = per_lr[per_lr].index
    return float(max(ok)) if len(ok) else math.nan


def _spread(rows: pd.DataFrame) -> float:
    """max − min over init scales of the mean final loss (NaN with fewer than two scales)."""
    means = rows.groupby("init_scale")["final_loss"].mean().dropna()
    return float(means.max() - means.min()) if len(means) >= 2 else math.nan


def summaries(runs: pd.DataFrame, scale: float, lr: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per variant (usable lr, init spread, diverging scales) and per variant and seed."""
    at_scale, at_lr = runs[runs["init_scale"] == scale], runs[runs["lr"] == lr]
    rows, seed_rows = [], []
    for variant in sorted(set(runs["variant"].dropna())):
        mine_s, mine_l = at_scale[at_scale["variant"] == variant], at_lr[at_lr["variant"] == variant]
        mine = [{"variant": variant, "seed": seed, "usable_lr": _usable(mine_s[mine_s["seed"] == seed]),
                 "init_spread": _spread(mine_l[mine_l["seed"] == seed])}
                for seed in sorted(set(mine_s["seed"]) | set(mine_l["seed"]))]
        seed_rows += mine
        spreads = [r["init_spread"] for r in mine if not math.isnan(r["init_spread"])]
        div = mine_l.groupby("init_scale")["diverged"].any()
        rows.append({"variant": variant, "usable_lr": _usable(mine_s), "init_spread": _spread(mine_l),
                     "init_scales": int(mine_l["init_scale"].nunique()),
                     "diverging_scales": [float(s) for s in div[div].index],
                     "seed_spread_min": min(spreads, default=math.nan),
                     "seed_spread_max": max(spreads, default=math.nan)})
    return pd.DataFrame(rows), pd.DataFrame(seed_rows, columns=["variant", "seed", "usable_lr", "init_spread"])


def fmt_g(x: float) -> str:
    return f"{x:g}"


def seeds(sa: SweepAnalysis) -> list[int]:
    return sorted(set(sa.runs["seed"]))


def variants(frame: pd.DataFrame) -> list[str]:
    present = set(frame["variant"].dropna())
    return [v for v in VARIANTS if v in present] + sorted(present - set(VARIANTS))
