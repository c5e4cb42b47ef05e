"""benchmarks/peers.py --quick runs end to end and prints its Markdown table."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "peers.py"
PEERS = ["fastai ActivationStats, its default", "fastai ActivationStats, every layer", "wandb.watch all",
         "TensorBoard histograms", "TorchLens", "cockpit economy"]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_peers_benchmark_quick_prints_table():
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    header = cells(next(line for line in lines if line.startswith("| model |")))
    assert header == ["model", "plain ms/step", "covshift default", "covshift every=10", *PEERS]
    row = dict(zip(header, cells(next(line for line in lines if line.startswith("| mlp |")))))
    for measured in ("plain ms/step", "covshift default", "covshift every=10"):
        assert float(row[measured]) > 0
    assert all(row[peer] in ("not installed", "skipped (--quick)") for peer in PEERS), row


def test_peers_benchmark_rejects_unknown_column():
    done = subprocess.run([sys.executable, str(SCRIPT), "--columns", "covshift,tensorflow"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "unknown --columns tensorflow" in done.stderr
    assert "Traceback" not in done.stderr
