"""Analysis and figures of a sweep: BN/no-BN pairs trained over learning rate × init scale × seed.

A *sweep run* is a run whose config has ``sweep: True``. Its config places it in the grid:
``variant`` ("bn" or "nobn"), ``lr``, ``init_scale`` and ``seed`` (run names are never
parsed). A trace without sweep runs has no sweep, and :func:`analyze_sweep` returns None.

**Per run** (:func:`sweep_runs`; the loss is the training ``loss`` up to its first non-finite
value, as in :mod:`covshift.analysis`, with ``n`` finite steps).

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
  centred rolling mean of :mod:`covshift.analysis`, window ``max(1, round(0.02 n))`` made
  odd) is ≤ ``threshold``; NaN when it never is. A diverged run counts its finite part.
- ``mean_saturation``: mean of every finite ``saturation`` value of the run (all layers, all
  recorded steps). ``median_grad_ratio``: median over steps of the ``grad_norm`` of the first
  layer over that of the last (the gradient-flow ratio of :mod:`covshift.analysis`; < 1e-2
  vanishing, > 1e2 exploding).

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

**Seeds.** A difference between bn and nobn is called beyond the spread across seeds only
when their min..max ranges over seeds do not overlap. With one seed that spread is unknown.

**Claims** (:func:`lr_verdict`, :func:`init_verdict`; the report's claims table). *Higher
usable learning rate*: supported when bn's usable lr is at least one grid step above nobn's (or
nobn has none) and, with several seeds, bn's per-seed usable lr is above nobn's for every seed;
not measured without both variants at two or more lrs. *Lower sensitivity to initialization*:
supported when bn's init spread ≤ (1 − margin) × nobn's and bn diverges at no more init scales
than nobn (where a spread is undefined: at fewer), and, with several seeds, bn's largest
per-seed spread is below nobn's smallest; not measured without both variants at two or more
init scales.

**Failing settings.** A setting (lr, init scale) where, for some seed, one variant trains and
the other does not. Its finding compares mean saturation and median gradient ratio of those
runs and names a pair (the smallest such seed). Settings at the reference init scale belong
to the ``learning_rate`` section, the others to ``initialization``; at most ``MAX_SETTINGS``
are described.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import colors as mcolors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import PercentFormatter
from matplotlib.transforms import blended_transform_factory

from . import plots
from .analysis import (
    TAIL_FRACTION,
    Finding,
    _finite_part,
    _gradient_flow,
    _num,
    _pct,
    _series,
    _smooth,
    _verdict,
)
from .store import Trace, load

VARIANTS = ("bn", "nobn")
THRESHOLD_FRACTION = 0.5   #: steps_to_threshold uses this fraction of the median initial loss
PAIR_FIGURES = 3  #: failing settings whose pair gets its own saturation and gradient-flow figures
TRAINS_FRACTION = 0.9  #: a run trains when its final loss is at most this fraction of it
MAX_SETTINGS = 8           #: at most this many failing settings get a finding
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

def _median_initial(runs: pd.DataFrame) -> float:
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
    layer_frame = trace.scalars(run=names, metric=["saturation", "grad_norm"])
    layer_frame = layer_frame[layer_frame["layer"] != ""]
    info = trace.layer_info()
    flow = _gradient_flow(layer_frame, info[info["run"].isin(names)])
    ratios = flow.groupby("run")["ratio"].median()
    finite = np.isfinite(layer_frame["value"].to_numpy(dtype=float))
    saturation = layer_frame[(layer_frame["metric"] == "saturation") & finite].groupby("run")["value"].mean()
    rows, curves = [], {}
    for run in names:
        c = configs[run]
        raw_steps, raw = _series(frame, run, "loss")
        steps, values = _finite_part(raw_steps, raw)
        curves[run] = (steps, values)
        at = c.get("diverged_at")
        if at is None and len(values) < len(raw):
            at = int(raw_steps[len(values)])
        tail = max(1, math.ceil(TAIL_FRACTION * len(values)))
        _, acc = _series(frame, run, "val_accuracy")
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
    m = _median_initial(runs)
    threshold = THRESHOLD_FRACTION * m
    reach = []
    for run in names:
        steps, values = curves[run]
        hit = np.flatnonzero(_smooth(values) <= threshold) if len(values) else np.array([], dtype=int)
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


def _reference(values: pd.Series, centre: float | None) -> float:
    """1 (``centre`` None: init scales) when present, else the value closest to the median on a log scale."""
    distinct = sorted(v for v in set(values.tolist()) if v > 0)
    if not distinct:
        return float(values.iloc[0])
    if centre is None:
        return 1.0 if 1.0 in distinct else _closest(distinct, 0.0)
    return _closest(distinct, centre)


def _aggregate(runs: pd.DataFrame, by: list[str]) -> pd.DataFrame:
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


def _summaries(runs: pd.DataFrame, scale: float, lr: float) -> tuple[pd.DataFrame, pd.DataFrame]:
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


# ------------------------------------------------------------------------------ verdicts

def _g(x: float) -> str:
    return f"{x:g}"


def _grid_steps(sa: SweepAnalysis, a: float, b: float) -> int:
    grid = sorted(set(sa.runs.loc[sa.runs["init_scale"] == sa.init_scale, "lr"]))
    return grid.index(a) - grid.index(b)


def _seeds(sa: SweepAnalysis) -> list[int]:
    return sorted(set(sa.runs["seed"]))


def _get(sa: SweepAnalysis, variant: str) -> pd.Series | None:
    s = sa.summary
    rows = s[s["variant"] == variant] if s is not None and len(s) else pd.DataFrame()
    return None if rows.empty else rows.iloc[0]


def _per_seed(sa: SweepAnalysis, column: str) -> dict[int, tuple[float, float]]:
    """Seed -> (bn value, nobn value) of a by_seed column, for seeds both variants have."""
    t = sa.by_seed if sa.by_seed is not None else pd.DataFrame(columns=["variant", "seed", column])
    both = t[t["variant"] == "bn"].merge(t[t["variant"] == "nobn"], on="seed", suffixes=("_bn", "_nobn"))
    return {int(s): (float(x), float(y)) for s, x, y in zip(both["seed"], both[f"{column}_bn"], both[f"{column}_nobn"])}


def _above(x: float, y: float) -> bool:
    """Whether a usable lr ``x`` is higher than ``y`` (NaN: none, lower than any)."""
    return not math.isnan(x) and (math.isnan(y) or x > y)


def lr_verdict(sa: SweepAnalysis) -> tuple[str, str]:
    """Verdict and evidence for "higher usable learning rate" (see the module docstring)."""
    bn, nobn = _get(sa, "bn"), _get(sa, "nobn")
    grid = sorted(set(sa.runs.loc[sa.runs["init_scale"] == sa.init_scale, "lr"]))
    if bn is None or nobn is None or len(grid) < 2:
        return "not measured in this trace", (f"the sweep needs bn and nobn runs at two or more learning rates "
                                              f"(init scale {_g(sa.init_scale)})")
    b, n = bn["usable_lr"], nobn["usable_lr"]
    where = f"largest learning rate at which every seed trains (init scale {_g(sa.init_scale)})"
    if math.isnan(b):
        return "not supported", f"{where}: bn none, nobn " + ("none" if math.isnan(n) else _g(n))
    if math.isnan(n):
        higher, evidence = True, f"{where}: bn {_g(b)}, nobn none of {', '.join(map(_g, grid))}"
    else:
        steps = _grid_steps(sa, b, n)
        higher = steps >= 1
        evidence = (f"{where}: bn {_g(b)}, nobn {_g(n)} (ratio {_num(b / n)}, {steps} grid "
                    f"step{'' if steps == 1 else 's'})")
    per_seed = _per_seed(sa, "usable_lr")
    if len(_seeds(sa)) > 1:
        fails = [s for s, (x, y) in per_seed.items() if not _above(x, y)]
        if fails:
            higher = False
            evidence += "; not higher for seed " + ", ".join(
                f"{s} (bn {_g(per_seed[s][0])}, nobn {_g(per_seed[s][1])})" for s in fails)
        else:
            evidence += f"; higher for each of the {len(per_seed)} seeds"
    return ("supported" if higher else "not supported"), evidence


def init_verdict(sa: SweepAnalysis, margin: float) -> tuple[str, str]:
    """Verdict and evidence for "lower sensitivity to initialization"."""
    bn, nobn = _get(sa, "bn"), _get(sa, "nobn")
    if bn is None or nobn is None or min(bn["init_scales"], nobn["init_scales"]) < 2:
        return "not measured in this trace", (f"the sweep needs bn and nobn runs at two or more init scales "
                                              f"(lr {_g(sa.ref_lr)})")
    bs, ns = bn["init_spread"], nobn["init_spread"]
    bd, nd = len(bn["diverging_scales"]), len(nobn["diverging_scales"])
    evidence = (f"spread of the mean final loss across init scales at lr {_g(sa.ref_lr)}: bn {_num(bs)}, "
                f"nobn {_num(ns)}; init scales that diverge: bn {bd}, nobn {nd}")
    if _finite(bs, ns):
        lower = bs <= (1 - margin) * ns and bd <= nd
    else:
        lower = bd < nd
        evidence += " (a spread needs two init scales without divergence)"
    if len(_seeds(sa)) > 1 and _finite(bs, ns):
        ranges = [(bn["seed_spread_min"], bn["seed_spread_max"]), (nobn["seed_spread_min"], nobn["seed_spread_max"])]
        apart = _finite(*ranges[0], *ranges[1]) and ranges[0][1] < ranges[1][0]
        evidence += (f"; per-seed spreads bn {_span(*ranges[0])}, nobn {_span(*ranges[1])} "
                     + ("do not overlap" if apart else "overlap"))
        lower = lower and apart
    return ("supported" if lower else "not supported"), evidence


def _finite(*values: float) -> bool:
    return all(isinstance(v, (int, float, np.floating)) and math.isfinite(v) for v in values)


def _span(lo: float, hi: float) -> str:
    return f"{_num(lo)}..{_num(hi)}"


def _seeds_word(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


# ------------------------------------------------------------------------------ findings

def _stat(row: pd.Series, metric: str, fmt: Any, several: bool) -> str:
    """``mean`` of a table row's metric, with its min..max over seeds when there are several."""
    text = fmt(row[metric])
    lo, hi = row[f"{metric}_min"], row[f"{metric}_max"]
    return text + (f" ({fmt(lo)}..{fmt(hi)})" if several and _finite(lo, hi) and lo != hi else "")


