"""The sweep's two claims: run outcomes per run, the usable learning rate (trained and within a
tolerance of the variant's best, per seed) and the init spread over the scales where both
variants trained. Expected values are computed here with numpy/pandas from the synthetic runs
(:mod:`sweep_traces`), not by the code under test."""

from __future__ import annotations

import math

import pandas as pd
import pytest

import covshift
from covshift.analysis import sweep
from covshift.analysis.claims import claims
from covshift.analysis.sweep import analyze_sweep
from covshift.analysis.sweep_verdicts import init_verdict, lr_verdict
from covshift.report import style, sweep_figures
from sweep_traces import curve, grid, outcome, write_sweep

SCALES5 = (0.25, 0.5, 1.0, 2.0, 4.0)


def analysed(tmp_path, settings):
    return analyze_sweep(write_sweep(tmp_path / "sweep.covshift", settings))


def removed(o: dict) -> float:
    """1 − the trailing mean over round(0.02 n) steps at the last step / the first loss."""
    loss = curve(o)
    w = max(1, round(0.02 * len(loss)))
    return 1 - loss[-w:].mean() / loss[0]


def expected_usable(rows: pd.DataFrame, metric: str = "acc", tolerance: float = 0.02) -> float:
    """The largest lr among trained rows whose metric is within tolerance of the best trained one."""
    ok = rows[rows["trained"]]
    if ok.empty:
        return math.nan
    if metric == "acc":
        good = ok[ok["acc"] >= ok["acc"].max() - tolerance]
    else:
        good = ok[ok["loss"] <= ok["loss"].min() * (1 + tolerance)]
    return float(good["lr"].max())


# the case: bn "trains" at lr 3 (it removes 70% of its loss) but ends at 64.9% against 95.8% at lr 0.3
BN_ACC = {0.003: 0.80, 0.03: 0.93, 0.3: 0.958, 3.0: 0.649}
NOBN_ACC = {0.003: 0.85, 0.03: 0.95}


def lr3_rule(v, lr, s, seed):
    if v == "bn":
        return outcome(floor=0.6 if lr == 3.0 else 0.2, acc=BN_ACC[lr])
    return outcome(acc=NOBN_ACC[lr]) if lr in NOBN_ACC else outcome(diverge=10)


def test_a_run_that_trains_far_below_the_best_accuracy_is_not_usable(tmp_path):
    sa = analysed(tmp_path, grid(lr3_rule, scales=(1.0,)))
    runs = sa.runs.set_index(["variant", "lr"])
    lr3 = runs.loc[("bn", 3.0)]
    assert removed(lr3_rule("bn", 3.0, 1.0, 0)) == pytest.approx(0.7) == lr3["loss_removed"]
    assert lr3["outcome"] == "trained" and not lr3["within_tolerance"]  # trained, but 30.9 points below the best
    expected = pd.DataFrame([{"variant": v, "lr": lr, "acc": acc, "trained": True}
                             for v, accs in (("bn", BN_ACC), ("nobn", NOBN_ACC)) for lr, acc in accs.items()])
    usable = {v: expected_usable(expected[expected["variant"] == v]) for v in ("bn", "nobn")}
    assert usable == {"bn": 0.3, "nobn": 0.03}
    by_seed = sa.by_seed.set_index("variant")
    assert by_seed["usable_lr"].to_dict() == usable
    assert by_seed.loc["bn", "best"] == pytest.approx(0.958) and by_seed.loc["bn", "limit"] == pytest.approx(0.938)
    verdict, evidence, seeds = lr_verdict(sa)
    assert (verdict, seeds) == ("supported", 1)
    assert evidence.endswith("init scale 1): bn 0.3, nobn 0.03 (1 grid step)")
    assert "it trains but ends outside the tolerance of its best at 0.003 (final validation accuracy 80% against " \
           "95.8%), 0.03 (final validation accuracy 93% against 95.8%), 3 (final validation accuracy 64.9% against " \
           "95.8%)" in " ".join(f.text for f in sa.findings)


