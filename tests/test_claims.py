"""Tests of the verdict rules (covshift.analysis.claims), run outcomes, role pairing and the
intervals, against computations written out here with numpy/scipy."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from typer.testing import CliRunner

import covshift
from covshift.analysis import analyze
from covshift.analysis.claims import CLAIMS, MARGIN, VERDICTS, Claim, claims, disagreement
from covshift.analysis.intervals import accuracy_se, mean_interval
from covshift.analysis.outcomes import classify
from covshift.analysis.pairing import pairs
from covshift.cli import app
from covshift.store import TraceWriter

ROOT = Path(__file__).resolve().parents[1]


def write_pairs(path, curves: dict[tuple[str, int], np.ndarray], accuracy: dict[tuple[str, int], float] | None = None):
    """A trace with runs "<variant> seed=<s>" holding the given loss curves."""
    writer = TraceWriter(path)
    try:
        for (variant, seed), loss in curves.items():
            rid = writer.add_run(f"{variant} seed={seed}", {"variant": variant, "seed": seed, "val_examples": 400,
                                                           "chance_accuracy": 0.1})
            rows = [(s, "", "loss", float(v)) for s, v in enumerate(loss)]
            if accuracy:
                rows.append((len(loss) - 1, "", "val_accuracy", accuracy[(variant, seed)]))
            writer.write(rid, rows, [], [])
    finally:
        writer.close()
    return covshift.load(path)


def decay(tau: float, seed: int, n: int = 400) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, 0.02, n)
    return 2.3 * np.exp(-np.arange(n) / tau) * np.exp(noise) + 0.01


def steps_to(loss: np.ndarray, fraction: float) -> float:
    """Reference: first step whose trailing mean (2% window) is ≤ fraction × the first loss."""
    w = max(1, round(0.02 * len(loss)))
    smooth = pd.Series(loss).rolling(w, min_periods=1).mean().to_numpy()
    hit = np.flatnonzero(smooth <= fraction * loss[0])
    return float(hit[0]) if hit.size else math.nan


def by_claim(found):
    return {c.claim: c for c in found}


def test_mean_interval_and_accuracy_se_match_scipy():
    x = np.array([0.2, -0.1, 0.4, 0.05])
    half = stats.t.ppf(0.975, 3) * x.std(ddof=1) / 2
    assert mean_interval(x) == pytest.approx((x.mean() - half, x.mean(), x.mean() + half))
    assert mean_interval([0.3]) == (0.3, 0.3, 0.3)
    assert all(math.isnan(v) for v in mean_interval([math.nan]))
    assert accuracy_se(0.9, 400) == pytest.approx(math.sqrt(0.9 * 0.1 / 400))


def test_classify_rule():
    assert classify(True, 0.9) == "diverged"
    assert classify(False, 0.05) == "did not train"
    assert classify(False, 0.6) == "trained"
    # the nobn run of a failing example: 27% removed, accuracy near chance while bn reached 95%
    assert classify(False, 0.27, 0.30, 0.10, 0.97, 0.95) == "did not train"
    assert classify(False, 0.27, 0.80, 0.10, 0.97, 0.95) == "trained"
    # no accuracy (a language model): judged against the best run of its group
    assert classify(False, 0.30, best_removed=0.40) == "trained"
    assert classify(False, 0.15, best_removed=0.40) == "did not train"


def test_faster_convergence_over_seeds_with_interval(tmp_path):
    seeds = [0, 1, 2]
    curves = {}
    for s in seeds:
        curves[("bn", s)] = decay(15 + 3 * s, s)
        curves[("nobn", s)] = decay(60 + 5 * s, 10 + s)
    a = analyze(write_pairs(tmp_path / "t.covshift", curves))
    assert (a.outcomes["outcome"] == "trained").all()
    c = by_claim(claims(a))["faster convergence"]
    # the deepest level both reach, then the ratio of steps per seed, mean of logs and t-interval
    ratios = []
    for s in seeds:
        level = next(f for f in (0.1, 0.5, 0.9) if not math.isnan(steps_to(curves[("bn", s)], f))
                     and not math.isnan(steps_to(curves[("nobn", s)], f)))
        ratios.append(max(steps_to(curves[("bn", s)], level), 1) / max(steps_to(curves[("nobn", s)], level), 1))
    logs = np.log(ratios)
    half = stats.t.ppf(0.975, 2) * logs.std(ddof=1) / math.sqrt(3)
    assert c.per_seed == pytest.approx(ratios)
    assert (c.low, c.mean, c.high) == pytest.approx(tuple(np.exp([logs.mean() - half, logs.mean(),
                                                                   logs.mean() + half])))
    assert c.verdict == "supported" and c.seeds == 3 and c.high <= 1 - MARGIN
    assert "95% interval" in c.evidence


def test_one_seed_is_labelled_and_seeds_that_disagree_are_inconclusive(tmp_path):
    one = analyze(write_pairs(tmp_path / "one.covshift", {("bn", 0): decay(15, 0), ("nobn", 0): decay(60, 1)}))
    c = by_claim(claims(one))["faster convergence"]
    assert c.label == "supported (1 seed)"
    mixed = {("bn", 0): decay(15, 0), ("nobn", 0): decay(60, 1), ("bn", 1): decay(60, 2), ("nobn", 1): decay(15, 3)}
    c = by_claim(claims(analyze(write_pairs(tmp_path / "mixed.covshift", mixed))))["faster convergence"]
    assert c.verdict == "inconclusive" and c.seeds == 2


def test_a_run_that_did_not_train_is_not_compared(tmp_path):
    flat = np.full(400, 2.3) + np.random.default_rng(5).normal(0, 0.01, 400)
    curves = {("bn", s): decay(15, s) for s in (0, 1)} | {("nobn", s): flat for s in (0, 1)}
    acc = {("bn", s): 0.95 for s in (0, 1)} | {("nobn", s): 0.09 for s in (0, 1)}
    a = analyze(write_pairs(tmp_path / "t.covshift", curves, acc))
    assert dict(zip(a.outcomes["run"], a.outcomes["outcome"])) == {
            "bn seed=0": "trained", "bn seed=1": "trained", "nobn seed=0": "did not train",
            "nobn seed=1": "did not train"}
    found = by_claim(claims(a))
    fast = found["faster convergence"]
    assert fast.verdict == "supported" and "BatchNorm made training possible" in fast.evidence
    assert "nobn did not train in 2 of 2 seeds" in fast.evidence
    for name in ("smoother, stabler training", "better generalization"):
        assert found[name].verdict == "not comparable", name
    # a quantity the trace does not hold is "not measured", whatever the outcomes
    assert found["reduced internal covariate shift (distributional)"].verdict == "not measured"
    assert any("BatchNorm made training possible" in f.text for f in a.findings_for("outcomes"))


def test_every_verdict_is_in_the_vocabulary(tmp_path):
    a = analyze(write_pairs(tmp_path / "t.covshift", {("bn", 0): decay(15, 0), ("nobn", 0): decay(60, 1)}))
    found = claims(a)
    assert [c.claim for c in found] == list(CLAIMS)
    assert all(c.verdict in VERDICTS for c in found)


def test_pairing_by_role_not_by_name():
    """A build_model(batchnorm) pair: Sequential indices shift by one per BatchNorm."""
    bn = [("0", "Linear", None), ("1", "BatchNorm1d", None), ("2", "Tanh", "tanh"), ("3", "Linear", None),
          ("4", "BatchNorm1d", None), ("5", "Tanh", "tanh"), ("6", "Linear", None)]
    nobn = [("0", "Linear", None), ("1", "Tanh", "tanh"), ("2", "Linear", None), ("3", "Tanh", "tanh"),
            ("4", "Linear", None)]
    info = pd.DataFrame([("b", *r) for r in bn] + [("n", *r) for r in nobn],
                        columns=["run", "layer", "type", "nonlinearity"])
    table = pairs(info, "b", "n").set_index("role")
    assert table.loc["Linear/Conv 2", ["bn", "nobn"]].tolist() == ["3", "2"]
    assert table.loc["Linear/Conv 3", ["bn", "nobn"]].tolist() == ["6", "4"]
    assert table.loc["nonlinearity 2 (Tanh)", ["bn", "nobn"]].tolist() == ["5", "3"]
    assert table.loc["input to nonlinearity 1", ["bn", "nobn"]].tolist() == ["1", "0"]
    assert set(table["kind"]) == {"weighted", "nonlinearity", "input"}


def test_hugging_face_conv1d_is_a_weighted_layer():
    """GPT-2's c_fc (a transformers Conv1D) is paired with its BatchNorm-run twin; it used to
    be missing from the Linear/Conv roles, leaving only lm_head."""
    bn = [("h.0.mlp.c_fc", "Conv1D", None), ("h.0.mlp.c_fc_bn", "BatchNormLastDim", None),
          ("h.0.mlp.act", "NewGELUActivation", "gelu_tanh"), ("h.0.mlp.c_proj", "Conv1D", None), ("lm_head", "Linear", None)]
    nobn = [r for r in bn if r[1] != "BatchNormLastDim"]
    info = pd.DataFrame([("b", *r) for r in bn] + [("n", *r) for r in nobn], columns=["run", "layer", "type", "nonlinearity"])
    table = pairs(info, "b", "n").set_index("role")
    assert table.loc[["Linear/Conv 1", "Linear/Conv 2", "Linear/Conv 3"], "nobn"].tolist() == \
        ["h.0.mlp.c_fc", "h.0.mlp.c_proj", "lm_head"]
    assert table.loc["input to nonlinearity 1", ["bn", "nobn"]].tolist() == ["h.0.mlp.c_fc_bn", "h.0.mlp.c_fc"]


def test_identical_variants_over_three_seeds_get_no_supported_verdict(tmp_path):
    """The null check: build_model ignores its flag, so bn and nobn are the same runs."""
    result = CliRunner().invoke(app, ["trace", str(ROOT / "tests" / "models" / "identical_pair.py"),
                                              "--seeds", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    a = analyze(tmp_path / "trace.covshift")
    assert len(a.seeds) == 3
    found = claims(a)
    assert not [c for c in found if c.verdict == "supported"], [(c.claim, c.verdict, c.evidence) for c in found]
    decided = [c for c in found if c.per_seed]
    assert decided and all(v == pytest.approx(1.0) or v == pytest.approx(0.0) for c in decided for v in c.per_seed)
    text = (tmp_path / "report.md").read_text()
    assert "**supported" not in text
    assert "The training-loss figure shows all 3 seeds" in text and "describe seed 0: runs `bn seed=0` and" in text


def test_gradient_based_rows_use_matched_layers_without_the_first(tmp_path):
    """ICS on role-matched Linear layers (first excluded) and the landscape's β-smoothness."""
    writer = TraceWriter(tmp_path / "t.covshift")
    layouts = {"bn": [("0", "Linear", None), ("0_bn", "BatchNorm1d", None), ("1", "Tanh", "tanh"),
                      ("2", "Linear", None), ("2_bn", "BatchNorm1d", None), ("3", "Tanh", "tanh"), ("4", "Linear", None)],
               "nobn": [("0", "Linear", None), ("1", "Tanh", "tanh"), ("2", "Linear", None), ("3", "Tanh", "tanh"),
                        ("4", "Linear", None)]}
    rng = np.random.default_rng(0)
    ics = {v: {layer: rng.uniform(0.1, 1.0, 5) for layer in ("0", "2", "4")} for v in layouts}
    beta = {v: rng.uniform(1, 10, 5) for v in layouts}
    for v, tau in (("bn", 15), ("nobn", 60)):
        rid = writer.add_run(v, {"variant": v, "seed": 0})
        for pos, (layer, kind, nl) in enumerate(layouts[v]):
            writer.add_layer(rid, layer, kind, nl, pos, None)
        rows = [(s, "", "loss", float(x)) for s, x in enumerate(decay(tau, 0))]
        rows += [(10 * k, layer, "ics_rel", float(x)) for layer, xs in ics[v].items() for k, x in enumerate(xs)]
        rows += [(10 * k, "", "beta_smoothness", float(x)) for k, x in enumerate(beta[v])]
        writer.write(rid, rows, [], [])
    writer.close()
    found = by_claim(claims(analyze(tmp_path / "t.covshift")))
    later = [layer for layer in ("2", "4")]  # the same names here, matched by role either way
    expected = np.median(np.concatenate([ics["bn"][x] for x in later])) / \
        np.median(np.concatenate([ics["nobn"][x] for x in later]))
    assert found["reduced internal covariate shift (gradient-based)"].per_seed == pytest.approx([expected])
    assert found["smoother loss landscape"].per_seed == pytest.approx([np.median(beta["bn"]) / np.median(beta["nobn"])])
    assert found["reduced internal covariate shift (distributional)"].verdict == "not measured"


def test_the_report_explains_when_the_two_shift_measures_disagree():
    def rows(dist: str, grad: str) -> list[Claim]:
        return [Claim("reduced internal covariate shift (distributional)", dist, "", seeds=3),
                Claim("reduced internal covariate shift (gradient-based)", grad, "", seeds=1)]
    note = disagreement(rows("supported", "not supported"))
    assert note and "distributional one is supported, the gradient-based one not supported (1 seed)" in note
    assert "Santurkar" in note and "Ioffe" in note
    assert disagreement(rows("supported", "supported")) is None
    assert disagreement(rows("supported", "not measured")) is None
