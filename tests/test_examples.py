"""The shipped example runs as the README says and writes a readable trace."""

import pathlib
import subprocess
import sys

import covshift

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