def test_without_accuracy_the_final_loss_decides_within_ten_percent(tmp_path):
    bn = {0.003: 0.5, 0.03: 0.2, 0.3: 0.21, 3.0: 0.3}
    nobn = {0.003: 0.2, 0.03: 0.25}

    def rule(v, lr, s, seed):
        floors = bn if v == "bn" else nobn
        return outcome(floor=floors[lr], acc=None) if lr in floors else outcome(diverge=10, acc=None)
    sa = analysed(tmp_path, grid(rule, scales=(1.0,)))
    assert sa.metric == "final_loss"
    expected = pd.DataFrame([{"variant": v, "lr": lr, "loss": f, "trained": removed(outcome(floor=f)) >= 0.5}
                             for v, fl in (("bn", bn), ("nobn", nobn)) for lr, f in fl.items()])
    usable = {v: expected_usable(expected[expected["variant"] == v], "loss", 0.10) for v in ("bn", "nobn")}
    assert usable == {"bn": 0.3, "nobn": 0.003}  # nobn's 0.25 is 25% above its best 0.2
    assert sa.by_seed.set_index("variant")["usable_lr"].to_dict() == usable
    verdict, evidence, _ = lr_verdict(sa)
    assert verdict == "supported" and "final training loss within 10% of the variant's best" in evidence
    assert "bn 0.3, nobn 0.003 (2 grid steps)" in evidence


def test_seeds_that_disagree_make_the_lr_claim_inconclusive(tmp_path):
    def rule(v, lr, s, seed):  # seed 1: bn at 0.3 trains but ends 10 points below its best
        if v == "nobn":
            return outcome() if lr <= 0.03 else outcome(diverge=10)
        if lr == 3.0:
            return outcome(diverge=10)
        return outcome(acc=0.8 if (seed, lr) == (1, 0.3) else 0.9)
    sa = analysed(tmp_path, grid(rule, scales=(1.0,), seeds=(0, 1)))
    rows = pd.DataFrame([{"variant": v, "seed": seed, "lr": lr, "acc": o["acc"], "trained": o["diverge"] is None}
                         for (v, lr, _, seed), o in grid(rule, scales=(1.0,), seeds=(0, 1)).items()])
    expected = {(v, seed): expected_usable(g) for (v, seed), g in rows.groupby(["variant", "seed"])}
    assert expected == {("bn", 0): 0.3, ("bn", 1): 0.03, ("nobn", 0): 0.03, ("nobn", 1): 0.03}
    assert sa.by_seed.set_index(["variant", "seed"])["usable_lr"].to_dict() == expected
    verdict, evidence, seeds = lr_verdict(sa)
    assert (verdict, seeds) == ("inconclusive", 2)
    assert "seed 0: bn 0.3, nobn 0.03 (1 grid step); seed 1: bn 0.03, nobn 0.03 (0 grid steps); bn higher in 1 of " \
           "2 seeds" in evidence


def never_training_nobn(v, lr, s, seed):
    """nobn removes 20% of its loss at 30% accuracy (chance 10%), bn 90% at 90%: judged with bn's runs
    of its seed and init scale, nobn did not train; judged only against itself, it would have."""
    if v == "nobn":
        return outcome(floor=1.6, acc=0.3, chance=0.1)
    return outcome(diverge=10, chance=0.1) if lr == 3.0 else outcome(acc=0.9, chance=0.1)


def test_a_nobn_that_never_trains_makes_the_lr_claim_not_comparable(tmp_path):
    o_nobn, o_bn = never_training_nobn("nobn", 0.3, 1.0, 0), never_training_nobn("bn", 0.3, 1.0, 0)
    gain, best_gain = o_nobn["acc"] - 0.1, o_bn["acc"] - 0.1
    assert 0.1 <= removed(o_nobn) < 0.5 and gain < 0.5 * best_gain  # did not train against bn ...
    assert gain >= 0.5 * gain                                        # ... but would have against itself
    sa = analysed(tmp_path, grid(never_training_nobn, scales=(1.0,), seeds=(0, 1)))
    assert set(sa.runs.loc[sa.runs["variant"] == "nobn", "outcome"]) == {"did not train"}
    verdict, evidence, seeds = lr_verdict(sa)
    assert (verdict, seeds) == ("not comparable", 2)
    assert evidence == ("nobn trained at no learning rate of 0.003, 0.03, 0.3, 3 (init scale 1) in any of the 2 "
                        "seeds while bn did: BatchNorm made training possible")


def test_init_claim_is_not_comparable_in_count_form(tmp_path):
    sa = analysed(tmp_path, grid(never_training_nobn, lrs=[0.03], scales=SCALES5))
    verdict, evidence, seeds = init_verdict(sa, 0.10)
    assert (verdict, seeds) == ("not comparable", 0)
    assert evidence.startswith("nobn trained at 0 of 5 init scales, bn at 5 of 5 (lr 0.03)")

    def one_scale(v, lr, s, seed):  # nobn trains at init scale 1 only: still no spread to compare
        return outcome(acc=0.9, chance=0.1) if (v, s) == ("nobn", 1.0) else never_training_nobn(v, lr, s, seed)
    two = analyze_sweep(write_sweep(tmp_path / "one.covshift", grid(one_scale, lrs=[0.03], scales=SCALES5,
                                                                    seeds=(0, 1))))
    verdict, evidence, _ = init_verdict(two, 0.10)
    assert verdict == "not comparable"
    assert evidence.startswith("nobn trained at 1 of 5 init scales, bn at 5 of 5 in each of the 2 seeds")
    assert "no seed has two init scales at which both variants trained" in " ".join(f.text for f in two.findings)


