"""Generalization at matched training loss, the "better generalization" claim built on it, and
validation spikes judged against the validation set's standard error. Every expected number is
computed here with numpy from the synthetic evaluations written into the trace."""

from __future__ import annotations

import math

import numpy as np
import pytest

import covshift
from covshift.analysis import analyze, generalization, stability
from covshift.analysis.claims import claims
from covshift.analysis.intervals import Z
from covshift.store import TraceWriter

N_VAL = 400
STEPS = [10, 20, 30, 40]


def decay(tau: float, n: int = 41) -> np.ndarray:
    return 2.3 * np.exp(-np.arange(n) / tau) + 0.01


def write(path, runs: dict[str, dict[str, list[float]]], config: bool = True) -> covshift.Trace:
    """Runs "bn" and "nobn" (both train: a decaying loss) with the given evaluation metrics at STEPS."""
    writer = TraceWriter(path)
    try:
        for name, metrics in runs.items():
            cfg = {"variant": name, "seed": 0, "val_examples": N_VAL, "chance_accuracy": 0.1} if config else {}
            rid = writer.add_run(name, cfg)
            rows = [(s, "", "loss", float(v)) for s, v in enumerate(decay(5 if name == "bn" else 15))]
            rows += [(s, "", metric, float(v)) for metric, values in metrics.items() for s, v in zip(STEPS, values)]
            writer.write(rid, rows, [], [])
    finally:
        writer.close()
    return covshift.load(path)


def at_level(train: list[float], values: list[float], level: float) -> float:
    """Reference: the value where ``train`` first comes down to ``level``, interpolated linearly
    in train loss with the evaluation before (np.interp on the bracketing pair)."""
    train_a = np.asarray(train)
    i = int(np.argmax(train_a <= level))
    if i == 0:
        return float(values[0])
    return float(np.interp(level, [train_a[i], train_a[i - 1]], [values[i], values[i - 1]]))


BN = {"train_eval_loss": [1.0, 0.4, 0.2, 0.1], "val_loss": [1.1, 0.6, 0.5, 0.55],
      "val_accuracy": [0.80, 0.90, 0.95, 0.97]}
NOBN = {"train_eval_loss": [2.0, 1.5, 0.9, 0.5], "val_loss": [2.1, 1.7, 1.2, 0.9],
        "val_accuracy": [0.30, 0.45, 0.60, 0.70]}


def test_matched_interpolates_at_the_lowest_training_loss_both_reach(tmp_path):
    a = analyze(write(tmp_path / "t.covshift", {"bn": BN, "nobn": NOBN}))
    m = generalization.matched(a.evaluations, "bn", "nobn")
    level = max(min(BN["train_eval_loss"]), min(NOBN["train_eval_loss"]))
    assert m["matched"] and m["level"] == level == 0.5
    for side, runs in (("bn", BN), ("nobn", NOBN)):
        got = m[side]
        train = runs["train_eval_loss"]
        assert got["step"] == pytest.approx(at_level(train, STEPS, level))
        assert got["val_loss"] == pytest.approx(at_level(train, runs["val_loss"], level))
        assert got["val_accuracy"] == pytest.approx(at_level(train, runs["val_accuracy"], level))
        assert got["train_loss"] == level and got["gap"] == pytest.approx(got["val_loss"] - level)
        assert got["n"] == N_VAL
    assert m["bn"]["step"] == pytest.approx(10 + 10 * 5 / 6)  # 1.0 → 0.4 between steps 10 and 20
    assert m["nobn"]["step"] == 40  # nobn's lowest training loss is the level itself


def test_matched_reads_the_first_crossing_even_when_the_loss_rises_again(tmp_path):
    bn = {"train_eval_loss": [1.0, 0.45, 0.7, 0.3], "val_loss": [1.0, 0.7, 0.9, 0.6]}
    a = analyze(write(tmp_path / "t.covshift", {"bn": bn, "nobn": {**NOBN, "val_accuracy": [math.nan] * 4}}))
    m = generalization.matched(a.evaluations, "bn", "nobn")
    w = (1.0 - 0.5) / (1.0 - 0.45)  # between the first and the second evaluation, not the third and fourth
    assert m["bn"]["step"] == pytest.approx(10 + w * 10)
    assert m["bn"]["val_loss"] == pytest.approx(1.0 + w * (0.7 - 1.0))


def test_a_first_evaluation_below_the_level_is_read_as_it_is(tmp_path):
    bn = {**BN, "train_eval_loss": [0.3, 0.2, 0.15, 0.1]}
    a = analyze(write(tmp_path / "t.covshift", {"bn": bn, "nobn": NOBN}))
    m = generalization.matched(a.evaluations, "bn", "nobn")
    assert (m["bn"]["step"], m["bn"]["train_loss"], m["bn"]["val_accuracy"]) == (10, 0.3, 0.80)
    assert "bn at step 10 (its first evaluation, already at 0.3), nobn at step 40" in generalization.where(m)
    # bn there is at 0.3, not at the matched 0.5: a large accuracy difference decides nothing
    claim = next(c for c in claims(a) if c.claim == "better generalization")
    assert claim.per_seed == pytest.approx([0.80 - 0.70]) and claim.verdict == "inconclusive"
    assert "inconclusive: bn's first evaluation is already below the matched training loss" in claim.evidence


