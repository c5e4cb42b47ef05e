"""The classic BatchNorm claims, checked against a trace's own measurements.

Each claim gets exactly one verdict (:data:`VERDICTS`). Every claim compares the bn and
nobn runs of each seed (:func:`covshift.analysis.common.seed_pairs`) through one number per
seed, the *effect*:

- a **ratio** bn / nobn of a scale-free measure where lower is better (steps to a loss
  level, roughness, shift, ICS, landscape smoothness). The mean of ln(ratio) over seeds and
  its 95% t-interval (:func:`covshift.analysis.intervals.mean_interval`) are turned back
  into ratios. ``supported`` when the whole interval is at or below ``1 - MARGIN``;
  ``not supported`` when it lies above ``1 - MARGIN`` (no improvement of that size);
  ``inconclusive`` otherwise.
- a **difference** bn − nobn of validation accuracy (higher is better), each seed's with its
  binomial standard error. The interval is the t-interval over seeds, at least as wide as
  the mean's sampling error (``Z * sqrt(mean(se²) / n)``; with one seed ``± Z se``).
  ``supported`` when its low end is above 0, ``not supported`` when its high end is at or
  below 0, else ``inconclusive``.

With one seed the point estimate decides and the verdict is labelled ``(1 seed)``.

**Effects the measure cannot resolve decide nothing.** A seed's measure may say its effect
is unresolved (:attr:`Measure.unresolved`): for the distributional covariate shift, both
runs' shifts below :data:`covshift.analysis.covariate_shift.BASELINE_FACTOR` × their
sampling-noise baseline, where bn / nobn is a ratio of noises; for generalization, a run
whose first evaluation is already below the matched training loss, so that the two runs are
not read at the same training loss. Any such seed makes the claim ``inconclusive``, with the
reason and how many seeds it concerns. So does a trace that holds the quantity when no seed
gives a value for both runs (e.g. roughness when the runs share fewer than
:data:`covshift.analysis.stability.MIN_STEPS` steps of loss levels).

**Run outcomes come first.** Dynamics claims (every claim here but the sweep's) use only
the seeds whose two runs both trained (:mod:`covshift.analysis.outcomes`). Where no seed
has two trained runs the claim is ``not comparable``, with the reason; "faster
convergence" is then ``supported`` in exactly the form "nobn did not train ...: BatchNorm
made training possible" when bn trained in every such seed and nobn did not.

A claim whose quantity the trace does not hold (no ``--ics-every``, no detail steps, no
validation metrics) is ``not measured``, whatever the outcomes. The learning-rate and
initialization claims come from a sweep (:mod:`covshift.analysis.sweep_verdicts`, which
applies the same outcomes per run) and are ``not measured`` without one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from . import convergence, covariate_shift, generalization, stability
from .common import num
from .intervals import Z, mean_interval
from .sweep_verdicts import init_verdict, lr_verdict
from .sweep_tables import FILES as SWEEP_FILES

if TYPE_CHECKING:
    from . import Analysis
    from .sweep_tables import SweepAnalysis

VERDICTS = ("supported", "not supported", "inconclusive", "not comparable", "not measured")
MARGIN = 0.10  #: a ratio claim needs bn ≤ (1 − MARGIN) × nobn over the whole interval
CLAIMS = ("faster convergence", "smoother, stabler training", "higher usable learning rate",
          "lower sensitivity to initialization", "reduced internal covariate shift (distributional)",
          "reduced internal covariate shift (gradient-based)", "smoother loss landscape",
          "better generalization")


@dataclass
class Claim:
    """One claim's verdict, the numbers behind it and the figure that shows them."""
    claim: str
    verdict: str
    evidence: str
    figure: str = ""
    seeds: int = 0                                  #: seed pairs the verdict rests on
    per_seed: list[float] = field(default_factory=list)  #: the effect of each of those seeds
    low: float = math.nan                           #: the effect's 95% interval and mean
    mean: float = math.nan
    high: float = math.nan

    @property
    def label(self) -> str:
        """The verdict as printed: "supported (1 seed)" when one seed decided it."""
        one = self.seeds == 1 and self.verdict in ("supported", "not supported")
        return f"{self.verdict} (1 seed)" if one else self.verdict