def test_identical_variants_get_no_supported_sweep_verdict(tmp_path):
    """The null case: bn and nobn the same run for run over the grid, three seeds."""
    def rule(v, lr, s, seed):
        if lr == 3.0:
            return outcome(diverge=10)
        return outcome(floor=0.2 + 0.05 * abs(math.log2(s)) + 0.01 * seed, acc=0.9 - 0.05 * abs(math.log2(s)))
    path = write_sweep(tmp_path / "null.covshift", grid(rule, seeds=(0, 1, 2)))
    with covshift.load(path) as trace:
        sa = analyze_sweep(trace)
        a = covshift.analyze(sweep.RunView(trace, sweep.default_pair(trace, sa)))
        found = {c.claim: c for c in claims(a, sweep=sa)}
    lr, init = found["higher usable learning rate"], found["lower sensitivity to initialization"]
    assert (lr.verdict, lr.seeds) == ("not supported", 3) and "bn higher in 0 of 3 seeds" in lr.evidence
    t = sa.init_by_seed
    assert (t["bn_spread"].to_numpy() == t["nobn_spread"].to_numpy()).all()
    assert t["bn_spread"].to_numpy() == pytest.approx([0.05] * 3)  # accuracy at scales 0.5, 1, 2: 0.85, 0.9, 0.85
    assert (init.verdict, init.seeds) == ("not supported", 3)
    assert "supported" not in {c.verdict for c in found.values()}


def test_one_seed_is_labelled(tmp_path):
    path = write_sweep(tmp_path / "one.covshift", grid(lr3_rule, scales=(1.0,)))
    with covshift.load(path) as trace:
        sa = analyze_sweep(trace)
        a = covshift.analyze(sweep.RunView(trace, sweep.default_pair(trace, sa)))
        found = {c.claim: c for c in claims(a, sweep=sa)}
    assert found["higher usable learning rate"].label == "supported (1 seed)"
    assert found["lower sensitivity to initialization"].verdict == "not measured"  # one init scale


# ------------------------------------------------------------------------------- figures

def test_lr_figure_draws_the_tolerance_limits_the_usable_lrs_and_untrained_runs(tmp_path):
    sa = analysed(tmp_path, grid(lr3_rule, scales=(1.0,)))
    fig = sweep_figures.lr_sensitivity(sa)
    colors = {v: style.PALETTE[v] for v in ("bn", "nobn")}
    acc = fig.axes[1]  # the final metric: accuracy
    limits = {line.get_color(): line.get_ydata()[0] for line in acc.lines if line.get_linestyle() == "--"}
    assert limits == pytest.approx({colors["bn"]: 0.958 - 0.02, colors["nobn"]: 0.95 - 0.02})
    usable = {line.get_color(): list(line.get_xdata()) for line in acc.lines if line.get_marker() == "v"}
    assert usable == {colors["bn"]: [0.3], colors["nobn"]: [0.03]}
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "usable limit: best − 2 points (per variant and seed)" in labels
    assert "usable learning rate (per seed)" in labels

    never = analysed(tmp_path / "never", grid(never_training_nobn, scales=(1.0,)))
    fig = sweep_figures.lr_sensitivity(never)
    hollow = [line for line in fig.axes[0].lines if line.get_marker() == "o" and line.get_markerfacecolor() == "white"]
    assert [sorted(line.get_xdata()) for line in hollow if line.get_markeredgecolor() == colors["nobn"]] \
        == [pytest.approx([0.003, 0.03, 0.3, 3.0], rel=0.05)]  # nobn trained at no lr (shifted aside)
    steps = [line for line in fig.axes[2].lines if line.get_marker() == "^"]  # nobn never reaches loss 1
    assert [sorted(line.get_xdata()) for line in steps] == [[0.003, 0.03, 0.3, 3.0]]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "did not train (any seed; run outcomes)" in labels and "never reached loss 1 (any seed)" in labels
    fig.canvas.draw()  # nobn has no usable lr: nothing drawn for it may squeeze the panels
    widths = [ax.get_position().width for ax in fig.axes[:3]]
    assert sum(widths) > 0.6, widths  # the three panels fill the figure's width
    grid_fig = sweep_figures.sweep_grid(never)
    assert "10% of mini-batch losses, training mode" in grid_fig.axes[-1].get_ylabel()
    assert any("untrained 1/1" in t.get_text() for t in grid_fig.axes[1].texts)
