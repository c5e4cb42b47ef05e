"""The report: claims decided from numbers, Markdown and self-contained HTML, the CLI."""

import re

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import fit
from torch import nn
from typer.testing import CliRunner

import covshift
from covshift.analysis import Analysis
from covshift.cli import app
from covshift.analysis.claims import claims

FIGURES = ["batchnorm_training_loss.png", "activations.png", "percentiles.png", "saturation.png",
           "covariate_shift.png", "gradient_flow.png", "histograms.png"]

MODEL_FILE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

config = {"lr": 0.2, "batch_size": 16, "seed": 0}


def build_model():
    return nn.Sequential(nn.Linear(6, 12), nn.Sigmoid(), nn.Linear(12, 12), nn.Sigmoid(), nn.Linear(12, 3))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return TensorDataset(x[:128], y[:128]), TensorDataset(x[128:], y[128:])
'''


def decay(noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a noisy geometric decay: its roughness grows with ``noise``."""
    steps = np.arange(300)
    return steps, 2.0 * np.exp(-steps / 100) * np.exp(noise * np.random.default_rng(seed).standard_normal(300))


CALM, ROUGH = decay(0.01, 0), decay(0.1, 1)


def analysis(losses: dict | None = None, **frames: pd.DataFrame) -> Analysis:
    """An Analysis of a bn/nobn pair from the given frames and losses, empty elsewhere."""
    empty = pd.DataFrame()
    defaults = dict(
        convergence=pd.DataFrame({"run": ["bn", "nobn"], "initial_loss": [2.0, 2.0], "final_loss": [0.1, 0.2],
                                  "steps_to_90": [5, 10], "steps_to_50": [20, 40], "steps_to_10": [50, 100],
                                  "smoothing_window": [6, 6], "loss_auc": [1.0, 2.0]}),
        stability=pd.DataFrame({"run": ["bn", "nobn"], "roughness": [0.01, 0.1], "val_spikes": [0, 2]}),
        generalization=pd.DataFrame({"run": ["bn", "nobn"], "train_loss": [0.1, 0.2], "val_loss": [0.2, 0.3],
                                     "val_accuracy": [0.95, 0.90], "gap": [0.1, 0.1]}),
        shift_summary=pd.DataFrame({"run": ["bn", "nobn"], "layer": ["1", "1"], "mean_w2_prev": [0.1, 0.5],
                                    "mean_w1_prev": [0.1, 0.5]}),
    )
    defaults.update(frames)
    return Analysis(runs=["bn", "nobn"], convergence=defaults["convergence"], stability=defaults["stability"],
                    generalization=defaults["generalization"], saturation=empty, gradient_flow=empty,
                    gradient_summary=empty, covariate_shift=empty, shift_summary=defaults["shift_summary"],
                    divergence=empty, findings=[],
                    losses={"bn": CALM, "nobn": ROUGH} if losses is None else losses)


def verdicts(a: Analysis) -> dict[str, str]:
    return {c.claim: c.verdict for c in claims(a)}


def test_claims_supported_when_bn_is_better():
    v = verdicts(analysis())
    assert v["faster convergence"] == "supported"
    assert v["smoother, stabler training"] == "supported"
    assert v["reduced internal covariate shift"] == "supported"
    assert v["better generalization"] == "supported"
    assert v["higher usable learning rate"] == "not measured in this trace"
    assert v["lower sensitivity to initialization"] == "not measured in this trace"


def test_claims_not_supported_when_the_data_say_otherwise():
    a = analysis(
        losses={"bn": ROUGH, "nobn": CALM},
        convergence=pd.DataFrame({"run": ["bn", "nobn"], "initial_loss": [2.0, 2.0], "final_loss": [0.1, 0.1],
                                  "steps_to_90": [5, 5], "steps_to_50": [40, 42], "steps_to_10": [96, 100],
                                  "smoothing_window": [6, 6], "loss_auc": [1.0, 1.0]}),
        stability=pd.DataFrame({"run": ["bn", "nobn"], "roughness": [0.1, 0.01], "val_spikes": [2, 0]}),
        generalization=pd.DataFrame({"run": ["bn", "nobn"], "train_loss": [0.1, 0.1], "val_loss": [0.3, 0.2],
                                     "val_accuracy": [0.90, 0.905], "gap": [0.2, 0.1]}),
        shift_summary=pd.DataFrame({"run": ["bn", "nobn"], "layer": ["1", "1"], "mean_w2_prev": [0.5, 0.5],
                                    "mean_w1_prev": [0.5, 0.5]}))
    v = verdicts(a)
    assert v["faster convergence"] == "not supported"  # 96 vs 100 steps is within the 10% margin
    assert v["smoother, stabler training"] == "not supported"
    assert v["reduced internal covariate shift"] == "not supported"
    assert v["better generalization"] == "not supported"


def test_claims_evidence_carries_the_numbers():
    evidence = {c.claim: c.evidence for c in claims(analysis())}
    assert "bn 50, nobn 100" in evidence["faster convergence"]
    assert "95.0%" in evidence["better generalization"] and "90.0%" in evidence["better generalization"]


def test_single_run_claims_are_not_measured():
    a = analysis()
    a.runs = ["run"]
    assert set(verdicts(a).values()) == {"not measured in this trace"}


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    (folder / "net.py").write_text(MODEL_FILE)
    result = CliRunner().invoke(app, ["trace", str(folder / "net.py"), "--epochs", "3", "--detail-every", "4",
                                      "--out", str(folder / "out")])
    assert result.exit_code == 0, result.output
    return folder / "out", result.output


def test_trace_writes_the_report(traced):
    out, output = traced
    for name in FIGURES + ["report.md", "report.html"]:
        assert (out / name).is_file(), name
    assert "report.html" in output
    md = (out / "report.md").read_text()
    for section in ("## Summary", "## Convergence and stability", "## Generalization", "## Saturation",
                    "## Gradient flow", "## Covariate shift", "## BatchNorm claims"):
        assert section in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "**" in line]
    assert len(rows) == 7
    assert all(re.search(r"\*\*(supported|not supported|not measured in this trace)\*\*", r) for r in rows)
    assert "Regenerate with: `covshift trace " in md and "--detail-every 4" in md


def test_html_is_self_contained_with_every_figure(traced):
    out, _ = traced
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)
    for name in FIGURES:
        assert f'alt="{name}"' in page
    assert "src=\"http" not in page and "<link" not in page


def test_report_numbers_come_from_the_trace(traced):
    out, _ = traced
    trace = covshift.load(out / "trace.covshift")
    md = (out / "report.md").read_text()
    for run in ("bn", "nobn"):
        loss = trace.scalars(run=run, metric="loss")["value"].iloc[-1]
        assert f"final training loss {loss:.4g}" in md


def test_report_command_and_format(traced, tmp_path):
    out, _ = traced
    result = CliRunner().invoke(app, ["report", str(out / "trace.covshift"), "--out", str(tmp_path), "--format", "md"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.md").is_file() and not (tmp_path / "report.html").exists()
    bad = CliRunner().invoke(app, ["report", str(out / "trace.covshift"), "--format", "pdf"])
    assert bad.exit_code == 2 and "--format" in bad.output
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "none.covshift")])
    assert missing.exit_code == 2 and "no trace file" in missing.output


def test_report_of_an_own_loop_trace_escapes_layer_names(tmp_path):
    model = nn.Sequential()
    model.add_module("<script>alert(1)</script>", nn.Linear(3, 4))
    model.add_module("act", nn.Tanh())
    model.add_module("head", nn.Linear(4, 2))
    path = tmp_path / "own.covshift"
    fit(model, path, torch.randn(8, 3), None, 6, loss_fn=lambda out, _: out.pow(2).mean(), detail_every=2)
    written = covshift.report(path, tmp_path / "r")
    page = written["report.html"].read_text()
    assert "<script>" not in page
    assert "`<script>alert(1)</script>`" in (tmp_path / "r" / "report.md").read_text()  # named by a finding
    assert "<code>&lt;script&gt;alert(1)&lt;/script&gt;</code>" in page


def test_claims_compare_the_named_pair():
    renamed = {"bn": "bn lr=0.1 init=1 seed=0", "nobn": "nobn lr=0.1 init=1 seed=0"}
    frames = {}
    for key in ("convergence", "stability", "generalization", "shift_summary"):
        frame = getattr(analysis(), key)
        frames[key] = frame.assign(run=frame["run"].map(renamed))
    a = analysis(losses={renamed["bn"]: CALM, renamed["nobn"]: ROUGH}, **frames)
    a.runs = list(renamed.values())
    assert set(verdicts(a).values()) == {"not measured in this trace"}  # no runs named bn and nobn
    named = {c.claim: c for c in claims(a, pair=tuple(renamed.values()))}
    assert named["faster convergence"].verdict == "supported"
    assert "bn 50, nobn 100" in named["faster convergence"].evidence
    assert named["reduced internal covariate shift"].verdict == "supported"
    assert named["higher usable learning rate"].verdict == "not measured in this trace"


def test_a_sweep_decides_the_learning_rate_and_initialization_claims(tmp_path):
    from covshift.store import TraceWriter
    from covshift.analysis.sweep import analyze_sweep
    writer = TraceWriter(tmp_path / "s.covshift")
    for variant in ("bn", "nobn"):
        for lr in (0.1, 1.0):
            for scale in (0.5, 1.0):
                diverged = variant == "nobn" and lr == 1.0
                loss = [2.0 - 0.01 * t for t in range(50)] + ([float("inf")] if diverged else [])
                rid = writer.add_run(f"{variant} lr={lr:g} init={scale:g} seed=0", {
                    "sweep": True, "variant": variant, "lr": lr, "init_scale": scale, "seed": 0,
                    "steps": len(loss), "diverged_at": 50 if diverged else None})
                writer.write(rid, [(t, "", "loss", v + (0.5 if scale == 0.5 and variant == "nobn" else 0.0))
                                   for t, v in enumerate(loss)], [], [])
    writer.close()
    found = {c.claim: c for c in claims(analysis(), sweep=analyze_sweep(tmp_path / "s.covshift"))}
    lr, init = found["higher usable learning rate"], found["lower sensitivity to initialization"]
    assert (lr.verdict, lr.figure) == ("supported", "lr_sensitivity.png")
    assert "bn 1, nobn 0.1 (ratio 10, 1 grid step)" in lr.evidence
    assert (init.verdict, init.figure) == ("supported", "init_sensitivity.png")
    assert "bn 0, nobn 0.5" in init.evidence
    assert found["faster convergence"].verdict == "supported"  # still from the pair
