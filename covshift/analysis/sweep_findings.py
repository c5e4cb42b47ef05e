"""The findings of a sweep: what each variant does over the grid, how bn and nobn compare in
usable learning rate and sensitivity to initialization, and the settings where one variant
trains and the other does not (the quantities are defined in
:mod:`covshift.analysis.sweep_tables`, the two claims' verdicts in
:mod:`covshift.analysis.sweep_verdicts`).

**Seeds.** A difference of final loss between bn and nobn at one setting is called beyond
the spread across seeds only when their min..max ranges over seeds do not overlap. With one
seed that spread is unknown. Usable learning rates and init spreads are compared seed by seed.

**Failing settings.** A setting (lr, init scale) where, for some seed, one variant trained
and the other did not (run outcomes). Its finding compares mean saturation and median
gradient ratio of those runs and names a pair (the smallest such seed). Settings at the
reference init scale belong to the ``learning_rate`` section, the others to
``initialization``; at most ``MAX_SETTINGS`` are described.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from . import common, gradient_flow, outcomes, sweep_tables
from .common import Finding
from .generalization import TAIL_FRACTION
from .sweep_tables import THRESHOLD_FRACTION, VARIANTS, SweepAnalysis, fmt_g
from .sweep_verdicts import above, grid_steps, lr_word, metric_name, per_seed, spread_word, trained_counts, usable_rule

PAIR_FIGURES = 3  #: failing settings whose pair gets its own saturation and gradient-flow figures
MAX_SETTINGS = 8           #: at most this many failing settings get a finding


def _finite(*values: float) -> bool:
    return all(isinstance(v, (int, float, np.floating)) and math.isfinite(v) for v in values)


def _seeds_word(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


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
    parts = [f"final loss {_stat(row, 'final_loss', common.num, several)}"]
    if _finite(row["final_accuracy"]):
        parts.append(f"final validation accuracy {_stat(row, 'final_accuracy', common.pct, several)}")
    if row["reached"]:
        step = _stat(row, "steps_to_threshold", lambda x: f"{x:.0f}", several)
        parts.append(f"loss ≤ {common.num(threshold)} at step {step}"
                     + (f" ({int(row['reached'])} of {n - d} runs)" if row["reached"] < n - d else ""))
    else:
        parts.append(f"never reaches loss {common.num(threshold)}")
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


def lr_findings(sa: SweepAnalysis) -> list[Finding]:
    runs, seeds = sa.runs, sweep_tables.seeds(sa)
    lrs, scales = sorted(set(runs["lr"])), sorted(set(runs["init_scale"]))
    variants = sorted(set(runs["variant"].dropna()))
    out = [Finding("learning_rate", (
        f"The sweep has {len(runs)} runs: {' and '.join(variants)} at learning rates {', '.join(map(fmt_g, lrs))}, "
        f"init scales {', '.join(map(fmt_g, scales))} and seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))}; {int(runs['trains'].sum())} trained, {int(runs['diverged'].sum())} diverged. "
        f"A run trained when it removed at least {outcomes.TRAINED_REMOVED:.0%} of its initial loss, or between "
        f"{outcomes.MIN_REMOVED:.0%} and that, at least {outcomes.RELATIVE:.0%} of the best improvement among the "
        f"runs of its seed and init scale (the run outcomes). A variant's usable learning rate is {usable_rule(sa)}. "
        f"Steps to threshold count the steps until the smoothed loss is at most {THRESHOLD_FRACTION:g} times "
        f"{common.num(sa.initial_loss)} (the median initial loss of the runs that did not diverge), "
        f"{common.num(sa.threshold)}."), value=sa.initial_loss)]
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
        out.append(_variant_lr(sa, variant, table[table["variant"] == variant].set_index("lr"), grid))
    out += _lr_comparison(sa)
    for lr in grid:
        at = table[table["lr"] == lr]
        rows = {r["variant"]: r for _, r in at.iterrows()}
        text = f"At learning rate {fmt_g(lr)} (init scale {fmt_g(sa.init_scale)}): " + "; ".join(
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


def _variant_lr(sa: SweepAnalysis, variant: str, mine: pd.DataFrame, grid: list[float]) -> Finding:
    """A variant's usable learning rate per seed, where it fails, and where it trains but is not usable."""
    t = sa.by_seed if sa.by_seed is not None else pd.DataFrame(columns=sweep_tables.SEED_COLUMNS)
    rows = t[t["variant"] == variant]
    values = [float(x) for x in rows["usable_lr"]]
    if len(rows) == 1:
        usable = lr_word(values[0])
    else:
        usable = ", ".join(f"{lr_word(x)} (seed {s})" for x, s in zip(values, rows["seed"]))
    text = f"At init scale {fmt_g(sa.init_scale)}, {variant}'s usable learning rate is {usable}"
    if values and max(values, default=math.nan) == grid[-1]:
        text += " (the largest of the sweep, so its limit may lie higher)"
    fails = [f"{fmt_g(lr)} ({_failure(r)})" for lr, r in mine.iterrows() if r["trains"] < r["runs"]]
    text += ("; it fails at " + ", ".join(fails)) if fails else ""
    outside = [(lr, r) for lr, r in mine.iterrows() if r["within"] < r["trains"]]
    if outside:
        text += "; it trains but ends outside the tolerance of its best at " + ", ".join(
            f"{fmt_g(lr)} ({_outside(sa, rows, r)})" for lr, r in outside)
    return Finding("learning_rate", text + ".", value=min(values, default=math.nan))


