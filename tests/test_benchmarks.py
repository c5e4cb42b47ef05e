"""benchmarks/overhead.py and benchmarks/distributed.py run end to end on a tiny budget
(their figures are the README's; here only that they run and print them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import covshift

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ENV = {**os.environ, "PYTHONPATH": str(Path(covshift.__file__).parents[1])}


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_overhead_prints_the_ratio_and_the_cost_per_layer() -> None:
    out = run("overhead.py", "--models", "mlp", "--threads", "1", "--rounds", "1", "--block", "2", "--breakdown")
    assert "traced/plain" in out and "µs per layer and step" in out
    assert "floor (hooks that copy" in out
    assert "PyTorch's hooks" in out and "covshift in the hooks" in out and "step()" in out and "flush" in out


def test_distributed_times_the_collectives_on_every_rank() -> None:
    out = run("distributed.py", "--model", "mlp", "--rounds", "1", "--block", "3", "--flush-every", "2")
    lines = [line for line in out.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2 and all("gather" in line and "sent" in line for line in lines)
    assert sum("merge" in line for line in lines) == 1  # rank 0 merges