@dataclass
class Measure:
    """One seed pair's values of a claim's measure."""
    bn: float
    nobn: float
    note: str = ""                 #: what else the evidence says about this seed
    se: float = math.nan           #: standard error of bn − nobn (differences only)
    higher_is_better: bool = False  #: True: compared as bn − nobn; False: as the ratio bn / nobn
    unresolved: str = ""           #: why this seed's effect cannot decide the claim (e.g. both within noise)


@dataclass
class _Effect:
    claim: str
    what: str  # for the evidence, e.g. "steps to the deepest loss level both runs reach"
    figure: str
    measure: Callable[[Analysis, str, str], Measure]
    available: Callable[[Analysis], bool] = lambda a: True  # whether the trace holds what it needs
    needs: str = ""  # what to record to get it


def _ratio_verdict(per_seed: Sequence[float]) -> tuple[str, float, float, float]:
    low, mean, high = (math.exp(v) for v in mean_interval(np.log(per_seed)))
    if high <= 1 - MARGIN:
        return "supported", low, mean, high
    if low > 1 - MARGIN:
        return "not supported", low, mean, high
    return "inconclusive", low, mean, high


def _difference_verdict(per_seed: Sequence[float], ses: Sequence[float]) -> tuple[str, float, float, float]:
    low, mean, high = mean_interval(per_seed)
    known = np.asarray(ses, dtype=float)
    known = known[np.isfinite(known)]
    floor = Z * math.sqrt(float(np.mean(np.square(known))) / len(ses)) if known.size else 0.0
    half = max((high - low) / 2, floor)
    low, high = mean - half, mean + half
    verdict = "supported" if low > 0 else "not supported" if high <= 0 else "inconclusive"
    return verdict, low, mean, high


def _outcome(a: Analysis, run: str) -> str:
    rows = a.outcomes.loc[a.outcomes["run"] == run, "outcome"]
    return str(rows.iloc[0]) if len(rows) else "did not train"


def _untrained(a: Analysis, pairs: pd.DataFrame) -> str:
    """Which runs of ``pairs`` did not train, e.g. "nobn did not train in 3 of 3 seeds"."""
    parts = []
    for variant in ("bn", "nobn"):
        bad = [_outcome(a, run) for run in pairs[variant] if _outcome(a, run) != "trained"]
        if bad:
            diverged = bad.count("diverged")
            text = f"{variant} did not train in {len(bad)} of {len(pairs)} seed{'s' * (len(pairs) > 1)}"
            parts.append(text + (f" ({diverged} diverged)" if diverged else ""))
    return " and ".join(parts)


