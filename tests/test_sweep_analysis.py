"""Sweep analysis, figures and report on synthetic sweep traces with known answers
(:mod:`sweep_traces` writes them)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import covshift
from covshift.analysis import sweep, sweep_tables, sweep_verdicts
from covshift.analysis.claims import claims
from covshift.analysis.sweep import analyze_sweep
from covshift.analysis.sweep_tables import sweep_runs
from covshift.report import report, style, sweep_figures
from covshift.report.sweep_figures import save_sweep_figures
from sweep_traces import START, STEPS, diverging_at, grid, name, outcome, write_sweep


def texts(sa, section: str) -> str:
    return " ".join(f.text for f in sa.findings if f.section == section)


def verdict(sa, claim: str) -> tuple[str, str]:
    """(verdict, evidence) of a sweep claim."""
    return (sweep_verdicts.lr_verdict(sa) if claim == "lr" else sweep_verdicts.init_verdict(sa, 0.10))[:2]


# ------------------------------------------------------------------------------- per run

def test_sweep_runs_columns_and_closed_forms(tmp_path):
    floors = {0.003: 0.5, 0.03: 0.2, 0.3: 1.5}
    settings = grid(lambda v, lr, s, seed: outcome(diverge=7, sat=0.6, g2=3000.0) if lr == 3.0 else
                    outcome(slope=0.03 if v == "bn" else 0.015, floor=floors[lr], sat=0.2, g1=3.0, g2=2.0),
                    scales=(1.0,))
    with covshift.load(write_sweep(tmp_path / "s.covshift", settings)) as trace:
        runs = sweep_runs(trace).set_index("run")
    assert len(runs) == 8 and set(runs["variant"]) == {"bn", "nobn"}
    ok = runs.loc[name("bn", 0.03, 1.0, 0)]
    assert (ok["lr"], ok["init_scale"], ok["seed"], ok["steps"], ok["planned_steps"]) == (0.03, 1.0, 0, STEPS, STEPS)
    assert not ok["diverged"] and ok["trains"]
    assert ok["initial_loss"] == START
    assert ok["final_loss"] == pytest.approx(0.2)  # the floor, held over the last 10 steps
    assert ok["final_accuracy"] == pytest.approx(0.9)  # the last of the two logged values
    assert ok["loss_removed"] == pytest.approx(1 - 0.2 / START) and ok["outcome"] == "trained"
    assert ok["mean_saturation"] == pytest.approx(0.2) and ok["median_grad_ratio"] == pytest.approx(1.5)
    # every non-diverged run starts at 2, so the threshold is 1; the trailing mean over 2 steps lags
    # a line by half a step, so the first step at or below 1 is ceil(1 / slope + 0.5)
    assert ok["steps_to_threshold"] == math.ceil(1 / 0.03 + 0.5) == 34
    assert runs.loc[name("nobn", 0.03, 1.0, 0), "steps_to_threshold"] == math.ceil(1 / 0.015 + 0.5) == 68
    # floor 1.5: it removed 25% of its loss, less than half the 90% of the best run of its seed and init scale
    # (no chance level: the loss decides), so it did not train; it never reaches the threshold 1
    flat = runs.loc[name("bn", 0.3, 1.0, 0)]
    assert flat["loss_removed"] == pytest.approx(0.25) and 0.25 < 0.5 * (1 - 0.2 / START)
    assert flat["outcome"] == "did not train" and not flat["trains"] and not flat["within_tolerance"]
    assert flat["final_loss"] == pytest.approx(1.5) and math.isnan(flat["steps_to_threshold"])
    bad = runs.loc[name("nobn", 3.0, 1.0, 0)]
    assert bad["diverged"] and bad["diverged_at"] == 7 and bad["first_nonfinite_layer"] == "fc2"
    assert math.isnan(bad["final_loss"]) and not bad["trains"] and bad["outcome"] == "diverged"
    assert bad["mean_saturation"] == pytest.approx(0.6)
    assert bad["median_grad_ratio"] == pytest.approx(1.0 / 3000.0)
    assert math.isnan(bad["final_accuracy"])  # it diverged before the first evaluation


def test_threshold_is_half_the_median_initial_loss_of_runs_that_did_not_diverge(tmp_path):
    settings = {("bn", 0.1, 1.0, 0): outcome(slope=0.05, floor=0.1),             # starts at 2
                ("nobn", 0.1, 1.0, 0): outcome(slope=0.03, floor=0.1, start=4.0),
                ("nobn", 0.2, 1.0, 0): outcome(slope=0.05, floor=0.1, start=4.0),
                ("bn", 0.2, 1.0, 0): outcome(diverge=3, start=100.0)}           # diverged: not counted
    with covshift.load(write_sweep(tmp_path / "t.covshift", settings)) as trace:
        runs = sweep_runs(trace).set_index("run")
        sa = analyze_sweep(trace)
    assert sa.initial_loss == 4.0 and sa.threshold == 2.0  # median of 2, 4, 4
    # bn starts at the threshold: step 0's smoothed loss is its first loss, 2
    assert runs.loc[name("bn", 0.1, 1.0, 0), "steps_to_threshold"] == 0
    assert runs.loc[name("nobn", 0.1, 1.0, 0), "steps_to_threshold"] == math.ceil(2 / 0.03 + 0.5) == 68
    assert runs.loc[name("bn", 0.2, 1.0, 0), "diverged"]


def test_no_sweep_in_a_plain_trace(tmp_path):
    path = write_sweep(tmp_path / "p.covshift", {}, plain={"bn": outcome(), "nobn": outcome()})
    with covshift.load(path) as trace:
        assert sweep_runs(trace).empty
        assert list(sweep_runs(trace).columns) == sweep_tables.RUN_COLUMNS
        assert analyze_sweep(trace) is None


# ------------------------------------------------------------------------- learning rate

def analysed(tmp_path, settings, plain=None):
    return analyze_sweep(write_sweep(tmp_path / "sweep.covshift", settings, plain))


def test_bn_tolerating_a_ten_times_larger_lr_supports_the_claim(tmp_path):
    sa = analysed(tmp_path, grid(diverging_at(bn_limit=3.0, nobn_limit=0.3)))
    usable = sa.summary.set_index("variant")["usable_lr"]
    assert (usable["bn"], usable["nobn"]) == (0.3, 0.03)
    result, evidence = verdict(sa, "lr")
    assert result == "supported"
    assert "init scale 1): bn 0.3, nobn 0.03 (1 grid step)" in evidence
    text = texts(sa, "learning_rate")
    assert "bn's usable learning rate is 10 times nobn's (0.3 vs 0.03; 1 grid step higher)" in text
    assert "nobn's usable learning rate is 0.03; it fails at 0.3 (diverges in 1 of 1 seed)" in text
    # per lr: mean over seeds of the non-diverged runs, diverged counts
    row = sa.lr[(sa.lr["variant"] == "nobn") & (sa.lr["lr"] == 0.3)].iloc[0]
    assert (row["runs"], row["diverged"], row["trains"]) == (1, 1, 0) and math.isnan(row["final_loss"])


def test_the_same_limit_for_both_variants_does_not_support_the_claim(tmp_path):
    sa = analysed(tmp_path, grid(diverging_at(bn_limit=0.3, nobn_limit=0.3)))
    result, evidence = verdict(sa, "lr")
    assert result == "not supported"
    assert "bn 0.03, nobn 0.03 (0 grid steps)" in evidence
    assert "bn and nobn have the same usable learning rate, 0.03." in texts(sa, "learning_rate")


def test_a_run_that_learns_nothing_does_not_train(tmp_path):
    def rule(v, lr, s, seed):  # nobn at lr 0.3 stays at 2.5, above the median initial loss 2
        return outcome(floor=2.5) if (v, lr) == ("nobn", 0.3) else diverging_at(3.0, 3.0)(v, lr, s, seed)
    sa = analysed(tmp_path, grid(rule))
    assert sa.initial_loss == START
    usable = sa.summary.set_index("variant")["usable_lr"]
    assert (usable["bn"], usable["nobn"]) == (0.3, 0.03)
    assert "it fails at 0.3 (does not train in 1 of 1 seed), 3 (diverges in 1 of 1 seed)" in texts(sa, "learning_rate")
    assert verdict(sa, "lr")[0] == "supported"


def test_a_higher_limit_must_hold_for_every_seed(tmp_path):
    def rule(tolerant_seed):
        def inner(v, lr, s, seed):  # nobn's tolerant seed trains at 0.3 as well
            limit = 3.0 if v == "bn" or seed == tolerant_seed else 0.3
            return outcome(diverge=10) if lr >= limit else outcome()
        return inner
    sa = analysed(tmp_path, grid(rule(tolerant_seed=1), seeds=(0, 1)))
    usable = sa.summary.set_index("variant")["usable_lr"]
    assert (usable["bn"], usable["nobn"]) == (0.3, 0.03)  # the smallest over seeds: nobn's seed 0 fails at 0.3
    result, evidence = verdict(sa, "lr")
    assert result == "inconclusive"  # higher in seed 0, equal in seed 1: the seeds disagree
    assert "seed 0: bn 0.3, nobn 0.03 (1 grid step); seed 1: bn 0.3, nobn 0.3 (0 grid steps); bn higher in 1 of 2 " \
           "seeds" in evidence
    assert "bn's is higher in 1 of 2 seeds, so the seeds disagree." in texts(sa, "learning_rate")
    control = analyze_sweep(write_sweep(tmp_path / "control.covshift", grid(rule(tolerant_seed=None), seeds=(0, 1))))
    result, evidence = verdict(control, "lr")
    assert result == "supported" and "bn higher in 2 of 2 seeds" in evidence


def test_seed_ranges_decide_whether_a_difference_is_beyond_the_seed_spread(tmp_path):
    finals = {("bn", 0.003): [0.1, 0.1, 0.12], ("nobn", 0.003): [0.5, 0.6, 0.55],   # apart
              ("bn", 0.03): [0.25, 0.2, 0.2], ("nobn", 0.03): [0.2, 0.2, 0.3]}      # overlapping
    sa = analysed(tmp_path, grid(lambda v, lr, s, seed: outcome(floor=finals.get((v, lr), [0.2] * 3)[seed]),
                                 scales=(1.0,), seeds=(0, 1, 2)))
    found = {f.value: f.text for f in sa.findings if f.text.startswith("At learning rate")}
    assert "bn final loss 0.107 (0.1..0.12)" in found[0.003]
    assert "bn's final loss is lower and the ranges over seeds do not overlap: beyond the spread" in found[0.003]
    assert "the final-loss ranges over seeds overlap: the difference is within the spread across seeds" in found[0.03]
    row = sa.lr[(sa.lr["variant"] == "nobn") & (sa.lr["lr"] == 0.003)].iloc[0]
    assert (row["final_loss_min"], row["final_loss_max"]) == pytest.approx((0.5, 0.6))
    assert row["final_loss"] == pytest.approx(0.55)


# ------------------------------------------------------------------------ initialization

def spread_rule(bn: dict, nobn: dict):
    """Final loss by init scale (None: diverges) per variant, at every lr; final accuracy 1 − final loss,
    so that the spread of either is the same number."""
    def rule(v, lr, s, seed):
        floor = (bn if v == "bn" else nobn)[s]
        return outcome(diverge=10) if floor is None else outcome(floor=floor, acc=1 - floor)
    return rule


def test_init_spread_is_the_range_of_final_loss_across_scales(tmp_path):
    sa = analysed(tmp_path, grid(spread_rule({0.5: 0.3, 1.0: 0.2, 2.0: 0.25}, {0.5: 0.9, 1.0: 0.2, 2.0: 0.6})))
    assert (sa.init_scale, sa.ref_lr) == (1.0, 0.03)  # 0.03 and 0.3 tie around the median lr: the smaller
    row = sa.init_by_seed.iloc[0]
    assert (row["bn_spread"], row["nobn_spread"]) == pytest.approx((0.1, 0.7))  # max - min of 1 - floor
    assert (row["scales"], row["bn_trained"], row["nobn_trained"], row["both"]) == (3, 3, 3, 3)
    result, evidence = verdict(sa, "init")
    assert result == "supported"
    assert "final validation accuracy over the init scales at which both trained (lr 0.03): bn 10 points, nobn 70 " \
           "points over 3 scales; nobn trained at 3 of 3 init scales, bn at 3 of 3" in evidence
    text = texts(sa, "initialization")
    assert "nobn's mean final loss over seeds ranges across 3 init scales from 0.2 (init scale 1) to 0.9 " \
           "(init scale 0.5): a spread of 0.7; it diverges at no init scale." in text
    assert "the spread (max − min) of the final validation accuracy is bn 10 points, nobn 70 points over 3 scales" \
           in text


@pytest.mark.parametrize("bn, nobn, why", [
    # bn diverges at one scale: its smaller spread over the other two does not make it less sensitive
    ({0.5: 0.3, 1.0: 0.2, 2.0: None}, {0.5: 0.9, 1.0: 0.2, 2.0: 0.6},
     "nobn trained at 3 of 3 init scales, bn at 2 of 3"),
    ({0.5: 0.85, 1.0: 0.2, 2.0: 0.5}, {0.5: 0.9, 1.0: 0.2, 2.0: 0.6}, "bn 65 points, nobn 70 points"),  # within margin
])
def test_init_claim_not_supported(tmp_path, bn, nobn, why):
    sa = analysed(tmp_path, grid(spread_rule(bn, nobn)))
    result, evidence = verdict(sa, "init")
    assert result == "not supported" and why in evidence


def test_per_seed_spreads_that_disagree_are_inconclusive(tmp_path):
    finals = {("bn", 0.5): [0.3, 0.3, 0.6], ("bn", 1.0): [0.25, 0.2, 0.2],
              ("nobn", 0.5): [0.5, 0.55, 0.6], ("nobn", 1.0): [0.2, 0.2, 0.3]}
    def rule(v, lr, s, seed):
        return outcome(floor=finals[(v, s)][seed], acc=1 - finals[(v, s)][seed])
    sa = analysed(tmp_path, grid(rule, scales=(0.5, 1.0), seeds=(0, 1, 2)))
    spreads = {v: np.abs(np.subtract(finals[(v, 0.5)], finals[(v, 1.0)])) for v in ("bn", "nobn")}  # 0.05, 0.1, 0.4
    t = sa.init_by_seed.set_index("seed")                                                            # 0.3, 0.35, 0.3
    assert t["bn_spread"].to_numpy() == pytest.approx(spreads["bn"])
    assert t["nobn_spread"].to_numpy() == pytest.approx(spreads["nobn"])
    lower = spreads["bn"] <= 0.9 * spreads["nobn"]
    assert lower.tolist() == [True, True, False]
    result, evidence = verdict(sa, "init")
    assert result == "inconclusive" and "bn lower by 10% in 2 of 3 seeds" in evidence


def test_reference_scale_and_lr_without_init_scale_1(tmp_path):
    sa = analysed(tmp_path, grid(lambda *key: outcome(), lrs=[0.01, 0.1, 1.0, 10.0, 100.0], scales=(0.3, 3.0, 10.0)))
    assert sa.init_scale == 3.0  # |ln 3| < |ln 0.3|
    assert sa.ref_lr == 1.0      # the median of the lrs on a log scale
    assert set(sa.lr["init_scale"]) == {3.0} and set(sa.init["lr"]) == {1.0}


# ---------------------------------------------------------------------- failing settings

def test_failing_settings_compare_saturation_and_gradients_and_name_the_runs(tmp_path):
    def rule(v, lr, s, seed):
        if v == "nobn" and lr >= 0.3:
            return outcome(diverge=12, sat=0.7, g2=1000.0)
        return outcome(sat=0.05)
    sa = analysed(tmp_path, grid(rule, lrs=[0.03, 0.3], scales=(1.0, 2.0)))
    lr_text, init_text = texts(sa, "learning_rate"), texts(sa, "initialization")
    assert ("At learning rate 0.3, init scale 1, nobn diverges in 1 of 1 seed (seed 0 at step 12, first "
            "non-finite output in `fc2`) while bn trains (final loss 0.2). Mean saturation bn 5%, nobn 70%; median "
            "first/last Linear/Conv gradient ratio bn 0.5 (attenuates 2×, healthy), nobn 0.001 (attenuates 1,000×, "
            "vanishing). Runs to compare: "
            "`bn lr=0.3 init=1 seed=0` and `nobn lr=0.3 init=1 seed=0` "
            "([saturation](pairs/lr=0.3_init=1_seed=0/saturation.png), "
            "[gradient flow](pairs/lr=0.3_init=1_seed=0/gradient_flow.png)).") in lr_text
    assert "`nobn lr=0.3 init=2 seed=0`" in init_text and "`nobn lr=0.3 init=2 seed=0`" not in lr_text
    same = analysed(tmp_path / "same", grid(lambda *key: outcome(), lrs=[0.03, 0.3], scales=(1.0,)))
    assert "At all 2 settings of the sweep bn and nobn either both train or both fail" in texts(same, "learning_rate")


# ------------------------------------------------------------------------------- figures

PNG = b"\x89PNG\r\n\x1a\n"


def test_figures_mark_diverged_settings(tmp_path):
    sa = analysed(tmp_path, grid(diverging_at(bn_limit=3.0, nobn_limit=0.3), seeds=(0, 1)))
    written = save_sweep_figures(sa, tmp_path / "figs")
    assert set(written) == {"lr_sensitivity.png", "init_sensitivity.png", "sweep_grid.png"}
    for path in written.values():
        assert path.read_bytes()[:8] == PNG
    colors = {v: style.PALETTE[v] for v in ("bn", "nobn")}
    ax = sweep_figures.lr_sensitivity(sa).axes[0]
    assert ax.get_xscale() == "log"
    crosses = {line.get_color(): sorted(line.get_xdata()) for line in ax.lines if line.get_marker() == "x"}
    assert crosses == {colors["bn"]: [3.0], colors["nobn"]: [0.3, 3.0]}
    labels = [t.get_text() for t in sweep_figures.sweep_grid(sa).axes[1].texts]  # nobn: 2 of 4 lrs diverge, 3 scales
    assert labels.count("div") == 6 and len(labels) == 12


# -------------------------------------------------------------------------------- report

def sweep_for_report(v, lr, s, seed):
    """Diverging like the first test; the pair the report describes has distinctive numbers."""
    if lr >= (3.0 if v == "bn" else 0.3):
        return outcome(diverge=10)
    if (lr, s, seed) == (0.03, 1.0, 0):
        return outcome(floor=0.123 if v == "bn" else 0.456, acc=0.81 if v == "bn" else 0.79)
    floor = {0.5: 0.3, 1.0: 0.2, 2.0: 0.25}[s] if v == "bn" else {0.5: 0.9, 1.0: 0.2, 2.0: 0.6}[s]
    return outcome(floor=floor, acc=0.9 - floor / 2)


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep_report")
    path = write_sweep(folder / "trace.covshift", grid(sweep_for_report, seeds=(0, 1)))
    written = report(path, folder / "out")
    return written, (folder / "out" / "report.md").read_text()


def test_report_of_a_sweep_has_the_sections_and_the_claims(sweep_report):
    written, md = sweep_report
    for name in ("lr_sensitivity.png", "init_sensitivity.png", "sweep_grid.png"):
        assert written[name].read_bytes()[:8] == PNG and f"![{name}]({name})" in md
    lr, init, claims_at = (md.index(h) for h in ("## Effect on learning rate", "## Interaction with initialization",
                                                 "## BatchNorm claims"))
    assert lr < init < claims_at
    assert "Usable learning rates per seed (seed 0: bn 0.3, nobn 0.03; seed 1: bn 0.3, nobn 0.03): bn's is higher " \
           "in 2 of 2 seeds" in md[lr:init]
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ") and "**" in line}
    assert rows["higher usable learning rate"].startswith(
        "| higher usable learning rate | **supported** | usable learning rate (the largest learning rate whose run "
        "trained and ends within 2 points of the variant's best final validation accuracy; init scale 1): seed 0: "
        "bn 0.3, nobn 0.03 (1 grid step); seed 1: bn 0.3, nobn 0.03 (1 grid step); bn higher in 2 of 2 seeds "
        "| lr_sensitivity.png |")
    # accuracy 0.9 - floor / 2 at lr 0.03 and init scales 0.5, 1, 2; seed 0 at scale 1: bn 0.81, nobn 0.79
    acc = {"bn": np.array([0.75, 0.8, 0.775]), "nobn": np.array([0.45, 0.8, 0.6])}
    seed0 = {"bn": np.array([0.75, 0.81, 0.775]), "nobn": np.array([0.45, 0.79, 0.6])}
    spread = {(v, k): np.ptp(a[v]) * 100 for k, a in ((0, seed0), (1, acc)) for v in a}
    assert "| lower sensitivity to initialization | **supported** | spread (max − min) of the final validation " \
           f"accuracy over the init scales at which both trained (lr 0.03): seed 0: bn {spread['bn', 0]:.3g} " \
           f"points, nobn {spread['nobn', 0]:.3g} points over 3 scales; seed 1: bn {spread['bn', 1]:.3g} points, " \
           f"nobn {spread['nobn', 1]:.3g} points over 3 scales" in rows["lower sensitivity to initialization"]
    assert "init_sensitivity.png |" in rows["lower sensitivity to initialization"]
    page = written["report.html"].read_text()
    figures = [name for name in written if name.endswith(".png")]  # placeholders are not written
    assert len(figures) == 6 and page.count("data:image/png;base64,") == len(figures)


def test_report_of_a_sweep_describes_the_default_pair(sweep_report):
    _, md = sweep_report
    assert "`bn` (run `bn lr=0.03 init=1 seed=0`) and `nobn` (run `nobn lr=0.03 init=1 seed=0`)" in md
    for run, final in (("bn", 0.123), ("nobn", 0.456)):
        assert re.search(rf"\| `{run}` \| \*\*[a-z ]+\*\* \| 100 \| [0-9.]+% \| [0-9.]+ → {final:.3g} \|", md), run
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ") and "**" in line}
    # these runs log no train_eval_loss: their last evaluations are compared, and said to be
    assert "bn 81.0%, nobn 79.0%" in rows["better generalization"]
    assert "not matched (no eval-mode training loss)" in rows["better generalization"]
    assert "**supported (1 seed)**" in rows["better generalization"]


def test_a_sweep_trace_with_its_own_pair_reports_that_pair(tmp_path):
    path = write_sweep(tmp_path / "t.covshift", grid(sweep_for_report, lrs=[0.03, 0.3], scales=(1.0, 2.0)),
                       plain={"bn": outcome(acc=0.55), "nobn": outcome(acc=0.44)})
    with covshift.load(path) as trace:
        sa = analyze_sweep(trace)
        assert sweep.default_pair(trace, sa) == {"bn": "bn", "nobn": "nobn"}
        assert len(sa.runs) == 8  # the plain runs are not sweep runs
        view = sweep.RunView(trace, sweep.default_pair(trace, sa))
        a = covshift.analyze(view)
    evidence = {c.claim: c.evidence for c in claims(a, sweep=sa)}
    assert "bn 55.0%, nobn 44.0%" in evidence["better generalization"]
    assert "bn 0.3, nobn 0.03" in evidence["higher usable learning rate"]


def test_run_view_renames_and_restricts(tmp_path):
    path = write_sweep(tmp_path / "v.covshift", grid(lambda *key: outcome(), lrs=[0.1], scales=(1.0,), seeds=(0, 1)))
    with covshift.load(path) as trace:
        view = sweep.RunView(trace, {"bn": name("bn", 0.1, 1.0, 1), "nobn": name("nobn", 0.1, 1.0, 1)})
        assert view.runs == ["bn", "nobn"] and view.layers == ["fc1", "act1", "fc2"]
        assert view.config("bn")["seed"] == 1
        assert set(view.scalars()["run"]) == {"bn", "nobn"} and len(view.scalars(run="bn", metric="loss")) == STEPS
        assert set(view.layer_info()["run"]) == {"bn", "nobn"} and view.units().empty
        with pytest.raises(KeyError):
            view.config(name("bn", 0.1, 1.0, 0))
        view.close()
        assert len(trace.runs) == 4  # the trace is still open


def test_plain_report_has_no_sweep_sections(tmp_path):
    path = write_sweep(tmp_path / "p.covshift", {}, plain={"bn": outcome(), "nobn": outcome(slope=0.01)})
    written = report(path, tmp_path / "out", formats=("md",))
    md = written["report.md"].read_text()
    assert "## Effect on learning rate" not in md and "lr_sensitivity.png" not in written
    assert "| higher usable learning rate | **not measured** | needs a sweep over --lr" in md


def test_report_draws_the_pairs_its_findings_link(tmp_path):
    """The sweep report writes saturation and gradient-flow figures for the failing pairs it links."""
    from covshift.analysis.sweep_findings import pair_folder

    def rule(v, lr, s, seed):
        return outcome(diverge=12, sat=0.7, g2=1000.0) if v == "nobn" and lr >= 0.3 else outcome(sat=0.05)

    path = write_sweep(tmp_path / "sweep.covshift", grid(rule, lrs=[0.03, 0.3, 3.0], scales=(1.0,)))
    written = covshift.report(path, tmp_path / "out")
    linked = [f for f in analyze_sweep(path).findings if len(f.runs) == 2]
    assert len(linked) == 2
    page = written["report.html"].read_text()
    for finding in linked:
        folder = tmp_path / "out" / pair_folder(finding.runs[0])
        assert (folder / "saturation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (folder / "gradient_flow.png").is_file()
        assert f'href="{pair_folder(finding.runs[0])}/saturation.png"' in page
