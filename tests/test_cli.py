"""The command line: --help, --version, info, and clear errors."""

import subprocess
import sys

import torch
from torch import nn
from typer.testing import CliRunner

import covshift
from covshift.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"covshift {covshift.__version__}"


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "info" in result.output and "--version" in result.output


def test_info(tmp_path):
    path = tmp_path / "t.covshift"
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with covshift.Tracer(model, path, run="demo") as tracer:
        for _ in range(3):
            loss = model(torch.randn(5, 3)).pow(2).mean()
            loss.backward()
            tracer.step(loss=loss)
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "demo" in result.output and "saturation" in result.output
    expected = f"{loss.item():.4g}"
    assert expected in result.output


def test_info_bad_file_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bad.covshift"
    path.write_text("not a trace")
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 2
    assert "not a covshift trace" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_console_script_subprocess(tmp_path):
    done = subprocess.run([sys.executable, "-m", "covshift", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and covshift.__version__ in done.stdout
    missing = subprocess.run([sys.executable, "-m", "covshift", "info", str(tmp_path / "none.covshift")],
                             capture_output=True, text=True)
    assert missing.returncode == 2
    assert "no trace file" in missing.stderr and "Traceback" not in missing.stderr


def test_version_and_help_start_without_the_heavy_libraries():
    """`covshift --version` and `--help` import neither torch, pandas, matplotlib nor ray (that
    is what made them take seconds); `import covshift` neither, until a public name is used."""
    import subprocess
    import sys
    code = ("import sys; from typer.testing import CliRunner; from covshift.cli import app; "
            "r1 = CliRunner().invoke(app, ['--version']); r2 = CliRunner().invoke(app, ['--help']); "
            "assert r1.exit_code == 0 and r2.exit_code == 0, (r1.output, r2.output); "
            "import covshift; "
            "print(sorted(m for m in ('torch', 'pandas', 'matplotlib', 'scipy', 'ray') if m in sys.modules)); "
            "covshift.load; print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]", out
    assert out[1] == "True"  # a public name imports its module on first use
    code = "import covshift.report.figures, covshift; print(callable(covshift.report))"  # the package first
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "True\n"