def _describe(row: pd.Series, threshold: float) -> str:
    """What one variant does at one setting, over its seeds."""
    n, d = int(row["runs"]), int(row["diverged"])
    if d == n:
        return "diverges" + ("" if n == 1 else " in both seeds" if n == 2 else f" in all {n} seeds")
    several = n - d > 1
    parts = [f"final loss {_stat(row, 'final_loss', _num, several)}"]
    if _finite(row["best_val_accuracy"]):
        parts.append(f"best validation accuracy {_stat(row, 'best_val_accuracy', _pct, several)}")
    if row["reached"]:
        step = _stat(row, "steps_to_threshold", lambda x: f"{x:.0f}", several)
        parts.append(f"loss ≤ {_num(threshold)} at step {step}"
                     + (f" ({int(row['reached'])} of {n - d} runs)" if row["reached"] < n - d else ""))
    else:
        parts.append(f"never reaches loss {_num(threshold)}")
    if d:
        parts.append(f"diverges in {d} of {n} seeds")
    return ", ".join(parts)


def _overlap(rows: dict[str, pd.Series], metric: str) -> str:
    """Whether bn's and nobn's min..max ranges of ``metric`` over seeds overlap, in words."""
    (blo, bhi), (nlo, nhi) = ((rows[v][f"{metric}_min"], rows[v][f"{metric}_max"]) for v in VARIANTS)
    if not _finite(blo, bhi, nlo, nhi):
        return ""
    lower = "bn" if rows["bn"][metric] < rows["nobn"][metric] else "nobn"
    if bhi < nlo or nhi < blo:
        return (f"; {lower}'s final loss is lower and the ranges over seeds do not overlap: beyond the spread "
                "across seeds")
    return "; the final-loss ranges over seeds overlap: the difference is within the spread across seeds"


