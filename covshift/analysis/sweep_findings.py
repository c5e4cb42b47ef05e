"""The verdicts and findings of a sweep: the learning-rate and initialization claims, what each
variant does over the grid, and the settings where one variant trains and the other does not
(the quantities are defined in :mod:`covshift.analysis.sweep_tables`).

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
from typing import Any

import numpy as np
import pandas as pd

from . import common, gradient_flow, sweep_tables
from .common import Finding
from .generalization import TAIL_FRACTION
from .sweep_tables import THRESHOLD_FRACTION, TRAINS_FRACTION, VARIANTS, SweepAnalysis, fmt_g

PAIR_FIGURES = 3  #: failing settings whose pair gets its own saturation and gradient-flow figures
MAX_SETTINGS = 8           #: at most this many failing settings get a finding


def _grid_steps(sa: SweepAnalysis, a: float, b: float) -> int:
    grid = sorted(set(sa.runs.loc[sa.runs["init_scale"] == sa.init_scale, "lr"]))
    return grid.index(a) - grid.index(b)


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
                                              f"(init scale {fmt_g(sa.init_scale)})")
    b, n = bn["usable_lr"], nobn["usable_lr"]
    where = f"largest learning rate at which every seed trains (init scale {fmt_g(sa.init_scale)})"
    if math.isnan(b):
        return "not supported", f"{where}: bn none, nobn " + ("none" if math.isnan(n) else fmt_g(n))
    if math.isnan(n):
        higher, evidence = True, f"{where}: bn {fmt_g(b)}, nobn none of {', '.join(map(fmt_g, grid))}"
    else:
        steps = _grid_steps(sa, b, n)
        higher = steps >= 1
        evidence = (f"{where}: bn {fmt_g(b)}, nobn {fmt_g(n)} (ratio {common.num(b / n)}, {steps} grid "
                    f"step{'' if steps == 1 else 's'})")
    per_seed = _per_seed(sa, "usable_lr")
    if len(sweep_tables.seeds(sa)) > 1:
        fails = [s for s, (x, y) in per_seed.items() if not _above(x, y)]
        if fails:
            higher = False
            evidence += "; not higher for seed " + ", ".join(
                f"{s} (bn {fmt_g(per_seed[s][0])}, nobn {fmt_g(per_seed[s][1])})" for s in fails)
        else:
            evidence += f"; higher for each of the {len(per_seed)} seeds"
    return ("supported" if higher else "not supported"), evidence


def init_verdict(sa: SweepAnalysis, margin: float) -> tuple[str, str]:
    """Verdict and evidence for "lower sensitivity to initialization"."""
    bn, nobn = _get(sa, "bn"), _get(sa, "nobn")
    if bn is None or nobn is None or min(bn["init_scales"], nobn["init_scales"]) < 2:
        return "not measured in this trace", (f"the sweep needs bn and nobn runs at two or more init scales "
                                              f"(lr {fmt_g(sa.ref_lr)})")
    bs, ns = bn["init_spread"], nobn["init_spread"]
    bd, nd = len(bn["diverging_scales"]), len(nobn["diverging_scales"])
    evidence = (f"spread of the mean final loss across init scales at lr {fmt_g(sa.ref_lr)}: bn {common.num(bs)}, "
                f"nobn {common.num(ns)}; init scales that diverge: bn {bd}, nobn {nd}")
    if _finite(bs, ns):
        lower = bs <= (1 - margin) * ns and bd <= nd
    else:
        lower = bd < nd
        evidence += " (a spread needs two init scales without divergence)"
    if len(sweep_tables.seeds(sa)) > 1 and _finite(bs, ns):
        ranges = [(bn["seed_spread_min"], bn["seed_spread_max"]), (nobn["seed_spread_min"], nobn["seed_spread_max"])]
        apart = _finite(*ranges[0], *ranges[1]) and ranges[0][1] < ranges[1][0]
        evidence += (f"; per-seed spreads bn {_span(*ranges[0])}, nobn {_span(*ranges[1])} "
                     + ("do not overlap" if apart else "overlap"))
        lower = lower and apart
    return ("supported" if lower else "not supported"), evidence


def _finite(*values: float) -> bool:
    return all(isinstance(v, (int, float, np.floating)) and math.isfinite(v) for v in values)


def _span(lo: float, hi: float) -> str:
    return f"{common.num(lo)}..{common.num(hi)}"


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
    if _finite(row["best_val_accuracy"]):
        parts.append(f"best validation accuracy {_stat(row, 'best_val_accuracy', common.pct, several)}")
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
        f"{', '.join(map(str, seeds))}; {int(runs['diverged'].sum())} diverged. A run trains when it does not "
        f"diverge and its final loss (mean of its last {TAIL_FRACTION:.0%} of steps) is at most "
        f"{common.num(TRAINS_FRACTION * sa.initial_loss)} ({TRAINS_FRACTION:g} times {common.num(sa.initial_loss)}, "
        f"the median initial loss of the runs that did not diverge); steps to threshold count the steps until "
        f"the smoothed loss is at most {THRESHOLD_FRACTION:g} times that, {common.num(sa.threshold)}."),
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
        fails = [f"{fmt_g(lr)} ({_failure(r)})" for lr, r in mine.iterrows() if r["trains"] < r["runs"]]
        if math.isnan(usable):
            text = (f"At init scale {fmt_g(sa.init_scale)}, {variant} trains with every seed at none of the learning "
                    f"rates {', '.join(map(fmt_g, grid))}")
        else:
            text = (f"At init scale {fmt_g(sa.init_scale)}, {variant} trains with every seed up to learning rate "
                    f"{fmt_g(usable)}")
            if usable == grid[-1]:
                text += " (the largest of the sweep, so its limit may lie higher)"
        text += ("; it fails at " + ", ".join(fails)) if fails else ""
        out.append(Finding("learning_rate", text + ".", value=usable))
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


def _lr_comparison(sa: SweepAnalysis) -> list[Finding]:
    bn, nobn = _get(sa, "bn"), _get(sa, "nobn")
    if bn is None or nobn is None:
        return []
    b, n = float(bn["usable_lr"]), float(nobn["usable_lr"])
    if math.isnan(b) and math.isnan(n):
        text = "Neither bn nor nobn trains with every seed at any learning rate of the sweep."
    elif math.isnan(n) or math.isnan(b):
        good, bad, lr = ("bn", "nobn", b) if math.isnan(n) else ("nobn", "bn", n)
        text = f"{good} trains with every seed up to learning rate {fmt_g(lr)}; {bad} at none of the sweep's."
    elif b == n:
        text = f"bn and nobn have the same largest trainable learning rate, {fmt_g(b)}."
    else:
        steps = _grid_steps(sa, b, n)
        text = (f"bn's largest trainable learning rate is {common.num(b / n)} times nobn's ({fmt_g(b)} vs {fmt_g(n)}; "
                f"{abs(steps)} grid step{'s' if abs(steps) != 1 else ''} {'higher' if steps > 0 else 'lower'}).")
    per_seed = _per_seed(sa, "usable_lr")
    if len(sweep_tables.seeds(sa)) > 1 and per_seed:
        def word(x: float) -> str:
            return "none" if math.isnan(x) else fmt_g(x)
        listed = "; ".join(f"seed {s}: bn {word(x)}, nobn {word(y)}" for s, (x, y) in per_seed.items())
        higher = [s for s, (x, y) in per_seed.items() if _above(x, y)]
        if len(higher) == len(per_seed):
            text += f" Per seed ({listed}) bn's is higher for every seed, so the difference holds across seeds."
        else:
            text += (f" Per seed ({listed}) bn's is higher for {len(higher)} of {len(per_seed)} seeds, so a higher "
                     "usable learning rate for bn is not beyond the spread across seeds.")
    return [Finding("learning_rate", text, value=b / n if _finite(b, n) and n > 0 else None)]


def init_findings(sa: SweepAnalysis) -> list[Finding]:
    out = []
    table = sa.init
    where = f"At learning rate {fmt_g(sa.ref_lr)} (the closest to the sweep's median learning rate on a log scale)"
    for variant in sorted(set(table["variant"].dropna())):
        mine = table[table["variant"] == variant]
        summary = _get(sa, variant)
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
        out.append(Finding("initialization", text, value=float(summary["init_spread"])))  # type: ignore[index]
    bn, nobn = _get(sa, "bn"), _get(sa, "nobn")
    if bn is None or nobn is None:
        return out
    bs, ns = float(bn["init_spread"]), float(nobn["init_spread"])
    bd, nd = len(bn["diverging_scales"]), len(nobn["diverging_scales"])
    if _finite(bs, ns):
        ratio = f"{common.num(bs / ns)} times nobn's" if ns > 0 else "compared with nobn's"
        text = f"bn's spread of final loss across init scales is {ratio} ({common.num(bs)} vs {common.num(ns)})"
    else:
        text = "A spread of final loss needs two init scales without divergence, which " + " and ".join(
            v for v, x in (("bn", bs), ("nobn", ns)) if not _finite(x)) + " lacks"
    text += f"; bn diverges at {bd} init scale{'s' if bd != 1 else ''}, nobn at {nd}."
    if len(sweep_tables.seeds(sa)) > 1 and _finite(bs, ns):
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
            parts.append(f"does not train in {len(flat)} of {_seeds_word(total)} (final loss "
                         f"{', '.join(common.num(x) for x in flat[f'final_loss_{bad}'])} > "
                         f"{common.num(TRAINS_FRACTION * sa.initial_loss)})")
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
