"""Tests of the run-level measures of covshift.analysis: backward-looking smoothing, steps to
fractions of the initial loss, and the scale-free roughness, each against an independent
computation with numpy or pandas in the test."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from test_analysis import build, loss_rows, texts

from covshift.analysis import analyze, common, convergence, stability


def reference_smooth(values: np.ndarray) -> np.ndarray:
    w = max(1, int(round(0.02 * len(values))))
    return pd.Series(values).rolling(w, min_periods=1).mean().to_numpy()


def reference_steps(steps: np.ndarray, values: np.ndarray, level: float) -> float:
    smoothed = reference_smooth(values)
    for s, v in zip(steps, smoothed):
        if v <= level * values[0]:
            return float(s)
    return math.nan


def noisy_decay(n: int, rate: float, noise: float, seed: int, start: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return start * np.exp(-rate * np.arange(n)) * np.exp(noise * rng.standard_normal(n))


# ------------------------------------------------------------------------------ smoothing

@pytest.mark.parametrize("n", [1, 7, 49, 50, 101, 333, 1000])
def test_smooth_is_a_trailing_mean(n):
    values = np.random.default_rng(n).standard_normal(n).cumsum()
    assert common.window(n) == max(1, round(0.02 * n))
    np.testing.assert_allclose(common.smooth(values), reference_smooth(values), rtol=1e-12, atol=1e-12)


def test_smooth_never_looks_ahead():
    values = np.ones(200)
    values[150:] = 0.0  # a drop at step 150 must not show before it
    smoothed = common.smooth(values)
    assert (smoothed[:150] == 1.0).all() and smoothed[150] < 1.0


# ---------------------------------------------------------------------------- convergence

def test_steps_to_levels_on_exponential_decay(tmp_path):
    steps = np.arange(0, 2000, 5)  # recorded every 5 steps
    values = 3.0 * np.exp(-steps / 300.0)
    trace = build(tmp_path / "t.covshift", {"r": {"scalars": loss_rows(values, steps=steps)}})
    c = analyze(trace).convergence.set_index("run").loc["r"]
    assert c["initial_loss"] == 3.0
    assert c["final_loss"] == pytest.approx(reference_smooth(values)[-1])
    assert c["smoothing_window"] == 8
    for level in (0.9, 0.5, 0.1):
        expected = reference_steps(steps, values, level)
        assert c[f"steps_to_{round(100 * level)}"] == expected
        # the trailing mean lags the raw curve: no earlier than the raw crossing
        assert expected >= steps[np.argmax(values <= level * 3.0)]


def test_never_reached_levels_are_nan(tmp_path):
    values = 1.0 - 0.3 * (1 - np.exp(-np.arange(300) / 20))  # plateaus at 70% of the start
    trace = build(tmp_path / "t.covshift", {"flat": {"scalars": loss_rows(values)}})
    a = analyze(trace)
    c = a.convergence.set_index("run").loc["flat"]
    assert c["steps_to_90"] == reference_steps(np.arange(300), values, 0.9)
    assert math.isnan(c["steps_to_50"]) and math.isnan(c["steps_to_10"])
    assert any("never reaches 10% of its initial loss" in t for t in texts(a, "convergence"))


def test_pair_steps_picks_the_deepest_common_level(tmp_path):
    t = np.arange(1000)
    runs = {"bn": 2.0 * np.exp(-t / 50), "nobn": 2.0 * np.exp(-t / 400),  # both reach 10%
            "stuck": 2.0 - 1.2 * (1 - np.exp(-t / 30))}                     # reaches 50%, never 10%
    trace = build(tmp_path / "t.covshift", {r: {"scalars": loss_rows(v)} for r, v in runs.items()})
    conv = analyze(trace).convergence
    level, b, n = convergence.pair_steps(conv, "bn", "nobn")
    assert level == 0.1
    assert (b, n) == (reference_steps(t, runs["bn"], 0.1), reference_steps(t, runs["nobn"], 0.1))
    level, b, n = convergence.pair_steps(conv, "bn", "stuck")
    assert level == 0.5 and n == reference_steps(t, runs["stuck"], 0.5)
    assert all(math.isnan(x) for x in convergence.pair_steps(conv, "bn", "missing"))


def test_pair_steps_nan_without_a_common_level(tmp_path):
    trace = build(tmp_path / "t.covshift", {"bn": {"scalars": loss_rows(np.linspace(2, 0.1, 100))},
                                            "nobn": {"scalars": loss_rows(np.full(100, 2.0))}})
    assert all(math.isnan(x) for x in convergence.pair_steps(analyze(trace).convergence, "bn", "nobn"))


# ------------------------------------------------------------------------------ roughness

def test_roughness_matches_numpy_and_is_scale_free(tmp_path):
    values = noisy_decay(500, 0.005, 0.05, seed=1)
    trace = build(tmp_path / "t.covshift", {"r": {"scalars": loss_rows(values)},
                                            "big": {"scalars": loss_rows(100 * values)}})
    s = analyze(trace).stability.set_index("run")
    expected = np.diff(np.log(values)).std(ddof=1)
    assert s.loc["r", "roughness"] == pytest.approx(expected, rel=1e-9)
    assert s.loc["big", "roughness"] == pytest.approx(expected, rel=1e-9)
    assert math.isnan(stability.roughness(np.array([1.0, 0.5])))
    assert math.isnan(stability.roughness(np.array([1.0, -0.5, 0.2])))


def reference_pair(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]):
    sa, sb = reference_smooth(a[1]), reference_smooth(b[1])
    low, high = max(sa.min(), sb.min()), min(sa[0], sb[0])
    out = []
    for (_, v), s in ((a, sa), (b, sb)):
        keep = [i for i in range(1, len(v)) if low <= s[i] <= high]
        out.append((np.std([math.log(v[i]) - math.log(v[i - 1]) for i in keep], ddof=1), len(keep)))
    return out[0][0], out[1][0], min(out[0][1], out[1][1])


def test_pair_roughness_uses_only_the_shared_range():
    n = 600
    steps = np.arange(n)
    # bn: calm while it falls from 2 to 0.5, then very noisy far below anything nobn reaches
    bn = 2.0 * np.exp(-np.arange(n) / 150)
    rng = np.random.default_rng(3)
    bn[300:] *= np.exp(0.3 * rng.standard_normal(n - 300))
    # nobn: moderately noisy, from 2 down to about 0.5
    nobn = noisy_decay(n, 1.4 / n, 0.02, seed=4)
    b, nb, used = stability.pair_roughness((steps, bn), (steps, nobn))
    eb, en, eused = reference_pair((steps, bn), (steps, nobn))
    assert b == pytest.approx(eb, rel=1e-9) and nb == pytest.approx(en, rel=1e-9) and used == eused
    assert used >= stability.MIN_STEPS
    # over the whole run bn is far rougher; over the shared range it is the calmer one
    assert stability.roughness(bn) > stability.roughness(nobn)
    assert b < nb


def test_pair_roughness_identical_runs_and_too_few_steps():
    steps = np.arange(400)
    values = noisy_decay(400, 0.004, 0.03, seed=5)
    b, n, used = stability.pair_roughness((steps, values), (steps, values.copy()))
    assert b == n and used > stability.MIN_STEPS
    # a run that never falls below the other's start: the shared range is a single level
    flat = np.full(400, 5.0)
    b, n, used = stability.pair_roughness((steps, values), (steps, flat))
    assert math.isnan(b) and math.isnan(n) and used < stability.MIN_STEPS


def test_claims_use_pair_steps_and_pair_roughness(tmp_path):
    from covshift.analysis.claims import claims
    t = np.arange(800)
    bn = noisy_decay(800, 1 / 80, 0.01, seed=6)
    nobn = noisy_decay(800, 1 / 300, 0.05, seed=7)
    trace = build(tmp_path / "t.covshift", {"bn": {"scalars": loss_rows(bn)}, "nobn": {"scalars": loss_rows(nobn)}})
    found = {c.claim: c for c in claims(analyze(trace))}
    level, b, n = 0.1, reference_steps(t, bn, 0.1), reference_steps(t, nobn, 0.1)
    assert found["faster convergence"].verdict == "supported"
    assert f"bn {int(b)}, nobn {int(n)}; {level:g} × initial loss" in found["faster convergence"].evidence
    assert found["smoother, stabler training"].verdict == "supported"
    assert "roughness" in found["smoother, stabler training"].evidence


def test_roughness_claim_is_inconclusive_when_the_shared_range_is_too_short(tmp_path):
    """bn passes nobn's whole range of loss levels in a few steps: the trace holds both losses,
    but no comparable roughness exists, so the claim is inconclusive (not "not measured")."""
    from covshift.analysis.claims import claims
    bn = np.concatenate([2.0 * 0.5 ** np.arange(12), np.full(388, 2.0 * 0.5 ** 11)])
    nobn = noisy_decay(400, 1 / 150, 0.02, seed=8)
    trace = build(tmp_path / "t.covshift", {"bn": {"scalars": loss_rows(bn)}, "nobn": {"scalars": loss_rows(nobn)}})
    b, n, used = stability.pair_roughness((np.arange(400), bn), (np.arange(400), nobn))
    assert used < stability.MIN_STEPS and math.isnan(b)
    claim = {c.claim: c for c in claims(analyze(trace))}["smoother, stabler training"]
    assert claim.verdict == "inconclusive" and not claim.per_seed
    assert f"only {used} steps in the range of loss levels both runs pass through, fewer than 20" in claim.evidence
