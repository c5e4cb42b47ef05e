"""The shipped example runs as the README says and writes a readable trace."""

import pathlib
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import covshift
from covshift.cli import app
from helpers import torchrun

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_trace_own_loop_example(tmp_path):
    out = tmp_path / "own.covshift"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "trace_own_loop.py"), "--epochs", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    trace = covshift.load(out)
    assert trace.runs == ["sigmoid-mlp"]
    assert trace.config("sigmoid-mlp")["steps"] == 46  # 1438 training digits, batch 64, 2 epochs
    assert "saturation" in done.stdout and "gain" in done.stdout
    sigmoids = trace.layer_info().query("nonlinearity == 'sigmoid'")["layer"].tolist()
    assert sigmoids == ["1", "3", "5"]


EXAMPLE_FILES = ["mlp_sigmoid", "deep_tanh", "cnn", "resnet"]


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_model_files_trace(name, tmp_path):
    """Every shipped model file traces both variants (a few steps here; the full run is the README's)."""
    result = CliRunner().invoke(app, ["trace", str(ROOT / "examples" / f"{name}.py"), "--steps", "3",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    trace = covshift.load(tmp_path / "trace.covshift")
    assert trace.runs == ["bn", "nobn"]
    info = trace.layer_info()
    bn_types = set(info[info["run"] == "bn"]["type"])
    nobn_types = set(info[info["run"] == "nobn"]["type"])
    assert any(t.startswith("BatchNorm") for t in bn_types)
    assert not any(t.startswith("BatchNorm") for t in nobn_types)
    for run in trace.runs:
        assert trace.config(run)["steps"] == 3
        assert trace.config(run)["variant"] == run


def test_derived_variants_keep_layer_names(tmp_path):
    """mlp_sigmoid gets BatchNorm1d after each hidden Linear; resnet loses its BatchNorm to Identity."""
    runner = CliRunner()
    for name in ("mlp_sigmoid", "resnet"):
        out = tmp_path / name
        assert runner.invoke(app, ["trace", str(ROOT / "examples" / f"{name}.py"), "--steps", "1",
                                   "--out", str(out)]).exit_code == 0
        info = covshift.load(out / "trace.covshift").layer_info()
        bn = info[info["run"] == "bn"].set_index("layer")["type"]
        nobn = info[info["run"] == "nobn"].set_index("layer")["type"]
        if name == "mlp_sigmoid":
            assert [n for n in bn.index if n.endswith("_bn")] == ["0_bn", "2_bn", "4_bn"]
            assert (bn[["0_bn", "2_bn", "4_bn"]] == "BatchNorm1d").all()
            assert list(nobn.index) == [n for n in bn.index if not n.endswith("_bn")]
        else:
            replaced = [n for n, t in bn.items() if t == "BatchNorm2d"]
            assert replaced and (nobn[replaced] == "Identity").all()


def test_readme_quotes_the_report_of_the_main_job(tmp_path):
    """The README's quoted report lines come from `covshift trace examples/mlp_sigmoid.py`."""
    result = CliRunner().invoke(app, ["trace", str(ROOT / "examples" / "mlp_sigmoid.py"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = " ".join((tmp_path / "report.md").read_text().split())
    readme = (ROOT / "README.md").read_text()
    quote = "\n".join(line[2:] if line.startswith("> ") else "" for line in readme.splitlines()
                      if line.startswith(">"))
    fragments = [" ".join(p.replace("…", "").split()) for p in quote.split("\n\n") if p.strip()]
    assert len(fragments) >= 3
    for fragment in fragments:
        assert " ".join(fragment.split()) in report, fragment
    table = result.output
    for row in [line for line in readme.splitlines() if line.startswith("│ bn ") or line.startswith("│ nobn")]:
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert all(cell in table for cell in cells[:5]), row  # run, steps, losses, accuracy


def test_report_gallery():
    """The committed gallery: small, every report names its regenerating command, linked from the README."""
    gallery = ROOT / "reports"
    files = [p for p in gallery.rglob("*") if p.is_file() and p.suffix != ".covshift"]
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    index = (gallery / "README.md").read_text()
    reports = sorted(gallery.glob("*/report.md"))
    assert len(reports) >= 2
    for report in reports:
        first = report.read_text().splitlines()[2]
        command = first.removeprefix("Regenerate with: `").removesuffix("`")
        assert command.startswith(("covshift trace examples/", "covshift sweep examples/")), first
        assert f"`{command}`" in index
        assert (report.parent / "report.html").is_file()
    readme = (ROOT / "README.md").read_text()
    for link in ("reports/mlp_sigmoid/batchnorm_training_loss.png", "reports/README.md"):
        assert link in readme and (ROOT / link).is_file()


def test_ddp_example_under_torchrun(tmp_path):
    out = tmp_path / "ddp.covshift"
    done = torchrun(ROOT / "examples" / "ddp_train.py", "--epochs", "1", "--out", out, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    trace = covshift.load(out)
    assert trace.config("ddp")["tracer"]["world_size"] == 2
    assert len(trace.series("ddp", "", "loss")[0]) == 23  # 1438 digits, global batch 64
    assert trace.layers == [str(i) for i in range(7)]  # no "module." prefix
    assert "ranks: 2" in done.stdout