def _lr_findings(sa: SweepAnalysis) -> list[Finding]:
    runs, seeds = sa.runs, _seeds(sa)
    lrs, scales = sorted(set(runs["lr"])), sorted(set(runs["init_scale"]))
    variants = sorted(set(runs["variant"].dropna()))
    out = [Finding("learning_rate", (
        f"The sweep has {len(runs)} runs: {' and '.join(variants)} at learning rates {', '.join(map(_g, lrs))}, "
        f"init scales {', '.join(map(_g, scales))} and seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))}; {int(runs['diverged'].sum())} diverged. A run trains when it does not "
        f"diverge and its final loss (mean of its last {TAIL_FRACTION:.0%} of steps) is at most "
        f"{_num(TRAINS_FRACTION * sa.initial_loss)} ({TRAINS_FRACTION:g} times {_num(sa.initial_loss)}, "
        f"the median initial loss of the runs that did not diverge); steps to threshold count the steps until "
        f"the smoothed loss is at most {THRESHOLD_FRACTION:g} times that, {_num(sa.threshold)}."),
        value=sa.initial_loss)]
    if len(seeds) > 1:
        out.append(Finding("learning_rate", f"With {len(seeds)} seeds per setting, a difference between bn and nobn "
                           "is called beyond the spread across seeds only when their min..max ranges over the seeds "
                           "do not overlap.", value=float(len(seeds))))
    else:
        out.append(Finding("learning_rate", f"With one seed ({seeds[0]}) per setting the spread across seeds is "
                           "unknown: each difference between bn and nobn below is a single measurement.",
                           value=1.0))
    table = sa.lr
    grid = sorted(set(table["lr"]))
    for variant in variants:
        mine = table[table["variant"] == variant].set_index("lr")
        usable = float(_get(sa, variant)["usable_lr"])  # type: ignore[index]
        fails = [f"{_g(lr)} ({_failure(r)})" for lr, r in mine.iterrows() if r["trains"] < r["runs"]]
        if math.isnan(usable):
            text = (f"At init scale {_g(sa.init_scale)}, {variant} trains with every seed at none of the learning "
                    f"rates {', '.join(map(_g, grid))}")
        else:
            text = (f"At init scale {_g(sa.init_scale)}, {variant} trains with every seed up to learning rate "
                    f"{_g(usable)}")
            if usable == grid[-1]:
                text += " (the largest of the sweep, so its limit may lie higher)"
        text += ("; it fails at " + ", ".join(fails)) if fails else ""
        out.append(Finding("learning_rate", text + ".", value=usable))
    out += _lr_comparison(sa)
    for lr in grid:
        at = table[table["lr"] == lr]
        rows = {r["variant"]: r for _, r in at.iterrows()}
        text = f"At learning rate {_g(lr)} (init scale {_g(sa.init_scale)}): " + "; ".join(
            f"{v} {_describe(r, sa.threshold)}" for v, r in rows.items())
        if len(seeds) > 1 and set(VARIANTS) <= set(rows):
            text += _overlap(rows, "final_loss")
        out.append(Finding("learning_rate", text + ".", value=float(lr)))
    return out


