"""The tables of a sweep: one row per sweep run, and per variant over the learning rates and
over the init scales, with the quantities its verdicts read (see :mod:`covshift.analysis.sweep`).

**Per run** (:func:`sweep_runs`; the loss is the training ``loss`` up to its first non-finite
value, as in :mod:`covshift.analysis.common`, with ``n`` finite steps).

- ``diverged``: the config's ``diverged_at`` is set, or the trace holds a non-finite loss
  (then ``diverged_at`` is its step).
- ``initial_loss``: the first finite loss.
- ``final_loss``: mean loss over the last ``max(1, ⌈0.1 n⌉)`` steps; NaN for a diverged run.
- ``final_accuracy``: the last logged ``val_accuracy``; NaN when none was logged.
- ``loss_removed``: 1 − (smoothed loss at the last finite step) / ``initial_loss``, the
  quantity of :mod:`covshift.analysis.outcomes`.
- ``outcome`` (``trains`` = it is ``"trained"``): :func:`covshift.analysis.outcomes.classify`,
  with the config's ``chance_accuracy``. Its comparison group is every non-diverged run of
  the same seed and init scale, both variants and every learning rate: the best of them
  shows what the task allows at that initialization, so a variant that fails at every
  learning rate is not judged against its own failures.
- ``within_tolerance``: the run trained and its *final metric* is within tolerance of the
  best trained run of the same variant, seed and init scale. The final metric is
  ``final_accuracy`` when the sweep logged validation accuracy (within: at most
  ``ACCURACY_TOLERANCE`` below the best), else ``final_loss`` (within: at most
  ``LOSS_TOLERANCE`` × the best above it).
- ``M`` (:attr:`SweepAnalysis.initial_loss`): the median ``initial_loss`` of the runs that
  did not diverge (of every run when all diverged). ``threshold = 0.5 M``, the convergence
  level. ``steps_to_threshold``: the first step whose smoothed loss is ≤ ``threshold``; NaN
  when it never is ("never reached"). A diverged run counts its finite part.
- ``mean_saturation``: mean of every finite ``saturation`` value of the run (all layers, all
  recorded steps). ``median_grad_ratio``: median over steps of the ``grad_rms`` of the first
  Linear/Conv layer over that of the last (the gradient-flow ratio of
  :mod:`covshift.analysis.gradient_flow`; < 0.1 vanishing, > 10 exploding).

**The grid.** The *reference init scale* is 1 when the sweep has it, else the scale with the
smallest |ln s|. The *reference learning rate* is the lr whose ln is closest to the median of
the ln of the sweep's distinct lrs. Ties go to the smaller value.
:attr:`SweepAnalysis.lr` holds, per variant and lr at the reference init scale, and
:attr:`SweepAnalysis.init`, per variant and init scale at the reference lr: ``runs``,
``diverged`` (runs that diverged), ``trains`` (runs that trained), ``within`` (runs within
tolerance), ``reached`` (non-diverged runs that reach the threshold), and the mean, min and
max (``_min``, ``_max``) over the non-diverged runs of ``final_loss``, ``final_accuracy``
and ``steps_to_threshold``.

**Usable learning rate** (:attr:`SweepAnalysis.by_seed`, per variant and seed, at the
reference init scale): the largest lr whose run is ``within_tolerance`` (NaN when the
variant trained at no lr), with the ``best`` final metric it is judged against and the
``limit`` it had to reach (best − ``ACCURACY_TOLERANCE``, or best × (1 + ``LOSS_TOLERANCE``)).
A run that trains but ends far below the variant's best (64.9% against 95.8%) is not usable.
:attr:`SweepAnalysis.summary` gives per variant the smallest (``usable_lr``) and largest
(``usable_lr_max``) of its per-seed usable lrs. A *grid step* is one position in the sorted
lrs at the reference scale.

**Initialization** (:attr:`SweepAnalysis.init_by_seed`, per seed, at the reference lr):
``scales`` (init scales of the seed), ``bn_trained`` and ``nobn_trained`` (scales at which
each variant trained), ``both`` (scales at which both did), and ``bn_spread`` /
``nobn_spread``: max − min of the final metric over the scales at which both trained (NaN
with fewer than two such scales).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..store import Trace
from . import common, gradient_flow, outcomes
from .common import Finding
from .generalization import TAIL_FRACTION

VARIANTS = ("bn", "nobn")
THRESHOLD_FRACTION = 0.5   #: steps_to_threshold uses this fraction of the median initial loss
ACCURACY_TOLERANCE = 0.02  #: usable: final accuracy at most this far (absolute) below the variant's best
LOSS_TOLERANCE = 0.10      #: without accuracy, usable: final loss at most this fraction above the variant's best
METRICS = ("final_loss", "final_accuracy", "steps_to_threshold")
FILES = {"lr": "lr_sensitivity.png", "init": "init_sensitivity.png", "grid": "sweep_grid.png"}
RUN_COLUMNS = ["run", "variant", "lr", "init_scale", "seed", "steps", "planned_steps", "diverged", "diverged_at",
               "first_nonfinite_layer", "initial_loss", "final_loss", "loss_removed", "chance", "final_accuracy",
               "steps_to_threshold", "outcome", "trains", "within_tolerance", "mean_saturation", "median_grad_ratio"]
SEED_COLUMNS = ["variant", "seed", "lrs", "trained", "best", "limit", "usable_lr"]
INIT_COLUMNS = ["seed", "scales", "bn_trained", "nobn_trained", "both", "bn_spread", "nobn_spread"]


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
    summary: pd.DataFrame | None = None       #: per variant: usable_lr (smallest over seeds), usable_lr_max
    by_seed: pd.DataFrame | None = None       #: per variant and seed: the usable lr (SEED_COLUMNS)
    init_by_seed: pd.DataFrame | None = None  #: per seed: init scales trained and spreads (INIT_COLUMNS)
    metric: str = "final_accuracy"            #: the final metric: "final_accuracy" or "final_loss"


def metric_of(runs: pd.DataFrame) -> str:
    """The sweep's final metric: ``final_accuracy`` when a trained run logged one, else ``final_loss``."""
    return "final_accuracy" if runs.loc[runs["trains"], "final_accuracy"].notna().any() else "final_loss"


