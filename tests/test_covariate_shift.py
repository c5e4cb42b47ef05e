"""Tests of the distributional covariate shift (covshift.analysis.covariate_shift): w2 on a
layer-level scale with a floor, its sampling-noise baseline, the restriction to the inputs of
the nonlinearities and the claim built on it. Every expected value is computed here with numpy
from the distributions written into the trace."""

from __future__ import annotations

import math

import numpy as np
import pytest

import covshift
from covshift.analysis import analyze
from covshift.analysis.claims import claims
from covshift.store import TraceWriter

CLAIM = "reduced internal covariate shift (distributional)"
STEPS = (0, 10, 20, 30)
BN_LAYERS = [("0", "Linear", None), ("1", "BatchNorm1d", None), ("2", "Tanh", "tanh"), ("3", "Linear", None)]
NOBN_LAYERS = [("0", "Linear", None), ("1", "Tanh", "tanh"), ("2", "Linear", None)]


def write(path, runs: dict[str, dict]):
    """Runs {name: {config, layers: [(name, type, nonlinearity)], units: {layer: [(mean, var) per step]},
    counts: {layer: n or [n per step]}}} with a training loss that falls to a tenth."""
    writer = TraceWriter(path)
    try:
        for name, spec in runs.items():
            rid = writer.add_run(name, spec.get("config", {}))
            for pos, (layer, kind, nl) in enumerate(spec["layers"]):
                writer.add_layer(rid, layer, kind, nl, pos, None)
            loss = 2.3 * np.exp(-np.arange(200) / 20) + 0.01
            rows = [(s, "", "loss", float(v)) for s, v in enumerate(loss)]
            units = []
            for layer, per_step in spec["units"].items():
                counts = spec.get("counts", {}).get(layer)
                for k, (step, (mean, var)) in enumerate(zip(spec.get("steps", STEPS), per_step)):
                    units += [(step, layer, u, float(m), float(v)) for u, (m, v) in enumerate(zip(mean, var))]
                    if counts is not None:
                        n = counts[k] if isinstance(counts, list) else counts
                        rows.append((step, layer, "unit_count", float(n)))
            writer.write(rid, rows, units, [])
    finally:
        writer.close()
    return covshift.load(path)


def reference_w2(m_t, v_t, m_r, v_r, floor=0.01) -> float:
    """sqrt of the mean over units of the squared Gaussian W2, over the layer's pooled std
    at the reference, floored at 1% of its RMS value (a plain loop over units)."""
    total = 0.0
    for a, b, c, d in zip(m_t, v_t, m_r, v_r):
        total += (a - c) ** 2 + (math.sqrt(b) - math.sqrt(d)) ** 2
    pooled = math.sqrt(sum(v_r) / len(v_r))
    rms = math.sqrt(sum(v + m * m for m, v in zip(m_r, v_r)) / len(v_r))
    return math.sqrt(total / len(v_r)) / max(pooled, floor * rms)


def row(frame, **where):
    mask = np.ones(len(frame), dtype=bool)
    for column, value in where.items():
        mask &= (frame[column] == value).to_numpy()
    assert mask.sum() == 1, (where, frame)
    return frame[mask].iloc[0]


# ------------------------------------------------------------------------------ measure

def test_w2_matches_an_independent_reference_on_heterogeneous_units(tmp_path):
    rng = np.random.default_rng(1)
    per_step = [(rng.normal(0, 2, 12), rng.uniform(0.01, 4.0, 12)) for _ in STEPS]
    shift = analyze(write(tmp_path / "t.covshift", {"r": {"layers": [("h", "Linear", None)],
                                                          "units": {"h": per_step}}})).covariate_shift
    for k in range(1, len(STEPS)):
        r = row(shift, layer="h", step=STEPS[k])
        assert r["w2_prev"] == pytest.approx(reference_w2(*per_step[k], *per_step[k - 1]), rel=1e-12)
        assert r["w2_first"] == pytest.approx(reference_w2(*per_step[k], *per_step[0]), rel=1e-12)


def test_scale_floor_keeps_a_near_constant_layer_bounded(tmp_path):
    """A layer near 5 with a per-unit std of 1e-5 whose means move by 1e-3: per-unit scaling
    gives 100 reference stds, the floored layer scale (1% of the RMS value 5) gives 0.02."""
    means = np.full(6, 5.0)
    quiet = [(means + 1e-3 * k, np.full(6, 1e-10)) for k in range(len(STEPS))]
    shift = analyze(write(tmp_path / "t.covshift", {"r": {"layers": [("c", "Linear", None)],
                                                          "units": {"c": quiet}}})).covariate_shift
    w2 = row(shift, layer="c", step=10)["w2_prev"]
    per_unit = np.median(np.abs(1e-3) / np.sqrt(quiet[0][1]))
    assert per_unit == pytest.approx(100.0)  # what the old per-unit measure gave
    assert w2 == pytest.approx(1e-3 / (0.01 * math.sqrt(25 + 1e-10)), rel=1e-9)
    assert w2 == pytest.approx(reference_w2(*quiet[1], *quiet[0]), rel=1e-12)