def _failure(row: pd.Series) -> str:
    """How a variant fails at a setting: 'diverges in 2 of 2 seeds', 'does not train in 1 of 2 seeds'."""
    n, d = int(row["runs"]), int(row["diverged"])
    flat = n - d - int(row["trains"])
    parts = [f"diverges in {d} of {_seeds_word(n)}"] if d else []
    parts += [f"does not train in {flat} of {_seeds_word(n)}"] if flat else []
    return " and ".join(parts)


def _lr_comparison(sa: SweepAnalysis) -> list[Finding]:
    bn, nobn = _get(sa, "bn"), _get(sa, "nobn")
    if bn is None or nobn is None:
        return []
    b, n = float(bn["usable_lr"]), float(nobn["usable_lr"])
    if math.isnan(b) and math.isnan(n):
        text = "Neither bn nor nobn trains with every seed at any learning rate of the sweep."
    elif math.isnan(n) or math.isnan(b):
        good, bad, lr = ("bn", "nobn", b) if math.isnan(n) else ("nobn", "bn", n)
        text = f"{good} trains with every seed up to learning rate {_g(lr)}; {bad} at none of the sweep's."
    elif b == n:
        text = f"bn and nobn have the same largest trainable learning rate, {_g(b)}."
    else:
        steps = _grid_steps(sa, b, n)
        text = (f"bn's largest trainable learning rate is {_num(b / n)} times nobn's ({_g(b)} vs {_g(n)}; "
                f"{abs(steps)} grid step{'s' if abs(steps) != 1 else ''} {'higher' if steps > 0 else 'lower'}).")
    per_seed = _per_seed(sa, "usable_lr")
    if len(_seeds(sa)) > 1 and per_seed:
        def word(x: float) -> str:
            return "none" if math.isnan(x) else _g(x)
        listed = "; ".join(f"seed {s}: bn {word(x)}, nobn {word(y)}" for s, (x, y) in per_seed.items())
        higher = [s for s, (x, y) in per_seed.items() if _above(x, y)]
        if len(higher) == len(per_seed):
            text += f" Per seed ({listed}) bn's is higher for every seed, so the difference holds across seeds."
        else:
            text += (f" Per seed ({listed}) bn's is higher for {len(higher)} of {len(per_seed)} seeds, so a higher "
                     "usable learning rate for bn is not beyond the spread across seeds.")
    return [Finding("learning_rate", text, value=b / n if _finite(b, n) and n > 0 else None)]