def within(values: pd.Series, best: pd.Series | float, metric: str) -> pd.Series:
    """Whether each final-metric value is within tolerance of ``best`` (False where either is NaN)."""
    return values >= limit(best, metric) if metric == "final_accuracy" else values <= limit(best, metric)


def limit(best: Any, metric: str) -> Any:
    """The value a run must reach to be within tolerance of ``best``."""
    return best - ACCURACY_TOLERANCE if metric == "final_accuracy" else best * (1 + LOSS_TOLERANCE)


def best_of(values: Any, metric: str) -> Any:
    """The best final metric: the highest accuracy or the lowest loss."""
    return values.max() if metric == "final_accuracy" else values.min()


# ------------------------------------------------------------------------------ per run

def median_initial(runs: pd.DataFrame) -> float:
    ok = runs.loc[~runs["diverged"].astype(bool), "initial_loss"].dropna()
    values = ok if len(ok) else runs["initial_loss"].dropna()
    return float(values.median()) if len(values) else math.nan


def _classify(runs: pd.DataFrame) -> pd.Series:
    """Each run's outcome, its group being the non-diverged runs of its seed and init scale."""
    ok = runs[~runs["diverged"]].groupby(["seed", "init_scale"], observed=True)
    best = pd.DataFrame({"best_removed": ok["loss_removed"].max(), "best_accuracy": ok["final_accuracy"].max()})
    r = runs.join(best, on=["seed", "init_scale"])
    return pd.Series([outcomes.classify(bool(x.diverged), x.loss_removed, x.final_accuracy, x.chance,
                                        x.best_removed, x.best_accuracy) for x in r.itertuples()], index=runs.index)