@pytest.mark.parametrize("counts", [200, [100, 300] * 20], ids=["equal", "alternating"])
def test_baseline_is_the_sampling_noise_of_w2(tmp_path, counts):
    """Independent batches drawn from the same Gaussians at every detail step: w2 is sampling
    noise alone, and its mean over steps is close to sqrt(1.5 (1/n_t + 1/n_r)) (sqrt(3/n)
    for equal counts), the recorded baseline."""
    rng = np.random.default_rng(7)
    units, steps = 60, list(range(0, 400, 10))
    mu, sigma = rng.normal(0, 3, units), rng.uniform(0.5, 2.0, units)
    sizes = counts if isinstance(counts, list) else [counts] * len(steps)
    per_step = []
    for n in sizes:
        x = rng.normal(mu, sigma, size=(n, units))
        per_step.append((x.mean(axis=0), x.var(axis=0)))
    trace = write(tmp_path / "t.covshift", {"r": {"layers": [("h", "Linear", None)], "steps": steps,
                                                  "units": {"h": per_step}, "counts": {"h": counts}}})
    shift = analyze(trace).covariate_shift
    expected = [math.sqrt(1.5 * (1 / a + 1 / b)) for a, b in zip(sizes[1:], sizes[:-1])]
    np.testing.assert_allclose(shift.sort_values("step")["baseline"], expected, rtol=1e-12)
    if not isinstance(counts, list):
        assert expected[0] == pytest.approx(math.sqrt(3 / 200))
    assert shift["w2_prev"].mean() == pytest.approx(np.mean(expected), rel=0.06)
    summary = analyze(trace).shift_summary
    assert row(summary, layer="h")["mean_baseline"] == pytest.approx(np.mean(expected))


def test_a_shifted_distribution_against_numpy(tmp_path):
    """Samples of a unit-wise shifted and rescaled Gaussian: w2 from the recorded moments
    equals the reference computed from the same samples, and is near the population value."""
    rng = np.random.default_rng(3)
    units, n = 40, 20000
    mu, sigma = rng.normal(0, 1, units), rng.uniform(0.5, 1.5, units)
    delta, factor = rng.normal(0.4, 0.1, units), rng.uniform(1.1, 1.5, units)
    before = rng.normal(mu, sigma, size=(n, units))
    after = rng.normal(mu + delta, sigma * factor, size=(n, units))
    stats = [(x.mean(axis=0), x.var(axis=0)) for x in (before, after)]
    trace = write(tmp_path / "t.covshift", {"r": {"layers": [("h", "Linear", None)], "steps": (0, 10),
                                                  "units": {"h": stats}, "counts": {"h": n}}})
    got = row(analyze(trace).covariate_shift, layer="h", step=10)
    assert got["w2_prev"] == pytest.approx(reference_w2(*stats[1], *stats[0]), rel=1e-12)
    population = math.sqrt(np.mean(delta ** 2 + (sigma * (factor - 1)) ** 2) / np.mean(sigma ** 2))
    assert got["w2_prev"] == pytest.approx(population, rel=0.03)
    assert got["w2_prev"] > 10 * got["baseline"]


# ------------------------------------------------------------------- findings and claim