def _init_findings(sa: SweepAnalysis) -> list[Finding]:
    out = []
    table = sa.init
    where = f"At learning rate {_g(sa.ref_lr)} (the closest to the sweep's median learning rate on a log scale)"
    for variant in sorted(set(table["variant"].dropna())):
        mine = table[table["variant"] == variant]
        summary = _get(sa, variant)
        ok = mine[mine["final_loss"].notna()]
        if ok.empty:
            text = f"{where}, {variant} diverges at every init scale."
        elif len(ok) == 1:
            text = (f"{where}, {variant} has a final loss at one init scale only: {_num(ok['final_loss'].iloc[0])} "
                    f"(init scale {_g(ok['init_scale'].iloc[0])}).")
        else:
            lo, hi = ok.loc[ok["final_loss"].idxmin()], ok.loc[ok["final_loss"].idxmax()]
            spread = float(hi["final_loss"] - lo["final_loss"])
            text = (f"{where}, {variant}'s mean final loss over seeds ranges across {len(ok)} init scales from "
                    f"{_num(lo['final_loss'])} (init scale {_g(lo['init_scale'])}) to {_num(hi['final_loss'])} "
                    f"(init scale {_g(hi['init_scale'])}): a spread of {_num(spread)}")
            div = mine[mine["diverged"] > 0]
            text += ("; it diverges at init scale " + ", ".join(
                f"{_g(r['init_scale'])} (in {int(r['diverged'])} of {int(r['runs'])} seeds)" for _, r in div.iterrows())
                     if len(div) else "; it diverges at no init scale") + "."
        out.append(Finding("initialization", text, value=float(summary["init_spread"])))  # type: ignore[index]
    bn, nobn = _get(sa, "bn"), _get(sa, "nobn")
    if bn is None or nobn is None:
        return out
    bs, ns = float(bn["init_spread"]), float(nobn["init_spread"])
    bd, nd = len(bn["diverging_scales"]), len(nobn["diverging_scales"])
    if _finite(bs, ns):
        ratio = f"{_num(bs / ns)} times nobn's" if ns > 0 else "compared with nobn's"
        text = f"bn's spread of final loss across init scales is {ratio} ({_num(bs)} vs {_num(ns)})"
    else:
        text = "A spread of final loss needs two init scales without divergence, which " + " and ".join(
            v for v, x in (("bn", bs), ("nobn", ns)) if not _finite(x)) + " lacks"
    text += f"; bn diverges at {bd} init scale{'s' if bd != 1 else ''}, nobn at {nd}."
    if len(_seeds(sa)) > 1 and _finite(bs, ns):
        brange, nrange = ((s["seed_spread_min"], s["seed_spread_max"]) for s in (bn, nobn))
        if _finite(*brange, *nrange):
            apart = brange[1] < nrange[0] or nrange[1] < brange[0]
            text += (f" Per seed the spreads are bn {_span(*brange)} and nobn {_span(*nrange)}: the ranges "
                     + ("do not overlap, so the difference is beyond the spread across seeds." if apart else
                        "overlap, so the difference is within the spread across seeds."))
    out.append(Finding("initialization", text, value=bs - ns if _finite(bs, ns) else None))
    return out


def pair_folder(run_bn: str) -> str:
    """Where a sweep report draws the figures of one of its pairs, from the bn run's name:
    ``"bn lr=3 init=1 seed=0"`` -> ``"pairs/lr=3_init=1_seed=0"``."""
    return "pairs/" + run_bn.split(" ", 1)[-1].replace(" ", "_")


def _failing(sa: SweepAnalysis) -> list[Finding]:
    r = sa.runs
    if not set(VARIANTS) <= set(r["variant"]):
        return []
    key = ["lr", "init_scale", "seed"]
    pairs = r[r["variant"] == "bn"].merge(r[r["variant"] == "nobn"], on=key, suffixes=("_bn", "_nobn"))
    odd = pairs[pairs["trains_bn"] != pairs["trains_nobn"]]
    settings = sorted(set(zip(odd["lr"], odd["init_scale"])))
    if not settings:
        return [Finding("learning_rate", f"At all {len(set(zip(pairs['lr'], pairs['init_scale'])))} settings of the "
                        "sweep bn and nobn either both train or both fail, seed by seed.")]
    out = []
    for lr, scale in settings[:MAX_SETTINGS]:
        g = odd[(odd["lr"] == lr) & (odd["init_scale"] == scale)].sort_values("seed")
        total = int(((pairs["lr"] == lr) & (pairs["init_scale"] == scale)).sum())
        bad = "nobn" if (~g["trains_nobn"]).sum() >= (~g["trains_bn"]).sum() else "bn"
        good = "bn" if bad == "nobn" else "nobn"
        fail = g[~g[f"trains_{bad}"]]
        div = fail[fail[f"diverged_{bad}"]]
        parts = []
        if len(div):
            first = div.iloc[0]
            layer = first[f"first_nonfinite_layer_{bad}"]
            parts.append(f"diverges in {len(div)} of {_seeds_word(total)} (seed {first['seed']} at step "
                         f"{int(first[f'diverged_at_{bad}'])}" + (f", first non-finite output in `{layer}`"
                                                                 if isinstance(layer, str) else "") + ")")
        flat = fail[~fail[f"diverged_{bad}"]]
        if len(flat):
            parts.append(f"does not train in {len(flat)} of {_seeds_word(total)} (final loss "
                         f"{', '.join(_num(x) for x in flat[f'final_loss_{bad}'])} > {_num(TRAINS_FRACTION * sa.initial_loss)})")
        text = (f"At learning rate {_g(lr)}, init scale {_g(scale)}, {bad} {' and '.join(parts)} while {good} trains "
                f"(final loss {', '.join(_num(x) for x in fail[f'final_loss_{good}'])}).")
        compare = []
        for label, column, agg, fmt in (
                ("mean saturation", "mean_saturation", "mean", _pct),
                ("median first/last-layer gradient ratio", "median_grad_ratio", "median",
                 lambda x: f"{_num(x)} ({_verdict(x)})")):
            x, y = (float(getattr(fail[f"{column}_{v}"], agg)()) for v in (good, bad))
            if _finite(x, y):
                compare.append(f"{label} {good} {fmt(x)}, {bad} {fmt(y)}")
        if compare:
            joined = "; ".join(compare)
            text += f" {joined[0].upper()}{joined[1:]}."
        first = fail.iloc[0]
        runs = (str(first["run_bn"]), str(first["run_nobn"]))
        text += f" Runs to compare: `{runs[0]}` and `{runs[1]}`"
        if len(out) < PAIR_FIGURES:
            folder = pair_folder(runs[0])
            text += f" ([saturation]({folder}/saturation.png), [gradient flow]({folder}/gradient_flow.png))"
            section = "learning_rate" if scale == sa.init_scale else "initialization"
            out.append(Finding(section, text + ".", run=runs[int(bad == "nobn")], value=float(lr), runs=runs))
            continue
        section = "learning_rate" if scale == sa.init_scale else "initialization"
        out.append(Finding(section, text + ".", run=runs[int(bad == "nobn")], value=float(lr)))
    if len(settings) > MAX_SETTINGS:
        rest = ", ".join(f"lr {_g(lr)}/init {_g(s)}" for lr, s in settings[MAX_SETTINGS:])
        out.append(Finding("learning_rate", f"{len(settings) - MAX_SETTINGS} more settings where one variant trains "
                           f"and the other does not: {rest}."))
    return out