def _within_tolerance(runs: pd.DataFrame) -> pd.Series:
    """Trained, and within tolerance of the best trained run of its variant, seed and init scale."""
    metric = metric_of(runs)
    key = ["variant", "seed", "init_scale"]
    best = best_of(runs[runs["trains"]].groupby(key, observed=True)[metric], metric).rename("best")
    return runs["trains"] & within(runs[metric], runs.join(best, on=key)["best"], metric)


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
    ratios = flow.groupby("run", observed=True)["ratio"].median()
    finite = np.isfinite(layer_frame["value"].to_numpy(dtype=float))
    saturation = layer_frame[(layer_frame["metric"] == "saturation") & finite].groupby("run", observed=True)["value"].mean()
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
        initial = float(values[0]) if len(values) else math.nan
        rows.append({
            "run": run, "variant": c.get("variant"), "lr": float(c.get("lr", math.nan)),
            "init_scale": float(c.get("init_scale", 1.0)), "seed": int(c.get("seed", 0)),
            "steps": int(c.get("steps", len(raw))),
            "planned_steps": int(c.get("planned_steps", c.get("steps", len(raw)))),
            "diverged": at is not None, "diverged_at": None if at is None else int(at),
            "first_nonfinite_layer": c.get("first_nonfinite_layer"),
            "initial_loss": initial,
            "final_loss": float(values[-tail:].mean()) if len(values) and at is None else math.nan,
            "loss_removed": 1 - float(common.smooth(values)[-1]) / initial if len(values) and initial else math.nan,
            "chance": float(c.get("chance_accuracy") or math.nan),
            "final_accuracy": float(acc[-1]) if acc.size else math.nan,
            "mean_saturation": float(saturation.get(run, math.nan)),
            "median_grad_ratio": float(ratios.get(run, math.nan)),
        })
    runs = pd.DataFrame(rows)
    runs["diverged_at"] = runs["diverged_at"].astype("Int64")
    threshold = THRESHOLD_FRACTION * median_initial(runs)
    reach = []
    for run in names:
        steps, values = curves[run]
        hit = np.flatnonzero(common.smooth(values) <= threshold) if len(values) else np.array([], dtype=int)
        reach.append(float(steps[hit[0]]) if hit.size else math.nan)
    runs["steps_to_threshold"] = reach
    runs["outcome"] = _classify(runs)
    runs["trains"] = runs["outcome"] == "trained"
    runs["within_tolerance"] = _within_tolerance(runs)
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
    columns = by + ["runs", "diverged", "trains", "within", "reached"] + [
        f"{m}{s}" for m in METRICS for s in ("", "_min", "_max")]
    rows = []
    for keys, g in runs.groupby(by, sort=True, observed=True):
        ok = g[~g["diverged"].astype(bool)]
        row: dict[str, Any] = dict(zip(by, keys))
        row.update(runs=len(g), diverged=int(g["diverged"].sum()), trains=int(g["trains"].sum()),
                   within=int(g["within_tolerance"].sum()), reached=int(ok["steps_to_threshold"].notna().sum()))
        for m in METRICS:
            v = ok[m].dropna()
            row.update({m: v.mean(), f"{m}_min": v.min(), f"{m}_max": v.max()} if len(v) else
                       {m: math.nan, f"{m}_min": math.nan, f"{m}_max": math.nan})
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def usable(runs: pd.DataFrame, scale: float, metric: str) -> pd.DataFrame:
    """Per variant and seed at init scale ``scale``: the usable lr and what decided it (SEED_COLUMNS)."""
    rows = []
    for (variant, seed), g in runs[runs["init_scale"] == scale].groupby(["variant", "seed"], sort=True, observed=True):
        good = g.loc[g["within_tolerance"], "lr"]
        best = best_of(g.loc[g["trains"], metric], metric)
        rows.append({"variant": variant, "seed": int(seed), "lrs": g["lr"].nunique(), "trained": int(g["trains"].sum()),
                     "best": best, "limit": limit(best, metric),
                     "usable_lr": float(good.max()) if len(good) else math.nan})
    return pd.DataFrame(rows, columns=SEED_COLUMNS)


def _spread(values: pd.Series) -> float:
    return float(values.max() - values.min()) if values.notna().sum() >= 2 else math.nan


def init_spreads(runs: pd.DataFrame, lr: float, metric: str) -> pd.DataFrame:
    """Per seed at learning rate ``lr``: the init scales each variant trained at and the spreads (INIT_COLUMNS)."""
    at = runs[runs["lr"] == lr]
    rows = []
    for seed, g in at.groupby("seed", sort=True, observed=True):
        if not set(VARIANTS) <= set(g["variant"]):
            continue
        wide = g.set_index(["init_scale", "variant"])[["trains", metric]].unstack("variant")
        trained = wide["trains"].fillna(False).astype(bool)
        both = trained["bn"] & trained["nobn"]
        rows.append({"seed": int(seed), "scales": len(wide), "bn_trained": int(trained["bn"].sum()),
                     "nobn_trained": int(trained["nobn"].sum()), "both": int(both.sum()),
                     **{f"{v}_spread": _spread(wide[metric][v][both]) for v in VARIANTS}})
    return pd.DataFrame(rows, columns=INIT_COLUMNS)


def summaries(by_seed: pd.DataFrame) -> pd.DataFrame:
    """Per variant: the smallest and largest per-seed usable lr (NaN smallest when a seed has none)."""
    rows = [{"variant": v, "usable_lr": float(g["usable_lr"].min(skipna=False)), "usable_lr_max": g["usable_lr"].max()}
            for v, g in by_seed.groupby("variant", sort=True, observed=True)]
    return pd.DataFrame(rows, columns=["variant", "usable_lr", "usable_lr_max"])


def fmt_g(x: float) -> str:
    return f"{x:g}"


def seeds(sa: SweepAnalysis) -> list[int]:
    return sorted(set(sa.runs["seed"]))


def variants(frame: pd.DataFrame) -> list[str]:
    present = set(frame["variant"].dropna())
    return [v for v in VARIANTS if v in present] + sorted(present - set(VARIANTS))
