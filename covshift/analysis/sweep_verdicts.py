"""The two claims a sweep decides (the report's claims table; quantities of
:mod:`covshift.analysis.sweep_tables`). Each returns ``(verdict, evidence, seeds)``, the
verdict one of :data:`covshift.analysis.claims.VERDICTS` and ``seeds`` the number of seeds
it rests on (1 makes it "supported (1 seed)").

**Higher usable learning rate** (:func:`lr_verdict`). Per seed, bn's usable lr is *higher*
when it is at least one grid step above nobn's, or nobn has none and bn has one. Seeds in
which neither variant has a usable lr are left out. ``supported`` when bn's is higher in
every remaining seed, ``not supported`` when it is equal or lower in every one,
``inconclusive`` when the seeds disagree. ``not comparable`` when nobn trained at no
learning rate in any seed (then, when bn trained in every seed: "BatchNorm made training
possible"), or neither variant did. ``not measured`` without bn and nobn runs at two or
more learning rates.

**Lower sensitivity to initialization** (:func:`init_verdict`). Only the init scales at
which both variants trained count, per seed. A seed is *comparable* when both trained at
two or more init scales; with no comparable seed the claim is ``not comparable``, with the
counts ("nobn trained at 0 of 5 init scales, bn at 5 of 5"): a variant that never trains is
not insensitive to its initialization. In a comparable seed bn is *lower* when it trained
at no fewer init scales than nobn and its spread ≤ (1 − margin) × nobn's (which must be
above 0). ``supported`` when bn is lower in every comparable seed, ``not supported`` when
in none, ``inconclusive`` otherwise; ``not measured`` without two or more init scales.
"""

from __future__ import annotations

import math

import pandas as pd

from .sweep_tables import ACCURACY_TOLERANCE, LOSS_TOLERANCE, SweepAnalysis, fmt_g

Decided = tuple[str, str, int]


def lr_grid(sa: SweepAnalysis) -> list[float]:
    """The sorted learning rates at the reference init scale."""
    return sorted(set(sa.runs.loc[sa.runs["init_scale"] == sa.init_scale, "lr"]))


def grid_steps(sa: SweepAnalysis, a: float, b: float) -> int:
    """How many grid steps the learning rate ``a`` lies above ``b``."""
    grid = lr_grid(sa)
    return grid.index(a) - grid.index(b)


def per_seed(sa: SweepAnalysis) -> dict[int, tuple[float, float]]:
    """Seed -> (bn's usable lr, nobn's) for the seeds both variants have."""
    t = sa.by_seed if sa.by_seed is not None else pd.DataFrame(columns=["variant", "seed", "usable_lr"])
    both = t[t["variant"] == "bn"].merge(t[t["variant"] == "nobn"], on="seed", suffixes=("_bn", "_nobn"))
    return {int(s): (float(x), float(y)) for s, x, y in zip(both["seed"], both["usable_lr_bn"], both["usable_lr_nobn"])}


def above(x: float, y: float) -> bool:
    """Whether a usable lr ``x`` is higher than ``y`` (NaN: none, lower than any)."""
    return not math.isnan(x) and (math.isnan(y) or x > y)


def lr_word(x: float) -> str:
    return "none" if math.isnan(x) else fmt_g(x)


def usable_rule(sa: SweepAnalysis) -> str:
    """The usable-lr rule in words, for evidence and findings."""
    ends = (f"ends within {100 * ACCURACY_TOLERANCE:g} points of the variant's best final validation accuracy"
            if sa.metric == "final_accuracy" else
            f"ends with a final training loss within {LOSS_TOLERANCE:.0%} of the variant's best")
    return f"the largest learning rate whose run trained and {ends}"