def test_the_claim_and_the_finding_compare_accuracy_at_the_matched_level(tmp_path):
    a = analyze(write(tmp_path / "t.covshift", {"bn": BN, "nobn": NOBN}))
    acc_bn, acc_nobn = at_level(BN["train_eval_loss"], BN["val_accuracy"], 0.5), 0.70
    se = math.sqrt(acc_bn * (1 - acc_bn) / N_VAL + acc_nobn * (1 - acc_nobn) / N_VAL)
    claim = next(c for c in claims(a) if c.claim == "better generalization")
    assert claim.per_seed == pytest.approx([acc_bn - acc_nobn])
    assert (claim.low, claim.high) == pytest.approx((acc_bn - acc_nobn - Z * se, acc_bn - acc_nobn + Z * se))
    assert claim.label == "supported (1 seed)"
    assert "at training loss 0.5: bn at step 18, nobn at step 40" in claim.evidence
    # the final accuracies (97% vs 70%) are not what is compared
    assert "97" not in claim.evidence.split(";")[0]
    expected = (f"At the same training loss 0.5 (bn at step 18, nobn at step 40), validation accuracy is "
                f"{100 * acc_bn:.3g}% vs 70% (difference {100 * (acc_bn - acc_nobn):+.1f} points ± "
                f"{100 * Z * se:.1f} at 95%)")
    sentences = [f.text for f in a.findings_for("generalization")]
    assert any(t.startswith(expected) for t in sentences), sentences


def test_identical_runs_differ_by_nothing_and_are_not_supported(tmp_path):
    a = analyze(write(tmp_path / "t.covshift", {"bn": BN, "nobn": BN}))
    m = generalization.matched(a.evaluations, "bn", "nobn")
    assert m["level"] == min(BN["train_eval_loss"]) and m["bn"] == m["nobn"]
    claim = next(c for c in claims(a) if c.claim == "better generalization")
    assert claim.per_seed == [0.0] and claim.verdict == "inconclusive"


def test_without_accuracy_the_validation_loss_at_the_matched_level_is_compared(tmp_path):
    drop = {"val_accuracy": [math.nan] * 4}
    a = analyze(write(tmp_path / "t.covshift", {"bn": {**BN, **drop}, "nobn": {**NOBN, **drop}}))
    claim = next(c for c in claims(a) if c.claim == "better generalization")
    ratio = at_level(BN["train_eval_loss"], BN["val_loss"], 0.5) / 0.9
    assert claim.per_seed == pytest.approx([ratio])
    assert "no accuracy: compared by validation loss" in claim.evidence


def test_without_training_loss_the_last_evaluations_are_compared_and_said_to_be(tmp_path):
    """A Tracer in your own loop: no train_eval_loss, nothing is matched."""
    own = {name: {k: v for k, v in runs.items() if k != "train_eval_loss"} for name, runs in
           (("bn", BN), ("nobn", NOBN))}
    a = analyze(write(tmp_path / "t.covshift", own))
    m = generalization.matched(a.evaluations, "bn", "nobn")
    assert not m["matched"] and math.isnan(m["level"])
    assert (m["bn"]["step"], m["bn"]["val_accuracy"], m["nobn"]["val_accuracy"]) == (40, 0.97, 0.70)
    claim = next(c for c in claims(a) if c.claim == "better generalization")
    assert claim.per_seed == pytest.approx([0.27]) and "not matched" in claim.evidence
    assert any("not compared at a matched training loss" in f.text for f in a.findings_for("generalization"))


def test_a_single_run_without_config_analyses(tmp_path):
    trace = write(tmp_path / "t.covshift", {"bn": {"val_loss": [1.0, 0.9, 0.8, 0.7]}}, config=False)
    a = analyze(trace)
    assert a.evaluations["val_examples"].isna().all()
    assert not any("training loss" in f.text and "vs" in f.text for f in a.findings_for("generalization"))


# ------------------------------------------------------------------- spikes vs standard error

VAL = [1.0, 1.2, 1.25, 1.6, 1.5]
SE = [0.05, 0.05, 0.01, 0.3, 0.1]


def reference_spikes(values, se=None) -> list[int]:
    out = []
    for i in range(1, len(values)):
        rise = values[i] - values[i - 1]
        noise = 0.0 if se is None else 2.0 * math.sqrt(se[i] ** 2 + se[i - 1] ** 2)
        if rise > 0.1 * abs(values[i - 1]) and rise > noise:
            out.append(i)
    return out


def test_spikes_need_to_clear_the_standard_error():
    assert reference_spikes(VAL) == [1, 3] and reference_spikes(VAL, SE) == [1]
    assert stability.spikes(np.array(VAL)) == (2.0, [1, 3])
    assert stability.spikes(np.array(VAL), np.array(SE)) == (1.0, [1])
    # an unknown standard error leaves that rise to the relative rule
    assert stability.spikes(np.array(VAL), np.array([0.05, 0.05, math.nan, math.nan, 0.1])) == (2.0, [1, 3])


def test_the_stability_table_reads_val_loss_se(tmp_path):
    writer = TraceWriter(tmp_path / "t.covshift")
    steps = [10, 20, 30, 40, 50]
    for name, with_se in (("se", True), ("plain", False)):
        rid = writer.add_run(name, {})
        rows = [(s, "", "loss", 1.0 / (s + 1)) for s in range(51)]
        rows += [(s, "", "val_loss", v) for s, v in zip(steps, VAL)]
        rows += [(s, "", "val_loss_se", v) for s, v in zip(steps, SE)] if with_se else []
        writer.write(rid, rows, [], [])
    writer.close()
    a = analyze(tmp_path / "t.covshift")
    s = a.stability.set_index("run")
    assert s.loc["se", ["val_spikes", "spike_steps", "spike_rule"]].tolist() == [1, [20], "relative and SE"]
    assert (s.loc["plain", "val_spikes"], s.loc["plain", "spike_steps"]) == (2, [20, 40])
    sentences = [f.text for f in a.findings_for("stability")]
    assert ("The se run's validation loss rose by more than 10% and more than 2 standard errors at 1 of its "
            "5 evaluations (step 20).") in sentences
