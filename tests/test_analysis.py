"""Tests of covshift.analysis on synthetic traces with known answers, written directly with
TraceWriter, and one end-to-end run on a trace recorded by the Tracer."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import fit
from torch import nn

import covshift
from covshift.analysis import Analysis, Finding, analyze
from covshift.store import TraceWriter


def build(path, runs: dict[str, dict]) -> covshift.Trace:
    """Write runs {name: {config, layers: [(name, type, nonlinearity, edges)], scalars, units, hists}}."""
    writer = TraceWriter(path)
    try:
        for name, spec in runs.items():
            rid = writer.add_run(name, spec.get("config", {}))
            for pos, (layer, kind, nl, edges) in enumerate(spec.get("layers", [])):
                writer.add_layer(rid, layer, kind, nl, pos, edges)
            writer.write(rid, spec.get("scalars", []), spec.get("units", []), spec.get("hists", []))
    finally:
        writer.close()
    return covshift.load(path)


def loss_rows(values, metric="loss", steps=None):
    steps = range(len(values)) if steps is None else steps
    return [(int(s), "", metric, float(v)) for s, v in zip(steps, values)]


def texts(analysis: Analysis, section: str) -> list[str]:
    return [f.text for f in analysis.findings if f.section == section]


def row(frame: pd.DataFrame, **where) -> pd.Series:
    mask = np.ones(len(frame), dtype=bool)
    for column, value in where.items():
        mask &= (frame[column] == value).to_numpy()
    assert mask.sum() == 1, (where, frame)
    return frame[mask].iloc[0]


# ----------------------------------------------------------------------- covariate shift

def test_w2_matches_gaussian_closed_form(tmp_path):
    base = np.array([0.0, 1.0, -2.0, 5.0])
    sd = np.array([1.0, 2.0, 0.5, 0.0])  # a constant unit counts with its mean shift (no per-unit division)
    drift, growth = 0.3, 0.5
    units = []
    for k, step in enumerate((0, 10, 20)):
        for u in range(4):
            units.append((step, "lin", u, base[u] + drift * k, (sd[u] * (1 + growth * k)) ** 2))
            units.append((step, "flat", u, float(k), 0.0 if step == 0 else 1.0))
    trace = build(tmp_path / "t.covshift", {"r": {
        "layers": [("lin", "Linear", None, None), ("flat", "Linear", None, None)],
        "scalars": loss_rows([1.0] * 21), "units": units}})
    shift = analyze(trace).covariate_shift
    # every unit's mean moves by drift·k and its std by growth·k·sd, so the RMS over units of
    # W2 is sqrt((drift k)² + (growth k)² mean(sd²)), over the pooled std sqrt(mean(sd²)) (1 + growth k_ref)
    pooled = math.sqrt(np.mean(sd ** 2))
    exp_10 = math.hypot(drift, growth * pooled) / pooled
    exp_20_prev = math.hypot(drift, growth * pooled) / (1.5 * pooled)
    exp_20_first = math.hypot(2 * drift, 2 * growth * pooled) / pooled
    r10, r20 = row(shift, layer="lin", step=10), row(shift, layer="lin", step=20)
    assert r10["w2_prev"] == pytest.approx(exp_10, rel=1e-12)
    assert r10["w2_first"] == pytest.approx(exp_10, rel=1e-12)
    assert r20["w2_prev"] == pytest.approx(exp_20_prev, rel=1e-12)
    assert r20["w2_first"] == pytest.approx(exp_20_first, rel=1e-12)
    assert r20["prev_step"] == 10
    assert len(shift[shift["layer"] == "lin"]) == 2  # one row per detail step after the first
    assert math.isnan(r10["w1_prev"])  # no histograms
    assert math.isnan(r10["baseline"])  # no unit_count recorded (an older trace)
    # a reference with every value exactly 0 has scale 0: NaN; a later reference with variance 1 does not
    assert math.isnan(row(shift, layer="flat", step=10)["w2_prev"])
    assert row(shift, layer="flat", step=20)["w2_prev"] == pytest.approx(1.0)
    summary = analyze(trace).shift_summary
    assert row(summary, layer="lin")["mean_w2_prev"] == pytest.approx((exp_10 + exp_20_prev) / 2)


def test_w1_histogram_shift_over_reference_std(tmp_path):
    edges = [float(e) for e in range(11)]  # 10 bins [0,1) ... [9,10], plus under- and overflow

    def hist(bins: dict[int, int]) -> np.ndarray:
        counts = np.zeros(12, dtype=np.int64)
        for b, c in bins.items():
            counts[b] = c
        return counts

    h0 = hist({1: 1, 2: 3, 3: 3, 4: 1})  # centres 0.5..3.5, mean 2
    h10 = hist({3: 1, 4: 3, 5: 3, 6: 1})  # shifted right by 2
    h20 = hist({0: 8})  # everything below the first edge: placed at 0
    hists = [(0, "h", h0), (10, "h", h10), (20, "h", h20), (0, "z", h0), (10, "z", h10)]
    scalars = loss_rows([1.0] * 21) + [(0, "h", "std", 0.5), (10, "h", "std", 2.0), (20, "h", "std", 3.0),
                                       (0, "z", "std", 0.0), (10, "z", "std", 1.0)]
    trace = build(tmp_path / "t.covshift", {"r": {
        "layers": [("h", "Tanh", "tanh", edges), ("z", "Linear", None, edges)],
        "scalars": scalars, "hists": hists}})
    shift = analyze(trace).covariate_shift
    assert row(shift, layer="h", step=10)["w1_prev"] == pytest.approx(2.0 / 0.5)
    r20 = row(shift, layer="h", step=20)
    assert r20["w1_prev"] == pytest.approx(4.0 / 2.0)  # mean 4 moved onto the edge at 0
    assert r20["w1_first"] == pytest.approx(2.0 / 0.5)
    assert math.isnan(r20["w2_prev"])  # layer without units still gets w1, but no w2
    assert math.isnan(row(shift, layer="z", step=10)["w1_prev"])  # reference std 0


# --------------------------------------------------------------------------- saturation

def test_saturation_crossing_step_and_pair_comparison(tmp_path):
    steps = range(200)
    layers = [("4", "Linear", None, None), ("5", "Sigmoid", "sigmoid", None)]
    nobn, bn = [], []
    for s in steps:
        sat = 0.1 if s < 120 else 0.95
        nobn += [(s, "5", "saturation", sat), (s, "5", "gain", 1 - sat)]
        sat_bn = 0.01 + 0.02 * s / 199
        bn += [(s, "5", "saturation", sat_bn), (s, "5", "gain", 0.9)]
    trace = build(tmp_path / "t.covshift", {
        "bn": {"config": {"variant": "bn"}, "layers": layers, "scalars": bn + loss_rows([1.0] * 200)},
        "nobn": {"config": {"variant": "nobn"}, "layers": layers, "scalars": nobn + loss_rows([1.0] * 200)}})
    a = analyze(trace)
    assert list(a.saturation["layer"]) == ["5", "5"]  # the Linear has no saturation metric
    r = row(a.saturation, run="nobn", layer="5")
    assert r["nonlinearity"] == "sigmoid"
    assert r["first_step_above_half"] == 120 and r["first_step_above_90"] == 120
    assert r["max_saturation"] == pytest.approx(0.95) and r["max_saturation_step"] == 120
    assert r["steps_above_half"] == pytest.approx(80 / 200)
    assert r["min_gain"] == pytest.approx(0.05) and r["min_gain_step"] == 120
    assert r["steps_gain_below_half"] == pytest.approx(80 / 200)
    b = row(a.saturation, run="bn", layer="5")
    assert math.isnan(b["first_step_above_half"])
    assert b["max_saturation"] == pytest.approx(0.03) and b["max_saturation_step"] == 199
    sentences = texts(a, "saturation")
    crossing = [t for t in sentences if "nobn run" in t and "most saturated" in t]
    assert len(crossing) == 1
    assert "`5` (sigmoid)" in crossing[0] and "step 120" in crossing[0] and "95%" in crossing[0]
    compare = [t for t in sentences if t.startswith("Nonlinearity 1")]
    assert compare == ["Nonlinearity 1 (Sigmoid): in the bn run `5` (sigmoid) is never over 50% saturated: it peaks "
                       "at 3% (step 199), against 95% for `5` (sigmoid) in the nobn run."]
    assert any("No layer of the bn run" in t for t in sentences)


# ------------------------------------------------------------------------- gradient flow

def test_gradient_ratio_verdict_and_worst_step(tmp_path):
    layers = [("a", "Linear", None, None), ("b", "Tanh", "tanh", None), ("c", "Linear", None, None)]

    def run(first: float, special: dict[int, float] | None = None) -> list:
        rows = []
        for s in range(10):
            a = (special or {}).get(s, first)
            rows += [(s, "a", "grad_rms", a), (s, "b", "grad_rms", 0.2), (s, "c", "grad_rms", 2.0),
                     (s, "", "grad_rms", 1e9), (s, "a", "grad_norm", 1.0)]  # no layer; not the metric used
        return rows + loss_rows([1.0] * 10)

    updates = [(1, "a", "weight.update_ratio", 1e-3), (2, "a", "weight.update_ratio", 3e-3),
               (2, "c", "weight.update_ratio", 2e-3)]
    trace = build(tmp_path / "t.covshift", {
        "van": {"layers": layers, "scalars": run(2e-3, {7: 2e-5, 3: math.nan}) + updates},
        "ok": {"layers": layers, "scalars": run(2.0)},
        "boom": {"layers": layers, "scalars": run(2e3)}})
    a = analyze(trace)
    flow = a.gradient_flow
    assert len(flow[flow["run"] == "van"]) == 9  # not step 3
    r0 = row(flow, run="van", step=0)
    assert (r0["first_layer"], r0["last_layer"]) == ("a", "c")
    assert r0["ratio"] == pytest.approx(1e-3) and r0["verdict"] == "vanishing"
    # `a` has no finite grad_rms at step 3: the flow does not move to `b`, a Tanh, that step
    assert 3 not in set(flow.loc[flow["run"] == "van", "step"])
    s = a.gradient_summary.set_index("run")
    assert s.loc["van", "median_ratio"] == pytest.approx(1e-3)
    assert s.loc["van", "verdict"] == "vanishing"
    assert s.loc["van", "worst_step"] == 7 and s.loc["van", "worst_ratio"] == pytest.approx(1e-5)
    assert s.loc["van", "median_update_ratio"] == pytest.approx(2e-3)
    assert math.isnan(s.loc["ok", "median_update_ratio"])
    assert s.loc["ok", "verdict"] == "healthy" and s.loc["ok", "median_ratio"] == pytest.approx(1.0)
    assert s.loc["boom", "verdict"] == "exploding" and s.loc["boom", "median_ratio"] == pytest.approx(1e3)
    sentences = texts(a, "gradient_flow")
    van = [t for t in sentences if "van run" in t and "first layer" in t]
    assert len(van) == 1 and "vanishing" in van[0] and "step 7" in van[0] and "`a`" in van[0]


# --------------------------------------------------------------------------- convergence

def test_convergence_levels_and_auc(tmp_path):
    t = np.arange(101)
    fast = np.maximum(0.0, 2 - t / 16)  # reaches 1 (50%) at step 16, 0 at step 32
    slow = np.maximum(1.0, 2 - t / 32)  # reaches 1 at step 32 and stays: never 10%
    trace = build(tmp_path / "t.covshift", {"fast": {"scalars": loss_rows(fast)},
                                            "slow": {"scalars": loss_rows(slow)}})
    a = analyze(trace)
    c = a.convergence.set_index("run")
    assert list(a.convergence.columns) == ["run", "initial_loss", "final_loss", "steps_to_90", "steps_to_50",
                                           "steps_to_10", "smoothing_window", "loss_auc"]
    assert (c["smoothing_window"] == 2).all()  # 2% of 101 steps, rounded
    assert c.loc["fast", "initial_loss"] == 2.0 and c.loc["fast", "final_loss"] == 0
    # the trailing mean over (s-1, s) first reaches 1.0 at step 17 (fast) and 33 (slow)
    assert c.loc["fast", "steps_to_50"] == 17 and c.loc["slow", "steps_to_50"] == 33
    assert math.isnan(c.loc["slow", "steps_to_10"])
    assert c.loc["slow", "loss_auc"] == pytest.approx((1.5 * 32 + 68) / 100)
    assert c.loc["fast", "loss_auc"] == pytest.approx(32 / 100)
    sentences = texts(a, "convergence")
    assert any("slow run" in s and "never reaches 10% of its initial loss" in s for s in sentences)


# ----------------------------------------------------------------- stability, generalization

def test_roughness_and_val_spikes(tmp_path):
    val = [1.0, 1.05, 1.3, 1.2, 1.5]  # +5%, +23.8%, -7.7%, +25%
    trace = build(tmp_path / "t.covshift", {
        "mono": {"scalars": loss_rows([4.0, 3.0, 2.0, 1.0])},
        "wobbly": {"scalars": loss_rows([3.0, 1.0, 2.0, 0.0, 0.0]) + loss_rows(val, "val_loss")},
        "flat": {"scalars": loss_rows([2.0, 2.0, 2.0])}})
    a = analyze(trace)
    s = a.stability.set_index("run")
    assert list(a.stability.columns) == ["run", "roughness", "val_spikes", "val_evaluations", "spike_steps",
                                         "spike_rule"]
    assert s.loc["wobbly", "spike_rule"] == "relative"  # no val_loss_se: the 10% rule alone
    assert s.loc["mono", "roughness"] == pytest.approx(np.std(np.diff(np.log([4.0, 3.0, 2.0, 1.0])), ddof=1))
    assert math.isnan(s.loc["wobbly", "roughness"])  # a loss of 0 has no log
    assert s.loc["flat", "roughness"] == 0.0
    assert s.loc["wobbly", "val_spikes"] == 2 and s.loc["wobbly", "spike_steps"] == [2, 4]
    assert math.isnan(s.loc["mono", "val_spikes"])
    sentences = texts(a, "stability")
    assert any("wobbly" in t and "2 of its 5 evaluations" in t and "steps 2, 4" in t
               and "no standard error recorded: the relative rule alone" in t for t in sentences)
    assert any("mono run's roughness (std of the step-to-step change of log loss)" in t for t in sentences)
    assert not any("mono run's validation" in t for t in sentences)


def test_generalization_tail_mean_and_last_val(tmp_path):
    trace = build(tmp_path / "t.covshift", {
        "r": {"scalars": loss_rows(np.arange(20.0)) + loss_rows([5.0, 30.0], "val_loss", [9, 19])
              + loss_rows([0.5, 0.75], "val_accuracy", [9, 19])},
        "noval": {"scalars": loss_rows([3.0, 2.0])}})
    a = analyze(trace)
    g = a.generalization.set_index("run")
    assert g.loc["r", "train_loss"] == pytest.approx(18.5)  # last 10% of 20 steps: 18 and 19
    assert g.loc["r", "val_loss"] == 30.0 and g.loc["r", "val_accuracy"] == 0.75
    assert g.loc["r", "gap"] == pytest.approx(11.5) and g.loc["r", "val_step"] == 19
    assert g.loc["noval", "train_loss"] == 2.0 and math.isnan(g.loc["noval", "gap"])
    sentences = texts(a, "generalization")
    assert any("r run" in t and "75%" in t and "gap 11.5" in t for t in sentences)
    assert [t for t in sentences if "noval" in t] == [
        "The noval run ends with a train loss of 2 (mean of its last 1 mini-batches)."]
    assert g.loc["noval", "train_source"] == "batches"


def test_generalization_uses_the_eval_mode_training_loss(tmp_path):
    trace = build(tmp_path / "t.covshift", {"r": {"scalars": loss_rows(np.arange(20.0))
                                                  + loss_rows([7.0, 4.0], "train_eval_loss", [9, 19])
                                                  + loss_rows([5.0, 6.0], "val_loss", [9, 19])}})
    g = analyze(trace).generalization.set_index("run").loc["r"]
    assert (g["train_loss"], g["train_source"], g["gap"]) == (4.0, "eval", 2.0)


# ---------------------------------------------------------------------------- divergence

def test_diverged_run(tmp_path):
    layers = [("<script>", "Linear", None, [0.0, 1.0]), ("b", "Tanh", "tanh", [0.0, 1.0]),
              ("c", "Linear", None, [0.0, 1.0])]
    nan = math.nan

    def scalars(losses, bad_from=None):
        rows = loss_rows(losses)
        for s in range(len(losses)):
            broken = bad_from is not None and s >= bad_from
            rows += [(s, "<script>", "nonfinite", 0.0 if s <= 2 and broken else (3.0 if broken else 0.0)),
                     (s, "b", "nonfinite", 4.0 if broken else 0.0), (s, "c", "nonfinite", 9.0 if broken else 0.0),
                     (s, "b", "saturation", nan if broken else 0.2), (s, "b", "gain", nan if broken else 0.8),
                     (s, "<script>", "grad_norm", nan if broken else 1.0),
                     (s, "c", "grad_norm", nan if broken else 1.0),
                     (s, "b", "std", nan if broken else 1.0)]
        return rows

    units = [(s, "b", u, nan if s >= 2 else 0.1 * s, nan if s >= 2 else 1.0) for s in (0, 2) for u in range(3)]
    hists = [(0, "b", np.array([0, 5, 0])), (2, "b", np.array([0, 0, 0]))]
    trace = build(tmp_path / "t.covshift", {
        "bn": {"layers": layers, "scalars": scalars([2.0, 1.0, 0.5, 0.25])},
        "nobn": {"layers": layers, "scalars": scalars([2.0, 1.5, math.inf, nan], bad_from=2),
                 "units": units, "hists": hists},
        "cfg": {"config": {"diverged_at": 5, "first_nonfinite_layer": "c"}, "scalars": loss_rows([1.0])}})
    a = analyze(trace)
    d = a.divergence.set_index("run")
    assert d.loc["nobn", "diverged_at"] == 2 and d.loc["nobn", "first_nonfinite_layer"] == "b"
    assert d.loc["cfg", "diverged_at"] == 5 and d.loc["cfg", "first_nonfinite_layer"] == "c"
    assert math.isnan(d.loc["bn", "diverged_at"])
    c = a.convergence.set_index("run")
    assert c.loc["nobn", "final_loss"] == 1.5 and c.loc["nobn", "initial_loss"] == 2.0  # the finite part
    assert math.isnan(a.stability.set_index("run").loc["nobn", "roughness"])  # 2 finite losses
    shift = row(a.covariate_shift, run="nobn", layer="b", step=2)
    assert math.isnan(shift["w2_prev"]) and math.isnan(shift["w1_prev"])
    sentences = texts(a, "divergence")
    assert "The nobn run diverged at step 2; the first non-finite output is in `b`." in sentences
    assert "The bn run did not diverge." in sentences
    assert all(isinstance(f, Finding) and f.section in covshift.analysis.SECTIONS for f in a.findings)


# -------------------------------------------------------------------- small and odd traces

def test_single_run_without_detail_steps(tmp_path):
    build(tmp_path / "t.covshift", {"solo": {
        "layers": [("0", "Linear", None, None), ("1", "ReLU", "relu", None)],
        "scalars": loss_rows([3.0, 2.0, 2.5, 1.0, 1.2])
        + [(s, layer, "grad_norm", 1.0) for s in range(5) for layer in ("0", "1")]}})
    a = analyze(str(tmp_path / "t.covshift"))  # a path works too
    assert a.runs == ["solo"]
    assert a.covariate_shift.empty and a.shift_summary.empty and a.saturation.empty
    assert texts(a, "covariate_shift") == [] and texts(a, "saturation") == []
    c = row(a.convergence, run="solo")
    assert c["initial_loss"] == 3.0 and c["final_loss"] == 1.2
    assert c["steps_to_90"] == 1 and c["steps_to_50"] == 3 and math.isnan(c["steps_to_10"])
    assert texts(a, "convergence") == [
        "The solo run starts at loss 3 and ends at 1.2 (smoothed, window 1); its smoothed loss reaches 90% of its "
        "initial loss at step 1, 50% of its initial loss at step 3; it never reaches 10% of its initial loss."]
    assert texts(a, "divergence") == [
        "The solo run did not diverge: it recorded no non-finite loss or layer output."]


def test_runs_without_data(tmp_path):
    trace = build(tmp_path / "t.covshift", {"empty": {"layers": [("0", "Linear", None, None)]},
                                            "one": {"scalars": loss_rows([math.nan])}})
    a = analyze(trace)
    assert list(a.convergence["run"]) == ["empty", "one"]
    assert a.convergence[["steps_to_90", "steps_to_50", "steps_to_10", "initial_loss"]].isna().all().all()
    assert texts(a, "convergence") == [] and texts(a, "gradient_flow") == []
    assert row(a.divergence, run="one")["diverged_at"] == 0
    assert math.isnan(row(a.divergence, run="empty")["diverged_at"])


# -------------------------------------------------------------------------- real trace

def validate(tracer, step):
    if step == 5:
        tracer.log(val_loss=1.0, val_accuracy=0.5)


def test_end_to_end_on_a_recorded_trace(tmp_path):
    path = tmp_path / "real.covshift"
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    for run, bn in (("bn", True), ("nobn", False)):
        torch.manual_seed(0)
        mid = [nn.Linear(5, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Sigmoid(), nn.Linear(8, 3)]
        model = nn.Sequential(*mid)
        fit(model, path, x, y, 6, lr=0.5, run=run, detail_every=2, config={"variant": run}, after_step=validate)
    a = analyze(path)
    assert a.runs == ["bn", "nobn"]
    assert len(a.gradient_flow) == 12 and set(a.gradient_flow["verdict"]) <= {"vanishing", "healthy", "exploding"}
    shift = a.covariate_shift
    assert sorted(shift["step"].unique()) == [2, 4]
    assert np.isfinite(shift["w1_prev"]).all() and np.isfinite(shift["w2_prev"]).all()
    # w2 of one layer and step, recomputed here from the recorded per-unit statistics
    with covshift.load(path) as trace:
        units = trace.units(run="nobn", layer="0")
    m = units.pivot(index="step", columns="unit", values="mean")
    v = units.pivot(index="step", columns="unit", values="var")
    moved = np.sqrt(np.mean((m.loc[4] - m.loc[2]) ** 2 + (np.sqrt(v.loc[4]) - np.sqrt(v.loc[2])) ** 2))
    expected = moved / max(np.sqrt(v.loc[2].mean()), 0.01 * np.sqrt((v.loc[2] + m.loc[2] ** 2).mean()))
    assert row(shift, run="nobn", layer="0", step=4)["w2_prev"] == pytest.approx(expected)
    assert row(shift, run="nobn", layer="0", step=4)["baseline"] == pytest.approx(math.sqrt(3 / 32))  # batch 32
    assert set(a.saturation["nonlinearity"]) == {"sigmoid"}
    sections = {f.section for f in a.findings}
    assert {"convergence", "stability", "generalization", "saturation", "gradient_flow", "covariate_shift",
            "divergence"} <= sections
    shift_texts = texts(a, "covariate_shift")
    # the only nonlinearity input: BatchNorm's output in bn, the Linear's in nobn; never the logits
    assert sum(t.startswith("Over the 1 matched nonlinearity input,") for t in shift_texts) == 1
    assert [f.layer for f in a.findings_for("covariate_shift") if f.run] == ["1", "0"]


def test_relu_layers_are_not_ranked_as_saturated(tmp_path):
    """ReLU behind BatchNorm is ~50% inactive by design: the ranking names the sigmoid."""
    rows = loss_rows([1.0] * 4)
    for step in range(4):
        rows += [(step, "r", "saturation", 0.6), (step, "r", "gain", 0.4),
                 (step, "s", "saturation", 0.2), (step, "s", "gain", 0.7)]
    trace = build(tmp_path / "t.covshift", {"bn": {
        "layers": [("r", "ReLU", "relu", None), ("s", "Sigmoid", "sigmoid", None)], "scalars": rows}})
    a = analyze(trace)
    assert set(a.saturation["layer"]) == {"r", "s"}  # both stay in the table
    sentences = texts(a, "saturation")
    assert sentences and all("`r`" not in t for t in sentences)
    assert any("most saturated is `s` (sigmoid) at 20%" in t for t in sentences)