def _outside(sa: SweepAnalysis, rows: pd.DataFrame, r: pd.Series) -> str:
    """How far a setting's trained runs end from the variant's best: "64.9% against 95.8%"."""
    if len(rows) != 1:
        return f"in {int(r['trains'] - r['within'])} of {_seeds_word(int(r['runs']))}"
    fmt = common.pct if sa.metric == "final_accuracy" else common.num
    return f"{metric_name(sa)} {fmt(r[sa.metric])} against {fmt(rows['best'].iloc[0])}"


def _lr_comparison(sa: SweepAnalysis) -> list[Finding]:
    seeds = per_seed(sa)
    if not seeds:
        return []
    if len(seeds) == 1:
        b, n = next(iter(seeds.values()))
        if math.isnan(b) and math.isnan(n):
            text = "Neither bn nor nobn has a usable learning rate in the sweep: neither trained at any."
        elif math.isnan(n) or math.isnan(b):
            good, bad, lr = ("bn", "nobn", b) if math.isnan(n) else ("nobn", "bn", n)
            text = f"{good}'s usable learning rate is {fmt_g(lr)}; {bad} trained at none of the sweep's."
        elif b == n:
            text = f"bn and nobn have the same usable learning rate, {fmt_g(b)}."
        else:
            steps = grid_steps(sa, b, n)
            text = (f"bn's usable learning rate is {common.num(b / n)} times nobn's ({fmt_g(b)} vs {fmt_g(n)}; "
                    f"{abs(steps)} grid step{'s' if abs(steps) != 1 else ''} {'higher' if steps > 0 else 'lower'}).")
        return [Finding("learning_rate", text, value=b / n if _finite(b, n) and n > 0 else None)]
    listed = "; ".join(f"seed {s}: bn {lr_word(x)}, nobn {lr_word(y)}" for s, (x, y) in seeds.items())
    higher = sum(above(x, y) for x, y in seeds.values())
    text = f"Usable learning rates per seed ({listed}): bn's is higher in {higher} of {len(seeds)} seeds"
    text += (", so the difference holds in every seed." if higher == len(seeds) else
             ", so the seeds disagree." if higher else ".")
    return [Finding("learning_rate", text, value=float(higher))]