def _split(a: Analysis) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The seed pairs whose two runs both trained, and the others."""
    both = [_outcome(a, b) == "trained" and _outcome(a, n) == "trained" for b, n in zip(a.seeds["bn"], a.seeds["nobn"])]
    mask = np.asarray(both, dtype=bool)
    return a.seeds[mask], a.seeds[~mask]


def _made_possible(a: Analysis, others: pd.DataFrame) -> bool:
    """Whether in every seed bn trained and nobn did not."""
    return len(others) > 0 and all(_outcome(a, b) == "trained" and _outcome(a, n) != "trained"
                                   for b, n in zip(others["bn"], others["nobn"]))


def _steps(a: Analysis, bn: str, nobn: str) -> Measure:
    level, b, n = convergence.pair_steps(a.convergence, bn, nobn)
    note = f"{num(level)} × initial loss" if math.isfinite(level) else ""
    return Measure(max(b, 1.0), max(n, 1.0), note)


def _roughness(a: Analysis, bn: str, nobn: str) -> Measure:
    b, n, used = stability.pair_roughness(a.losses[bn], a.losses[nobn])
    if used < stability.MIN_STEPS:
        return Measure(b, n, f"only {used} steps in the range of loss levels both runs pass through, fewer than "
                             f"{stability.MIN_STEPS}")
    return Measure(b, n, f"{used} steps")


def _roles(a: Analysis, kind: str, first: int = 1) -> pd.DataFrame:
    return a.pairs[(a.pairs["kind"] == kind) & (a.pairs["index"] >= first)]


def _shift(a: Analysis, bn: str, nobn: str) -> Measure:
    """Mean ``w2`` between consecutive detail steps over the matched nonlinearity inputs
    (:func:`covariate_shift.pair_shift`); unresolved when both are within noise."""
    b, n = covariate_shift.pair_shift(a.shift_summary, a.pairs, bn, nobn)
    if not b.layers:
        return Measure(math.nan, math.nan)
    if math.isfinite(b.times_baseline) and math.isfinite(n.times_baseline):
        note = (f"{b.layers} nonlinearity inputs; bn {num(b.times_baseline)}×, nobn {num(n.times_baseline)}× "
                f"the sampling-noise baseline")
    else:
        note = f"{b.layers} nonlinearity inputs; no sampling-noise baseline (the trace has no unit_count)"
    unresolved = (f"both runs' shifts are within {covariate_shift.BASELINE_FACTOR:g}× the sampling-noise baseline"
                  if b.within_noise and n.within_noise else "")
    return Measure(b.value, n.value, note, unresolved=unresolved)


def _ics(a: Analysis, bn: str, nobn: str) -> Measure:
    """Median ``ics_rel`` over the matched Linear/Conv layers but the first (0 by definition)."""
    roles = _roles(a, "weighted", first=2)
    rows = a.instruments[a.instruments["metric"] == "ics_rel"]
    b = rows.loc[(rows["run"] == bn) & rows["layer"].isin(roles["bn"]), "value"]
    n = rows.loc[(rows["run"] == nobn) & rows["layer"].isin(roles["nobn"]), "value"]
    if b.empty or n.empty:
        return Measure(math.nan, math.nan)
    return Measure(float(b.median()), float(n.median()), f"{len(roles)} layers, first excluded")


def _has(a: Analysis, metric: str) -> bool:
    return bool((a.instruments["metric"] == metric).any())


def _median(a: Analysis, run: str, metric: str) -> float:
    rows = a.instruments[(a.instruments["run"] == run) & (a.instruments["metric"] == metric)]
    return float(rows["value"].median()) if len(rows) else math.nan


def _landscape(a: Analysis, bn: str, nobn: str) -> Measure:
    gp = [_median(a, run, "grad_predictiveness") for run in (bn, nobn)]
    note = f"median max ‖∇L(θ) − ∇L(θ − ηg)‖: bn {num(gp[0])}, nobn {num(gp[1])}" if all(map(math.isfinite, gp)) else ""
    return Measure(_median(a, bn, "beta_smoothness"), _median(a, nobn, "beta_smoothness"), note)


def _generalization(a: Analysis, bn: str, nobn: str) -> Measure:
    """Validation accuracy at the matched training loss (:func:`.generalization.matched`), with
    the binomial standard error of the difference from each run's ``val_examples``; without
    accuracy, the validation loss there (ratio: a loss is positive, the gap need not be, and at
    equal training loss a lower validation loss is a smaller gap). The note gives the matched
    level and both steps; without eval-mode training loss, the last evaluations, "not matched"."""
    m = generalization.matched(a.evaluations, bn, nobn)
    b, n = m["bn"], m["nobn"]
    note = generalization.where(m)
    early = [side for side in ("bn", "nobn") if m["matched"] and m[side]["train_loss"] < m["level"]]
    unresolved = (f"{early[0]}'s first evaluation is already below the matched training loss, so the runs are not "
                  "at the same training loss (evaluate more often: --eval-every)") if early else ""
    if math.isfinite(b["val_accuracy"]) and math.isfinite(n["val_accuracy"]):
        return Measure(b["val_accuracy"], n["val_accuracy"], note, generalization.accuracy_difference_se(m),
                       higher_is_better=True, unresolved=unresolved)
    gaps = f"; gap bn {num(b['gap'])}, nobn {num(n['gap'])}" if math.isfinite(b["gap"] + n["gap"]) else ""
    return Measure(b["val_loss"], n["val_loss"], note + "; no accuracy: compared by validation loss" + gaps,
                   unresolved=unresolved)


EFFECTS = [
    _Effect("faster convergence", "steps to the deepest loss level both runs reach", "batchnorm_training_loss.png",
            _steps),
    _Effect("smoother, stabler training", "roughness of the training loss (std of Δ log loss over the loss levels "
            "both runs pass through)", "batchnorm_training_loss.png", _roughness),
    _Effect("reduced internal covariate shift (distributional)", "mean shift of the nonlinearity inputs between "
            "detail steps", "covariate_shift.png", _shift,
            lambda a: not a.shift_summary.empty, "per-unit statistics at two or more detail steps"),
    _Effect("reduced internal covariate shift (gradient-based)", "median ‖G − G′‖ / ‖G‖ (Santurkar et al. 2018)",
            "ics.png", _ics, lambda a: _has(a, "ics_rel"), "covshift trace --ics-every N"),
    _Effect("smoother loss landscape", "median effective β-smoothness along the gradient", "landscape.png",
            _landscape, lambda a: _has(a, "beta_smoothness"), "covshift trace --ics-every N"),
    _Effect("better generalization", "validation accuracy at the lowest eval-mode training loss both runs reach",
            "batchnorm_training_loss.png",
            _generalization, lambda a: bool(a.generalization[["val_loss", "val_accuracy"]].notna().any(axis=None)),
            "validation metrics: covshift trace logs them"),
]


def _fmt(value: float, higher_is_better: bool) -> str:
    return f"{value:.1%}" if higher_is_better else f"{value:.4g}"


def _evidence(effect: _Effect, rows: list[tuple[int, Measure]], claim: Claim) -> str:
    first = rows[0][1]
    better = first.higher_is_better
    if len(rows) == 1:
        m = rows[0][1]
        text = f"{effect.what}: bn {_fmt(m.bn, better)}, nobn {_fmt(m.nobn, better)}"
        if better and math.isfinite(m.se):
            text += f" (difference {100 * (m.bn - m.nobn):+.1f} points ± {100 * Z * m.se:.1f} at 95%)"
        return text + (f"; {m.note}" if m.note else "")
    what = "bn − nobn" if better else "bn / nobn"
    value = (lambda v: f"{100 * v:+.1f} points") if better else num
    seeds = "; ".join(f"seed {seed}: bn {_fmt(m.bn, better)}, nobn {_fmt(m.nobn, better)}"
                      + (f" ({m.note})" if m.note else "") for seed, m in rows)
    return (f"{effect.what}, {what} over {len(rows)} seeds: {value(claim.mean)} (95% interval "
            f"{value(claim.low)} to {value(claim.high)}); {seeds}")


def _decide(a: Analysis, effect: _Effect) -> Claim:
    claim = Claim(effect.claim, "not measured", "", effect.figure)
    if a.seeds.empty:
        claim.evidence = "needs a bn and a nobn run (covshift trace records both)"
        return claim
    if not effect.available(a):
        claim.evidence = f"{effect.what}: not in this trace" + (f" ({effect.needs})" if effect.needs else "")
        claim.figure = ""
        return claim
    both, others = _split(a)
    if both.empty:
        reason = _untrained(a, others)
        if effect.claim == "faster convergence" and _made_possible(a, others):
            claim.verdict, claim.seeds = "supported", len(others)
            claim.evidence = f"{reason} while bn did: BatchNorm made training possible"
        else:
            claim.verdict = "not comparable"
            claim.evidence = f"{reason}: a comparison needs two runs that trained"
        return claim
    measured = [(seed, effect.measure(a, bn, nobn)) for seed, bn, nobn in zip(both["seed"], both["bn"], both["nobn"])]
    rows = [(seed, m) for seed, m in measured if math.isfinite(m.bn) and math.isfinite(m.nobn)
            and (m.higher_is_better or (m.bn > 0 and m.nobn > 0))]
    if not rows:  # the trace holds the quantity, but no seed gives a usable pair of values
        claim.verdict = "inconclusive"
        notes = "; ".join(dict.fromkeys(m.note for _, m in measured if m.note))
        claim.evidence = f"{effect.what}: no seed gives a value for both runs" + (f" ({notes})" if notes else "")
        return claim
    measures = [m for _, m in rows]
    if measures[0].higher_is_better:
        claim.per_seed = [m.bn - m.nobn for m in measures]
        verdict = _difference_verdict(claim.per_seed, [m.se for m in measures])
    else:
        claim.per_seed = [m.bn / m.nobn for m in measures]
        verdict = _ratio_verdict(claim.per_seed)
    claim.verdict, claim.low, claim.mean, claim.high = verdict
    claim.seeds = len(rows)
    claim.evidence = _evidence(effect, rows, claim)
    unresolved = [(seed, m.unresolved) for seed, m in rows if m.unresolved]
    if unresolved:  # an effect the measure cannot resolve decides nothing, either way
        claim.verdict = "inconclusive"
        where = "" if len(rows) == 1 else f" in {len(unresolved)} of {len(rows)} seeds"
        claim.evidence += f"; inconclusive: {unresolved[0][1]}{where}"
    if not others.empty:
        claim.evidence += f"; left out: {_untrained(a, others)}"
    return claim


def _sweep_claim(name: str, option: str, figure: str, decided: tuple[str, str, int] | None) -> Claim:
    """A sweep claim from its (verdict, evidence, seeds) (:mod:`.sweep_verdicts`)."""
    if decided is None:
        return Claim(name, "not measured", f"needs a sweep over {option} (covshift sweep)")
    verdict, evidence, seeds = decided
    return Claim(name, verdict, evidence, figure, seeds=seeds)


def claims(a: Analysis, sweep: SweepAnalysis | None = None) -> list[Claim]:
    """Every claim of :data:`CLAIMS`, in that order: the learning-rate and initialization
    claims from ``sweep``, the others from the seed pairs of ``a``."""
    found = {effect.claim: _decide(a, effect) for effect in EFFECTS}
    found["higher usable learning rate"] = _sweep_claim(
        "higher usable learning rate", "--lr", SWEEP_FILES["lr"], lr_verdict(sweep) if sweep else None)
    found["lower sensitivity to initialization"] = _sweep_claim(
        "lower sensitivity to initialization", "--init-scale", SWEEP_FILES["init"],
        init_verdict(sweep, MARGIN) if sweep else None)
    return [found[name] for name in CLAIMS]


def disagreement(found: list[Claim]) -> str | None:
    """A paragraph for the report when the two covariate-shift rows reach opposite verdicts."""
    rows = {c.claim: c for c in found}
    dist = rows["reduced internal covariate shift (distributional)"]
    grad = rows["reduced internal covariate shift (gradient-based)"]
    decided = ("supported", "not supported")
    if dist.verdict not in decided or grad.verdict not in decided or dist.verdict == grad.verdict:
        return None
    return (f"The two covariate-shift measures disagree: the distributional one is {dist.label}, the gradient-based "
            f"one {grad.label}. They measure different things. The distributional shift (Ioffe & Szegedy 2015) is how "
            "far the distribution of each nonlinearity's input moves between detail steps, in units of its spread; "
            "BatchNorm fixes the mean and variance of that input by construction, so it tends to look reduced. The "
            "gradient-based shift (Santurkar et al. 2018) is how much a layer's gradient changes when the layers "
            "below it take their update; it asks whether those updates disturb what this layer is learning, and "
            "Santurkar et al. found that BatchNorm does not reduce it.")