# ------------------------------------------------------------------------------ entry

def analyze_sweep(trace: Trace | str | os.PathLike[str]) -> SweepAnalysis | None:
    """Analyse the sweep runs of a trace (or a path to one); None when it has no sweep."""
    if not isinstance(trace, Trace):
        with load(trace) as opened:
            return analyze_sweep(opened)
    runs = sweep_runs(trace)
    if runs.empty:
        return None
    m = _median_initial(runs)
    scale = _reference(runs["init_scale"], None)
    logs = [math.log(v) for v in set(runs["lr"]) if v > 0]
    ref_lr = _reference(runs["lr"], float(np.median(logs)) if logs else 0.0)
    lr_table = _aggregate(runs[runs["init_scale"] == scale], ["variant", "lr"])
    lr_table.insert(2, "init_scale", scale)
    init_table = _aggregate(runs[runs["lr"] == ref_lr], ["variant", "init_scale"])
    init_table.insert(2, "lr", ref_lr)
    summary, by_seed = _summaries(runs, scale, ref_lr)
    sa = SweepAnalysis(runs, lr_table, init_table, [], m, THRESHOLD_FRACTION * m, scale, ref_lr, summary, by_seed)
    sa.findings = _lr_findings(sa) + _init_findings(sa) + _failing(sa)
    return sa


# ------------------------------------------------------------------------------ figures

def _variants(frame: pd.DataFrame) -> list[str]:
    present = set(frame["variant"].dropna())
    return [v for v in VARIANTS if v in present] + sorted(present - set(VARIANTS))


def _log_ticks(ax: Any, values: list[float]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(values, labels=[_g(v) for v in values])
    ax.minorticks_off()


def _sensitivity(table: pd.DataFrame, x: str, xlabel: str, title: str, threshold: float) -> Figure:
    """Three panels against ``x`` (log scale): final loss, best validation accuracy, steps to threshold."""
    fig, axes = plots.new_figure(1, 3)
    variants = _variants(table)
    colors = plots.run_colors(variants)
    panels = (("final_loss", "final training loss (last 10% of steps)"),
              ("best_val_accuracy", "best validation accuracy"),
              ("steps_to_threshold", f"steps until smoothed loss ≤ {threshold:.3g}"))
    grid = sorted(set(table[x]))
    for ax, (metric, label) in zip(axes[0], panels):
        drawn = False
        mark = blended_transform_factory(ax.transData, ax.transAxes)
        for k, v in enumerate(variants):
            rows = table[table["variant"] == v].sort_values(x)
            xs, ys = rows[x].to_numpy(dtype=float), rows[metric].to_numpy(dtype=float)
            if np.isfinite(ys).any():
                several = int((rows["runs"] - rows["diverged"]).max()) > 1
                err = np.vstack([ys - rows[f"{metric}_min"].to_numpy(dtype=float),
                                 rows[f"{metric}_max"].to_numpy(dtype=float) - ys]) if several else None
                xs = xs * 10 ** (0.012 * (k - (len(variants) - 1) / 2))  # side by side where they coincide
                ax.errorbar(xs, ys, yerr=None if err is None else np.maximum(err, 0), color=colors[v], marker="o",
                            ms=4, lw=1.6, capsize=3)
                drawn = True
            div = rows[rows["diverged"] > 0]
            if len(div):
                ax.plot(div[x], [0.95 - 0.07 * k] * len(div), "x", color=colors[v], ms=8, mew=2,
                        transform=mark, clip_on=False)
        _log_ticks(ax, grid)
        ax.set_xlabel(xlabel)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "no value: every run diverged or none logged it", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="0.35")
        elif metric == "final_loss" and plots.spans_decades(table[metric]):
            ax.set_yscale("log")
        elif metric == "best_val_accuracy":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    handles = [Line2D([], [], color=colors[v], lw=2, marker="o", ms=4) for v in variants]
    labels = list(variants)
    if (table["diverged"] > 0).any():
        handles.append(Line2D([], [], color="0.3", ls="", marker="x", ms=8, mew=2))
        labels.append("diverged (any seed)")
    fig.legend(handles, labels, loc="outside lower center", ncol=max(1, len(handles)), frameon=False, fontsize=9)
    fig.suptitle(title, fontsize=11)
    return fig


