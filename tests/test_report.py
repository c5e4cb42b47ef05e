"""The report: claims decided from numbers, Markdown and self-contained HTML, the CLI."""

import base64
import re

import pandas as pd
import pytest
import torch
from helpers import fit
from torch import nn
from typer.testing import CliRunner

import covshift
from covshift.cli import app
from covshift.analysis import analyze
from covshift.analysis.claims import CLAIMS, VERDICTS, claims
from covshift.report.html import to_html

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
    for section in ("## Run outcomes", "## How the layers are compared", "## Convergence and stability", "## Generalization", "## Saturation",
                    "## Gradient flow", "## Covariate shift", "## BatchNorm claims"):
        assert section in md
    rows = [line for line in md.splitlines() if line.split(" | ")[0][2:] in CLAIMS]
    assert len(rows) == len(CLAIMS)
    labels = "|".join(VERDICTS)
    assert all(re.search(rf"\*\*({labels})( \(1 seed\))?\*\*", r) for r in rows)
    assert "Regenerate with: `covshift trace " in md and "--detail-every 4" in md


def test_html_is_self_contained_with_every_figure(traced):
    out, _ = traced
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)
    for name in FIGURES:
        assert f'alt="{name}"' in page and f"<figcaption>{name}</figcaption>" in page
    assert "src=\"http" not in page and "<link" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(FIGURES) and all(s.startswith("data:image/png;base64,") for s in sources)


def test_html_escapes_names_in_code_and_text():
    md = ("# covshift report\n\n"
          "- `<script>alert(1)</script>`: a & b cost $5\n"
          "- `` a`b ``, `x | y` and `$HOME`\n\n"
          "Plain <script>alert(2)</script> & more.\n")
    page = to_html(md, {})
    assert "<script>" not in page
    assert "<li><code>&lt;script&gt;alert(1)&lt;/script&gt;</code>: a &amp; b cost $5</li>" in page
    assert "<code>a`b</code>" in page and "<code>x | y</code>" in page and "<code>$HOME</code>" in page
    assert "<p>Plain &lt;script&gt;alert(2)&lt;/script&gt; &amp; more.</p>" in page


def test_html_renders_headings_lists_tables_links_and_bold():
    md = ("# covshift report\n\n## Summary\n\n- one\n- two\n\nSee [the docs](https://example.org/a?b=1&c=2).\n\n"
          "| claim | verdict | evidence |\n|---|---|---|\n| faster convergence | **supported** | `a\\|b` |\n")
    page = to_html(md, {})
    assert page.startswith("<!DOCTYPE html>") and "<title>covshift report</title>" in page
    assert "<h1>covshift report</h1>" in page and "<h2>Summary</h2>" in page
    assert re.search(r"<ul>\s*<li>one</li>\s*<li>two</li>\s*</ul>", page)
    assert '<a href="https://example.org/a?b=1&amp;c=2">the docs</a>' in page
    assert re.search(r"<table>\s*<thead>\s*<tr>\s*<th>claim</th>\s*<th>verdict</th>\s*<th>evidence</th>", page)
    assert re.search(r"<td>faster convergence</td>\s*<td><strong>supported</strong></td>\s*<td><code>a\|b</code></td>",
                     page)
    assert page.count("<tr>") == 2 and "|---" not in page


def test_html_embeds_figures_and_leaves_other_images(tmp_path):
    png = tmp_path / "loss.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    md = "## Convergence\n\n![loss.png](loss.png)\n![loss.png](loss.png)\n\n![other.png](other.png)\n"
    page = to_html(md, {"loss.png": png})
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    assert page.count(f'src="data:image/png;base64,{data}"') == 2
    assert page.count("<figure>") == 2 and page.count("<figcaption>loss.png</figcaption>") == 2
    assert "<p><figure>" not in page  # a paragraph of figures is not a <p>
    assert '<img src="other.png" alt="other.png"' in page  # not a figure of this report: as written
    assert [s for s in re.findall(r'src="([^"]*)"', page) if not s.startswith("data:")] == ["other.png"]


def test_report_numbers_come_from_the_trace(traced):
    out, _ = traced
    trace = covshift.load(out / "trace.covshift")
    md = (out / "report.md").read_text()
    a = covshift.analyze(trace)
    for run in ("bn", "nobn"):
        first = trace.scalars(run=run, metric="loss")["value"].iloc[0]
        outcome = a.outcomes.set_index("run").loc[run]
        assert f"| `{run}` | **{outcome['outcome']}** |" in md
        assert f"{first:.3g} → {outcome['final_loss']:.3g}" in md


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


def test_a_sweep_decides_the_learning_rate_and_initialization_claims(tmp_path):
    from covshift.store import TraceWriter
    from covshift.analysis.sweep import RunView, analyze_sweep, default_pair
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
    sweep = analyze_sweep(tmp_path / "s.covshift")
    pair = RunView(covshift.load(tmp_path / "s.covshift"), default_pair(covshift.load(tmp_path / "s.covshift"), sweep))
    found = {c.claim: c for c in claims(analyze(pair), sweep=sweep)}
    lr, init = found["higher usable learning rate"], found["lower sensitivity to initialization"]
    assert (lr.verdict, lr.figure) == ("supported", "lr_sensitivity.png")
    assert "bn 1, nobn 0.1 (1 grid step)" in lr.evidence and lr.label == "supported (1 seed)"
    assert (init.verdict, init.figure) == ("supported", "init_sensitivity.png")
    assert "bn 0, nobn 0.5" in init.evidence
    # the other claims come from the sweep's default pair, whose two loss curves are the same
    assert found["faster convergence"].verdict == "not supported"