def lr_verdict(sa: SweepAnalysis) -> Decided:
    """Verdict, evidence and seeds for "higher usable learning rate" (see the module docstring)."""
    grid, seeds = lr_grid(sa), per_seed(sa)
    where = f"init scale {fmt_g(sa.init_scale)}"
    if not seeds or len(grid) < 2:
        return "not measured", f"the sweep needs bn and nobn runs at two or more learning rates ({where})", 0
    head = f"usable learning rate ({usable_rule(sa)}; {where})"
    n = len(seeds)
    in_seeds = "" if n == 1 else f" in any of the {n} seeds"
    if all(math.isnan(y) for _, y in seeds.values()):
        bn_ok = sum(not math.isnan(x) for x, _ in seeds.values())
        if not bn_ok:
            return ("not comparable", f"neither bn nor nobn trained at any of the learning rates {_list(grid)} "
                    f"({where}){in_seeds}", 0)
        text = f"nobn trained at no learning rate of {_list(grid)} ({where}){in_seeds}"
        if bn_ok == n:
            return "not comparable", f"{text} while bn did: BatchNorm made training possible", n
        return "not comparable", f"{text}; bn in {bn_ok} of {n} seeds", n
    kept = {s: v for s, v in seeds.items() if not (math.isnan(v[0]) and math.isnan(v[1]))}
    higher = [s for s, (x, y) in kept.items() if above(x, y)]
    evidence = f"{head}: " + "; ".join(
        ("" if n == 1 else f"seed {s}: ") + f"bn {lr_word(x)}, nobn {lr_word(y)}" + _steps(sa, x, y)
        for s, (x, y) in kept.items())
    if n > 1:
        evidence += f"; bn higher in {len(higher)} of {len(kept)} seeds"
    left = sorted(set(seeds) - set(kept))
    if left:
        evidence += "; left out (neither variant usable at any learning rate): seed " + ", ".join(map(str, left))
    verdict = ("supported" if len(higher) == len(kept) else "not supported" if not higher else "inconclusive")
    return verdict, evidence, len(kept)


def _steps(sa: SweepAnalysis, x: float, y: float) -> str:
    if math.isnan(x) or math.isnan(y):
        return ""
    steps = grid_steps(sa, x, y)
    return f" ({steps} grid step{'' if abs(steps) == 1 else 's'})"


def _list(values: list[float]) -> str:
    return ", ".join(map(fmt_g, values))


def _span(values: pd.Series) -> str:
    lo, hi = int(values.min()), int(values.max())
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def trained_counts(t: pd.DataFrame) -> str:
    """"nobn trained at 0 of 5 init scales, bn at 5 of 5" (with ranges and "per seed" over several seeds)."""
    per = "" if len(t) == 1 else " per seed" if t[["nobn_trained", "bn_trained", "scales"]].nunique().max() > 1 \
        else f" in each of the {len(t)} seeds"
    return (f"nobn trained at {_span(t['nobn_trained'])} of {_span(t['scales'])} init scales, "
            f"bn at {_span(t['bn_trained'])} of {_span(t['scales'])}{per}")


def spread_word(sa: SweepAnalysis, x: float) -> str:
    """A spread of the final metric: accuracy in points, loss as a number."""
    if math.isnan(x):
        return "none"
    return f"{100 * x:.3g} points" if sa.metric == "final_accuracy" else f"{x:.3g}"


def metric_name(sa: SweepAnalysis) -> str:
    return "final validation accuracy" if sa.metric == "final_accuracy" else "final training loss"


def init_verdict(sa: SweepAnalysis, margin: float) -> Decided:
    """Verdict, evidence and seeds for "lower sensitivity to initialization"."""
    t = sa.init_by_seed if sa.init_by_seed is not None else pd.DataFrame()
    where = f"lr {fmt_g(sa.ref_lr)}"
    if t.empty or t["scales"].max() < 2:
        return "not measured", f"the sweep needs bn and nobn runs at two or more init scales ({where})", 0
    ok = t[t["both"] >= 2]
    if ok.empty:
        return ("not comparable", f"{trained_counts(t)} ({where}): a spread needs two or more init scales at which "
                "both trained", 0)
    lower = [bool(r.bn_trained >= r.nobn_trained and r.nobn_spread > 0 and r.bn_spread <= (1 - margin) * r.nobn_spread)
             for r in ok.itertuples()]
    several = len(t) > 1
    evidence = (f"spread (max − min) of the {metric_name(sa)} over the init scales at which both trained ({where}): "
                + "; ".join((f"seed {r.seed}: " if several else "")
                            + f"bn {spread_word(sa, r.bn_spread)}, nobn {spread_word(sa, r.nobn_spread)} "
                            f"over {r.both} scales" for r in ok.itertuples())
                + f"; {trained_counts(t)}")
    if several:
        evidence += f"; bn lower by {margin:.0%} in {sum(lower)} of {len(ok)} seeds"
    left = t[t["both"] < 2]
    if len(left):
        evidence += "; left out (both trained at fewer than two init scales): seed " + ", ".join(
            map(str, left["seed"]))
    verdict = "supported" if all(lower) else "not supported" if not any(lower) else "inconclusive"
    return verdict, evidence, len(ok)