def lr_sensitivity(sa: SweepAnalysis) -> Figure:
    """Final loss, best validation accuracy and steps to threshold against the learning rate."""
    seeds = len(_seeds(sa))
    return _sensitivity(sa.lr, "lr", "learning rate", f"Learning-rate sensitivity at init scale {_g(sa.init_scale)}"
                        + (f" (mean and min..max over {seeds} seeds)" if seeds > 1 else ""), sa.threshold)


def init_sensitivity(sa: SweepAnalysis) -> Figure:
    """The same three panels against the init scale, at the reference learning rate."""
    seeds = len(_seeds(sa))
    return _sensitivity(sa.init, "init_scale", "init scale", f"Init-scale sensitivity at learning rate {_g(sa.ref_lr)}"
                        + (f" (mean and min..max over {seeds} seeds)" if seeds > 1 else ""), sa.threshold)


def sweep_grid(sa: SweepAnalysis) -> Figure:
    """Heat map of the mean final loss over learning rate × init scale, one panel per variant."""
    runs = sa.runs
    variants = _variants(runs)
    lrs, scales = sorted(set(runs["lr"])), sorted(set(runs["init_scale"]))
    cells = _aggregate(runs, ["variant", "init_scale", "lr"])
    fig, axes = plots.new_figure(1, max(1, len(variants)), height=max(3.0, 0.45 * len(scales) + 2.0))
    values = cells["final_loss"].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size and plots.spans_decades(finite) and finite.min() > 0:
        norm: mcolors.Normalize = mcolors.LogNorm(finite.min(), finite.max())
    else:
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm = mcolors.Normalize(lo, hi if hi > lo else lo + 1.0)
    cmap = sns.color_palette("rocket_r", as_cmap=True).with_extremes(bad=plots.MASKED)
    for ax, v in zip(axes[0], variants):
        mine = cells[cells["variant"] == v].set_index(["init_scale", "lr"])
        grid = np.full((len(scales), len(lrs)), np.nan)
        for i, s in enumerate(scales):
            for j, lr in enumerate(lrs):
                if (s, lr) not in mine.index:
                    ax.text(j, i, "–", ha="center", va="center", fontsize=8, color="0.3")
                    continue
                c = mine.loc[(s, lr)]
                n, d, mean = int(c["runs"]), int(c["diverged"]), float(c["final_loss"])
                grid[i, j] = mean
                text = "div" if d == n else f"{mean:.3g}" + (f"\ndiv {d}/{n}" if d else "")
                dark = math.isfinite(mean) and sum(cmap(norm(mean))[:3]) < 1.5
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", origin="lower")
        ax.set_xticks(range(len(lrs)), labels=[_g(x) for x in lrs])
        ax.set_yticks(range(len(scales)), labels=[_g(x) for x in scales])
        ax.set_xlabel("learning rate")
        ax.set_ylabel("init scale")
        ax.set_title(f"{plots.literal(v)}: mean final training loss over seeds", fontsize=10,
                     color=plots.run_colors([v])[v])
    fig.colorbar(ScalarMappable(norm, cmap), ax=axes.ravel().tolist(), fraction=0.03, pad=0.01).set_label(
        "final training loss")
    fig.suptitle("The sweep grid (grey \"div\": every seed diverged)", fontsize=11)
    return fig


