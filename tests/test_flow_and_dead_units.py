"""Gradient flow on matched Linear/Conv roles and the dead units of ReLU layers, on synthetic
traces whose answers are recomputed here with numpy and pandas."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from test_analysis import build, loss_rows, row, texts

from covshift.analysis import analyze, gradient_flow, saturation

STEPS = 12


def grads(layers: list[tuple], rms: dict[str, np.ndarray]) -> list[tuple]:
    """grad_rms rows from ``rms`` and, for every layer, a grad_norm the flow must not read."""
    rows = []
    for layer, *_ in layers:
        for s in range(STEPS):
            if layer in rms:
                rows.append((s, layer, "grad_rms", float(rms[layer][s])))
            rows.append((s, layer, "grad_norm", 1e6 * (s + 1)))
    return rows + loss_rows([1.0] * STEPS)


def expected_flow(rms: dict[str, np.ndarray], first: str, last: str, layers: int) -> tuple[np.ndarray, float, float]:
    ratio = rms[first] / rms[last]
    median = float(np.median(ratio))
    return ratio, median, median ** (1 / (layers - 1))


# ------------------------------------------------------------------------- gradient flow

def test_ratio_and_per_layer_factor_over_weighted_layers(tmp_path):
    rng = np.random.default_rng(1)
    layers = [("0", "Linear", None, None), ("1", "ReLU", "relu", None), ("2", "Conv2d", None, None),
              ("3", "Tanh", "tanh", None), ("4", "Linear", None, None), ("5", "Softmax", None, None)]
    rms = {name: rng.uniform(0.01, 1.0, STEPS) for name, *_ in layers}
    trace = build(tmp_path / "t.covshift", {"solo": {"layers": layers, "scalars": grads(layers, rms)}})
    a = analyze(trace)
    ratio, median, factor = expected_flow(rms, "0", "4", 3)  # the Softmax after the head is no weighted layer
    flow = a.gradient_flow.sort_values("step")
    assert set(flow["first_layer"]) == {"0"} and set(flow["last_layer"]) == {"4"} and set(flow["layers"]) == {3}
    np.testing.assert_allclose(flow["ratio"].to_numpy(dtype=float), ratio)
    np.testing.assert_allclose(flow["per_layer"].to_numpy(dtype=float), np.sqrt(ratio))
    s = row(a.gradient_summary, run="solo")
    assert s["median_ratio"] == pytest.approx(median) and s["per_layer"] == pytest.approx(factor)
    worst = int(np.argmax(np.abs(np.log10(ratio))))
    assert s["worst_step"] == worst and s["worst_ratio"] == pytest.approx(ratio[worst])
    assert s["verdict"] == ("vanishing" if median < 0.1 else "exploding" if median > 10 else "healthy")


def test_a_45_fold_attenuation_is_vanishing(tmp_path):
    assert (gradient_flow.VANISHING, gradient_flow.EXPLODING) == (0.1, 10.0)
    assert gradient_flow.verdict(1 / 45) == "vanishing" and gradient_flow.verdict(45) == "exploding"
    assert gradient_flow.verdict(0.1) == "healthy" and gradient_flow.verdict(0.099) == "vanishing"
    assert gradient_flow.verdict(10.0) == "healthy" and gradient_flow.verdict(10.01) == "exploding"
    assert gradient_flow.verdict(math.nan) is None
    assert gradient_flow.describe(1 / 45) == "attenuates 45×" and gradient_flow.describe(3.0) == "grows 3×"
    assert gradient_flow.describe(1e-4) == "attenuates 10,000×"
    layers = [("a", "Linear", None, None), ("b", "Sigmoid", "sigmoid", None), ("c", "Linear", None, None),
              ("d", "Sigmoid", "sigmoid", None), ("e", "Linear", None, None)]
    rms = {"a": np.full(STEPS, 2.0 / 45), "b": np.full(STEPS, 1.0), "c": np.full(STEPS, 0.3),
           "e": np.full(STEPS, 2.0)}
    a = analyze(build(tmp_path / "t.covshift", {"solo": {"layers": layers, "scalars": grads(layers, rms)}}))
    s = row(a.gradient_summary, run="solo")
    assert s["median_ratio"] == pytest.approx(1 / 45) and s["verdict"] == "vanishing"
    assert s["per_layer"] == pytest.approx(45 ** -0.5)
    (text,) = texts(a, "gradient_flow")
    assert text.startswith("In the solo run the gradient (rms of ∂L/∂y, median over 12 steps) attenuates 45× over "
                           "3 Linear/Conv layers (6.71× per layer) from the last, `e`, to the first, `a`: first/last "
                           "ratio 0.0222, vanishing (below 0.1: the first layer gets less than a tenth of the last "
                           "layer's gradient).")


BN = [("0", "Linear", None, None), ("1", "BatchNorm1d", None, None), ("2", "Tanh", "tanh", None),
      ("3", "Linear", None, None), ("4", "BatchNorm1d", None, None), ("5", "Tanh", "tanh", None),
      ("6", "Linear", None, None), ("7", "BatchNorm1d", None, None)]
NOBN = [("0", "Linear", None, None), ("1", "Tanh", "tanh", None), ("2", "Linear", None, None),
        ("3", "Tanh", "tanh", None), ("4", "Linear", None, None)]


def test_bn_and_nobn_flows_compare_the_first_and_last_linear_layers(tmp_path):
    rng = np.random.default_rng(2)
    bn = {name: rng.uniform(0.5, 1.0, STEPS) for name, *_ in BN}
    nobn = {name: rng.uniform(0.5, 1.0, STEPS) for name, *_ in NOBN}
    nobn["0"] = nobn["0"] / 45  # nobn's first Linear gets far less
    trace = build(tmp_path / "t.covshift", {
        "bn": {"config": {"variant": "bn"}, "layers": BN, "scalars": grads(BN, bn)},
        "nobn": {"config": {"variant": "nobn"}, "layers": NOBN, "scalars": grads(NOBN, nobn)}})
    a = analyze(trace)
    s = a.gradient_summary.set_index("run")
    # bn's last recorded layer is a BatchNorm and its layer 4 is a BatchNorm: neither is compared
    assert (s.loc["bn", "first_layer"], s.loc["bn", "last_layer"]) == ("0", "6")
    assert (s.loc["nobn", "first_layer"], s.loc["nobn", "last_layer"]) == ("0", "4")
    _, m_bn, f_bn = expected_flow(bn, "0", "6", 3)
    _, m_nobn, f_nobn = expected_flow(nobn, "0", "4", 3)
    assert s.loc["bn", "median_ratio"] == pytest.approx(m_bn) and s.loc["bn", "per_layer"] == pytest.approx(f_bn)
    assert s.loc["nobn", "median_ratio"] == pytest.approx(m_nobn)
    (compare,) = [t for t in texts(a, "gradient_flow") if t.startswith("Gradient flow on matched roles")]
    assert compare.startswith("Gradient flow on matched roles, Linear/Conv 1 against Linear/Conv 3: in the bn run it ")
    factor = m_bn / m_nobn
    assert factor > gradient_flow.DIFFERENCE
    assert (f"The first Linear/Conv layer of the bn run gets {factor:.3g}× more of its last layer's gradient than "
            "that of the nobn run.") in compare


def test_flows_with_different_weighted_layers_are_not_compared(tmp_path):
    short = NOBN[:3]  # two Linear layers against bn's three
    rms = {name: np.full(STEPS, 1.0) for name, *_ in BN}
    trace = build(tmp_path / "t.covshift", {
        "bn": {"config": {"variant": "bn"}, "layers": BN, "scalars": grads(BN, rms)},
        "nobn": {"config": {"variant": "nobn"}, "layers": short, "scalars": grads(short, rms)}})
    sentences = texts(analyze(trace), "gradient_flow")
    assert any(t.startswith("The gradient flow of the bn and nobn runs is not compared") for t in sentences)
    assert not any(t.startswith("Gradient flow on matched roles") for t in sentences)


# ---------------------------------------------------------------------------- dead units

def relu_rows(layer: str, dead: np.ndarray, sat: float = 0.5) -> list[tuple]:
    return [(s, layer, "dead", float(d)) for s, d in enumerate(dead)] + \
           [(s, layer, "saturation", sat) for s in range(len(dead))]


def unit_rows(layer: str, units: int) -> list[tuple]:
    return [(s, layer, u, 0.0, 1.0) for s in (0, 6) for u in range(units)]


def test_dead_fraction_against_pandas(tmp_path):
    dead = np.array([0, 1, 3, 2, 0, 1, 1, 0, 2, 1, 0, 1])
    layers = [("0", "Linear", None, None), ("1", "ReLU", "relu", None)]
    trace = build(tmp_path / "t.covshift", {
        "solo": {"layers": layers, "scalars": relu_rows("1", dead) + loss_rows([1.0] * STEPS),
                 "units": unit_rows("1", 8)},
        "bare": {"layers": layers, "scalars": relu_rows("1", dead) + loss_rows([1.0] * STEPS)}})
    a = analyze(trace)
    frame = pd.DataFrame({"step": np.arange(STEPS), "fraction": dead / 8})
    r = row(a.saturation, run="solo", layer="1")
    assert r["units"] == 8
    assert r["dead_fraction_mean"] == pytest.approx(frame["fraction"].mean())
    assert r["dead_fraction_max"] == pytest.approx(frame["fraction"].max())
    assert r["dead_fraction_max_step"] == frame.loc[frame["fraction"].idxmax(), "step"] == 2
    bare = row(a.saturation, run="bare", layer="1")  # no per-unit rows: the unit count is unknown
    assert math.isnan(bare["units"]) and math.isnan(bare["dead_fraction_max"])
    sentences = texts(a, "saturation")
    assert ("`1` (relu) of the solo run has dead units (output ≤ 0 on every element of a step): up to 37.5% of its 8 "
            "units dead (step 2), 12.5% on average over its recorded steps.") in sentences
    assert not any("bare run" in t for t in sentences)


def test_few_dead_units_are_said_to_be_few(tmp_path):
    layers = [("0", "Linear", None, None), ("1", "ReLU", "relu", None)]
    dead = np.zeros(STEPS)
    dead[4] = 1  # 1 of 20: below DEAD
    trace = build(tmp_path / "t.covshift", {"solo": {
        "layers": layers, "scalars": relu_rows("1", dead) + loss_rows([1.0] * STEPS), "units": unit_rows("1", 20)}})
    assert 1 / 20 < saturation.DEAD
    assert texts(analyze(trace), "saturation") == [
        "No ReLU-family layer of the solo run ever has more than 10% dead units (the most: `1` (relu), 5%)."]


RELU_BN = [("0", "Linear", None, None), ("1", "BatchNorm1d", None, None), ("2", "ReLU", "relu", None),
           ("3", "Linear", None, None)]
RELU_NOBN = [("0", "Linear", None, None), ("1", "ReLU", "relu", None), ("2", "Linear", None, None)]


def test_dead_units_compared_by_role_not_by_name(tmp_path):
    dead_nobn = np.array([0, 2, 4, 6, 8, 8, 8, 8, 8, 8, 8, 8])
    dead_bn = np.array([0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    trace = build(tmp_path / "t.covshift", {
        "bn": {"config": {"variant": "bn"}, "layers": RELU_BN, "units": unit_rows("2", 16),
               "scalars": relu_rows("2", dead_bn) + loss_rows([1.0] * STEPS)},
        "nobn": {"config": {"variant": "nobn"}, "layers": RELU_NOBN, "units": unit_rows("1", 16),
                 "scalars": relu_rows("1", dead_nobn) + loss_rows([1.0] * STEPS)}})
    a = analyze(trace)
    nobn_mean, bn_mean = (dead_nobn / 16).mean(), (dead_bn / 16).mean()
    (compare,) = [t for t in texts(a, "saturation") if t.startswith("Nonlinearity 1")]
    # the nobn ReLU `1` is matched with bn's ReLU `2`, not with bn's BatchNorm `1`
    assert compare == (
        f"Nonlinearity 1 (ReLU): in the bn run `2` (relu) has up to 6.25% of its 16 units dead (step 2), "
        f"{100 * bn_mean:.3g}% on average, against up to 50% of its 16 units dead (step 4), "
        f"{100 * nobn_mean:.3g}% on average for `1` (relu) in the nobn run.")
    # saturation of a ReLU (its inactive fraction) is still not compared
    assert not any("saturated" in t for t in texts(a, "saturation"))


# ------------------------------------------------------------------------------ null case

def test_identical_runs_claim_no_difference(tmp_path):
    rng = np.random.default_rng(3)
    layers = [("0", "Linear", None, None), ("1", "ReLU", "relu", None), ("2", "Linear", None, None),
              ("3", "Sigmoid", "sigmoid", None), ("4", "Linear", None, None)]
    rms = {name: rng.uniform(0.01, 1.0, STEPS) for name, *_ in layers}
    dead = rng.integers(2, 6, STEPS)
    sat = rng.uniform(0.3, 0.9, STEPS)
    scalars = grads(layers, rms) + relu_rows("1", dead) + [(s, "3", "saturation", float(v)) for s, v in enumerate(sat)]
    spec = {"layers": layers, "scalars": scalars, "units": unit_rows("1", 8)}
    a = analyze(build(tmp_path / "t.covshift", {"bn": {"config": {"variant": "bn"}, **spec},
                                                "nobn": {"config": {"variant": "nobn"}, **spec}}))
    s = a.gradient_summary.set_index("run")
    assert s.loc["bn", "median_ratio"] == s.loc["nobn", "median_ratio"]
    (compare,) = [t for t in texts(a, "gradient_flow") if t.startswith("Gradient flow on matched roles")]
    assert compare.endswith("The two ratios are within a factor 2 of each other.") and "more of its" not in compare
    sat_table = a.saturation.set_index(["run", "layer"])
    assert sat_table.loc[("bn", "1")].equals(sat_table.loc[("nobn", "1")])
    compares = [t for t in texts(a, "saturation") if t.startswith("Nonlinearity")]  # the same numbers on both sides
    assert len(compares) == 2
    peak = f"{100 * sat.max():.3g}%"
    assert f"peaks at {peak}" in compares[0] and f"against {peak}" in compares[0]
    frac = f"up to {100 * dead.max() / 8:.3g}%"
    assert compares[1].count(frac) == 2


def test_a_zero_gradient_at_the_first_layer_is_said_in_words(tmp_path):
    rms = {name: np.full(STEPS, 1.0) for name, *_ in NOBN}
    zero = dict(rms, **{"0": np.zeros(STEPS)})
    trace = build(tmp_path / "t.covshift", {
        "bn": {"config": {"variant": "bn"}, "layers": NOBN, "scalars": grads(NOBN, rms)},
        "nobn": {"config": {"variant": "nobn"}, "layers": NOBN, "scalars": grads(NOBN, zero)}})
    a = analyze(trace)
    s = a.gradient_summary.set_index("run")
    assert s.loc["nobn", "median_ratio"] == 0 and s.loc["nobn", "verdict"] == "vanishing"
    (compare,) = [t for t in texts(a, "gradient_flow") if t.startswith("Gradient flow on matched roles")]
    assert "in the nobn run it is zero at the first layer, vanishing." in compare
    assert "more of its" not in compare and "within a factor" not in compare