def init_findings(sa: SweepAnalysis) -> list[Finding]:
    out = []
    table = sa.init
    where = f"At learning rate {fmt_g(sa.ref_lr)} (the closest to the sweep's median learning rate on a log scale)"
    for variant in sorted(set(table["variant"].dropna())):
        mine = table[table["variant"] == variant]
        ok = mine[mine["final_loss"].notna()]
        if ok.empty:
            text = f"{where}, {variant} diverges at every init scale."
        elif len(ok) == 1:
            text = (f"{where}, {variant} has a final loss at one init scale only: "
                    f"{common.num(ok['final_loss'].iloc[0])} (init scale {fmt_g(ok['init_scale'].iloc[0])}).")
        else:
            lo, hi = ok.loc[ok["final_loss"].idxmin()], ok.loc[ok["final_loss"].idxmax()]
            spread = float(hi["final_loss"] - lo["final_loss"])
            text = (f"{where}, {variant}'s mean final loss over seeds ranges across {len(ok)} init scales from "
                    f"{common.num(lo['final_loss'])} (init scale {fmt_g(lo['init_scale'])}) to "
                    f"{common.num(hi['final_loss'])} (init scale {fmt_g(hi['init_scale'])}): a spread of "
                    f"{common.num(spread)}")
            div = mine[mine["diverged"] > 0]
            text += ("; it diverges at init scale " + ", ".join(
                f"{fmt_g(r['init_scale'])} (in {int(r['diverged'])} of {int(r['runs'])} seeds)"
                for _, r in div.iterrows())
                     if len(div) else "; it diverges at no init scale") + "."
        out.append(Finding("initialization", text, value=float(ok["final_loss"].max() - ok["final_loss"].min())
                           if len(ok) else None))
    t = sa.init_by_seed
    if t is None or t.empty or t["scales"].max() < 2:
        return out
    both = t[t["both"] >= 2]
    if both.empty:
        text = (f"{trained_counts(t)} at learning rate {fmt_g(sa.ref_lr)}: no seed has two init scales at which "
                "both variants trained, so their sensitivity to initialization cannot be compared.")
    else:
        listed = "; ".join((f"seed {r.seed}: " if len(t) > 1 else "") + f"bn {spread_word(sa, r.bn_spread)}, "
                           f"nobn {spread_word(sa, r.nobn_spread)} over {r.both} scales" for r in both.itertuples())
        text = (f"Over the init scales at which both variants trained, the spread (max − min) of the "
                f"{metric_name(sa)} is {listed}; {trained_counts(t)}.")
    out.append(Finding("initialization", text))
    return out


def pair_folder(run_bn: str) -> str:
    """Where a sweep report draws the figures of one of its pairs, from the bn run's name:
    ``"bn lr=3 init=1 seed=0"`` -> ``"pairs/lr=3_init=1_seed=0"``."""
    return "pairs/" + run_bn.split(" ", 1)[-1].replace(" ", "_")


def failing(sa: SweepAnalysis) -> list[Finding]:
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
            parts.append(f"does not train in {len(flat)} of {_seeds_word(total)} (it removed "
                         f"{', '.join(common.pct(x) for x in flat[f'loss_removed_{bad}'])} of its initial loss)")
        text = (f"At learning rate {fmt_g(lr)}, init scale {fmt_g(scale)}, {bad} {' and '.join(parts)} while {good} "
                f"trains (final loss {', '.join(common.num(x) for x in fail[f'final_loss_{good}'])}).")
        compare = []
        for label, column, agg, fmt in (
                ("mean saturation", "mean_saturation", "mean", common.pct),
                ("median first/last Linear/Conv gradient ratio", "median_grad_ratio", "median",
                 lambda x: f"{common.num(x)} ({gradient_flow.describe(x)}, {gradient_flow.verdict(x)})")):
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
        rest = ", ".join(f"lr {fmt_g(lr)}/init {fmt_g(s)}" for lr, s in settings[MAX_SETTINGS:])
        out.append(Finding("learning_rate", f"{len(settings) - MAX_SETTINGS} more settings where one variant trains "
                           f"and the other does not: {rest}."))
    return out