def save_sweep_figures(sa: SweepAnalysis, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write lr_sensitivity.png, init_sensitivity.png and sweep_grid.png; file name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for key, build in (("lr", lr_sensitivity), ("init", init_sensitivity), ("grid", sweep_grid)):
        path = out / FILES[key]
        fig = build(sa)
        fig.savefig(path, dpi=plots.DPI)
        fig.clear()
        written[FILES[key]] = path
    return written


# ------------------------------------------------------------------------------ report

class RunView(Trace):
    """Some runs of an open trace, under names of your choosing (``names``: shown -> stored).
    Reads go to the underlying trace; closing the view leaves that trace open."""

    def __init__(self, trace: Trace, names: dict[str, str]) -> None:  # no super().__init__: no own file
        self._trace, self.path = trace, trace.path
        self._names = dict(names)
        self._back = {stored: shown for shown, stored in self._names.items()}

    def close(self) -> None:
        pass

    def _stored(self, run: Any) -> list[str]:
        shown = self.runs if run is None else [run] if isinstance(run, str) else list(run)
        return [self._names[r] for r in shown if r in self._names]

    def _shown(self, frame: pd.DataFrame) -> pd.DataFrame:
        return frame.assign(run=frame["run"].map(self._back))

    @property
    def runs(self) -> list[str]:
        return list(self._names)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(self.layer_info()["layer"]))

    def layer_info(self) -> pd.DataFrame:
        info = self._trace.layer_info()
        return self._shown(info[info["run"].isin(self._back)]).reset_index(drop=True)

    def config(self, run: str) -> dict[str, Any]:
        if run not in self._names:
            raise KeyError(f"no run {run!r} in this view; runs: {', '.join(self.runs) or 'none'}")
        return self._trace.config(self._names[run])

    def scalars(self, run: Any = None, layer: Any = None, metric: Any = None) -> pd.DataFrame:
        return self._shown(self._trace.scalars(self._stored(run), layer, metric))

    def units(self, run: Any = None, layer: Any = None) -> pd.DataFrame:
        return self._shown(self._trace.units(self._stored(run), layer))

    def histograms(self, run: Any = None, layer: Any = None) -> pd.DataFrame:
        return self._shown(self._trace.histograms(self._stored(run), layer))


def default_pair(trace: Trace, sa: SweepAnalysis) -> dict[str, str]:
    """The runs a sweep report describes one by one, as {"bn": run, "nobn": run}: the trace's
    own runs named "bn" and "nobn" when it has both, else the sweep runs at the reference init
    scale and learning rate with the smallest seed (both variants' when they share one)."""
    if {"bn", "nobn"} <= set(trace.runs):
        return {"bn": "bn", "nobn": "nobn"}
    r = sa.runs
    here = r[(r["init_scale"] == sa.init_scale) & (r["lr"] == sa.ref_lr)]
    shared = set.intersection(*(set(here.loc[here["variant"] == v, "seed"]) for v in VARIANTS))
    names = {}
    for v in VARIANTS:
        mine = here[here["variant"] == v].sort_values("seed")
        if shared:
            mine = mine[mine["seed"] == min(shared)]
        if len(mine):
            names[v] = str(mine["run"].iloc[0])
    return names or {str(r["run"].iloc[0]): str(r["run"].iloc[0])}


def summary_lines(sa: SweepAnalysis, names: dict[str, str]) -> list[str]:
    """Summary lines: the sweep's grid, and which runs the per-run sections describe."""
    r = sa.runs
    lrs, scales = ", ".join(map(_g, sorted(set(r["lr"])))), ", ".join(map(_g, sorted(set(r["init_scale"]))))
    lines = [(f"Sweep: {len(r)} runs ({', '.join(_variants(r))}) over learning rates {lrs}, init scales {scales} "
              f"and seeds {', '.join(map(str, sorted(set(r['seed']))))}; {int(r['diverged'].sum())} diverged."), ""]
    if all(shown == stored for shown, stored in names.items()):
        lines.append("The per-run sections after the sweep sections describe the runs "
                     + " and ".join(f"`{n}`" for n in names) + ".")
    else:
        lines.append(f"The per-run sections after the sweep sections describe one pair of the sweep (init scale "
                     f"{_g(sa.init_scale)}, learning rate {_g(sa.ref_lr)}, the smallest seed), called "
                     + " and ".join(f"`{shown}` (run `{stored}`)" for shown, stored in names.items()) + " there.")
    return lines


SECTIONS = [("Effect on learning rate", "learning_rate", FILES["lr"]),
            ("Interaction with initialization", "initialization", FILES["init"])]


def markdown_sections(sa: SweepAnalysis, figures: dict[str, Path]) -> list[str]:
    """The report's two sweep sections, as Markdown lines."""
    out: list[str] = []
    for title, section, figure in SECTIONS:
        out += [f"## {title}", ""]
        out += [f"- {f.text}" for f in sa.findings if f.section == section] or ["The sweep says nothing on this."]
        out.append("")
        out += [f"![{name}]({name})" for name in (figure, FILES["grid"] if section == "learning_rate" else "")
                if name in figures]
        out.append("")
    return out