def normalised(k: int, units: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A BatchNorm-like output: per-unit mean and variance held near 0 and 1."""
    return np.full(units, 0.002 * k), np.full(units, 1.0 + 0.002 * k)


def drifting(k: int, rate: float, units: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Pre-activations whose means move by ``rate`` per detail step and whose std grows."""
    return np.linspace(-1, 1, units) + rate * k, (np.linspace(0.5, 1.5, units) * (1 + 0.5 * rate * k)) ** 2


def logits(k: int, units: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Near-constant output logits that move: huge in per-unit stds, never compared."""
    return np.full(units, 50.0 * k), np.full(units, 1e-6)


def pair(seed: int, bn_units, nobn_units, count: int = 1000) -> dict[str, dict]:
    layers = {"bn": BN_LAYERS, "nobn": NOBN_LAYERS}
    found = {}
    for variant, per_layer in (("bn", bn_units), ("nobn", nobn_units)):
        found[f"{variant} seed={seed}"] = {
            "config": {"variant": variant, "seed": seed}, "layers": layers[variant],
            "units": {layer: [f(k) for k in range(len(STEPS))] for layer, f in per_layer.items()},
            "counts": {layer: count for layer in per_layer}}
    return found


def expected_mean_w2(f) -> float:
    values = [f(k) for k in range(len(STEPS))]
    return float(np.mean([reference_w2(*values[k], *values[k - 1]) for k in range(1, len(STEPS))]))


def test_bn_like_inputs_shift_less_than_drifting_ones_and_logits_are_left_out(tmp_path):
    """Positive case: bn's nonlinearity input (BatchNorm's output) is held normalised, nobn's
    (the Linear's output) drifts; both runs' logits move far more, and must not count."""
    runs = {}
    for seed in range(3):
        drift = lambda k, s=seed: drifting(k, 0.3 + 0.05 * s)  # noqa: E731
        runs |= pair(seed, {"0": drift, "1": normalised, "3": logits}, {"0": drift, "2": logits})
    a = analyze(write(tmp_path / "t.covshift", runs))
    c = {x.claim: x for x in claims(a)}[CLAIM]
    expected = [expected_mean_w2(normalised) / expected_mean_w2(lambda k, s=s: drifting(k, 0.3 + 0.05 * s))
                for s in range(3)]
    assert c.per_seed == pytest.approx(expected, rel=1e-9)
    assert c.verdict == "supported" and c.seeds == 3
    assert "1 nonlinearity inputs" in c.evidence and "the sampling-noise baseline" in c.evidence
    # the per-run total and the findings use the nonlinearity inputs only
    total = row(a.shift_summary, run="nobn seed=0", layer="")
    assert total["mean_w2_prev"] == pytest.approx(row(a.shift_summary, run="nobn seed=0", layer="0")["mean_w2_prev"])
    runs_found = [f for f in a.findings_for("covariate_shift") if f.run]
    assert {f.layer for f in runs_found} == {"0", "1"}  # never the logits "2" / "3"
    baseline = math.sqrt(3 / 1000)
    nobn = next(f for f in runs_found if f.run == "nobn seed=0")
    assert f"{expected_mean_w2(lambda k: drifting(k, 0.3)) / baseline:.3g} times the sampling-noise baseline " \
           f"{baseline:.3g}" in nobn.text


def test_identical_runs_have_equal_shifts_and_no_supported_claim(tmp_path):
    """Null case: bn and nobn identical in structure and statistics."""
    runs = {}
    for seed in range(3):
        drift = lambda k, s=seed: drifting(k, 0.2 + 0.1 * s)  # noqa: E731
        for variant in ("bn", "nobn"):
            runs[f"{variant} seed={seed}"] = {
                "config": {"variant": variant, "seed": seed}, "layers": NOBN_LAYERS,
                "units": {"0": [drift(k) for k in range(len(STEPS))]}, "counts": {"0": 1000}}
    a = analyze(write(tmp_path / "t.covshift", runs))
    c = {x.claim: x for x in claims(a)}[CLAIM]
    assert c.per_seed == pytest.approx([1.0, 1.0, 1.0], rel=1e-12)
    assert c.verdict != "supported"


def test_shifts_within_noise_make_the_claim_inconclusive(tmp_path):
    """nobn's input drifts by about its sampling noise: a ratio of noises decides nothing."""
    baseline = math.sqrt(3 / 100)
    slow = lambda k: drifting(k, 0.5 * baseline)  # noqa: E731
    a = analyze(write(tmp_path / "t.covshift", pair(0, {"1": normalised}, {"0": slow}, count=100)))
    c = {x.claim: x for x in claims(a)}[CLAIM]
    assert expected_mean_w2(slow) < 2 * baseline and c.per_seed[0] < 0.9  # bn alone would look reduced
    assert c.verdict == "inconclusive"
    assert "inconclusive: both runs' shifts are within 2× the sampling-noise baseline" in c.evidence
    assert f"nobn {expected_mean_w2(slow) / baseline:.3g}×" in c.evidence
    # with three seeds, one of them within noise still keeps the claim from being decided
    runs = pair(0, {"1": normalised}, {"0": slow}, count=100)
    for seed in (1, 2):
        runs |= pair(seed, {"1": normalised}, {"0": lambda k: drifting(k, 0.5)}, count=100)
    c = {x.claim: x for x in claims(analyze(write(tmp_path / "three.covshift", runs)))}[CLAIM]
    assert c.verdict == "inconclusive" and c.evidence.endswith("in 1 of 3 seeds")


def test_a_trace_without_unit_count_still_decides_and_says_so(tmp_path):
    runs = pair(0, {"1": normalised}, {"0": lambda k: drifting(k, 0.5)})
    for spec in runs.values():
        spec.pop("counts")
    a = analyze(write(tmp_path / "t.covshift", runs))
    assert a.covariate_shift["baseline"].isna().all() and a.shift_summary["mean_baseline"].isna().all()
    c = {x.claim: x for x in claims(a)}[CLAIM]
    assert c.label == "supported (1 seed)" and "no sampling-noise baseline" in c.evidence
