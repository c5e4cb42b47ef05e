"""benchmarks/overhead.py and benchmarks/distributed.py run end to end on a tiny budget
(their figures are the README's; here only that they run and print them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def _in_git() -> bool:
    return subprocess.run(["git", "-C", str(BENCHMARKS), "rev-parse", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _in_git(), reason="--compare needs the git repository")
def test_overhead_compares_with_a_git_commit_by_cpu_time() -> None:
    out = run("overhead.py", "--models", "mlp", "--threads", "1", "--rounds", "2", "--block", "2",
              "--compare", "HEAD", "--clock", "cpu")
    line = next(line for line in out.splitlines() if "traced/traced at HEAD:" in line)
    assert "quartiles" in line and "at HEAD traced/plain" in line
    done = subprocess.run([sys.executable, str(BENCHMARKS / "overhead.py"), "--models", "mlp", "--rounds", "1",
                           "--compare", "no-such-ref"], capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode != 0 and "--compare no-such-ref" in done.stderr and "Traceback" not in done.stderr


def test_distributed_times_the_collectives_on_every_rank() -> None:
    out = run("distributed.py", "--model", "mlp", "--rounds", "1", "--block", "3", "--flush-every", "2")
    lines = [line for line in out.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2 and all("gather" in line and "sent" in line for line in lines)
    assert sum("merge" in line for line in lines) == 1  # rank 0 merges


def test_step_timer_gives_every_block_its_share_of_the_flushes() -> None:
    """A flush lands in one block of several; the median over blocks would leave it out."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from overhead import StepTimer
    finally:
        sys.path.remove(str(BENCHMARKS))

    class Clockwork:  # step() takes 1 s, 10 s when it flushes (every 4th step)
        flush_every, now, index = 4, 0.0, 0

        def step(self, loss: object) -> int:
            self.index += 1
            self.now += 10.0 if self.index % self.flush_every == 0 else 1.0
            return self.index - 1

    fake = Clockwork()
    timer = StepTimer(fake, clock=lambda: fake.now)  # type: ignore[arg-type]
    times = []
    for _ in range(4):  # blocks of 2 steps: the 2nd and 4th hold a flush
        start = fake.now
        timer.step(None), timer.step(None)  # type: ignore[arg-type]
        times.append(fake.now - start)
    assert times == [2.0, 11.0, 2.0, 11.0]
    assert timer.flush_share() == pytest.approx(18.0 / 8)  # 9 s more, twice, over 8 steps
    assert timer.spread(times, 2) == pytest.approx([6.5] * 4)


def test_bounds_splits_the_overhead_into_phases_parts_and_operators() -> None:
    out = run("bounds.py", "--models", "mlp", "--threads", "1", "--rounds", "2", "--block", "3", "--profile", "2")
    lines = out.splitlines()
    rows = {}  # a phase's row: plain, bare hooks, traced, left (µs), then the parts in it
    for line in lines:
        found = re.match(r"\s+(forward|backward|optimizer|step\(\))((?:\s+[-+]?\d+){4})\s+(.*)$", line)
        if found:
            rows[found[1]] = ([float(w) for w in found[2].split()], found[3])
    assert set(rows) == {"forward", "backward", "optimizer", "step()"}
    assert "forward hooks" in rows["forward"][1] and "gradient hooks" in rows["backward"][1]
    assert "learning rates" in rows["optimizer"][1]
    assert all(part in rows["step()"][1] for part in ("held gradients", "outputs kept whole", "parameter norms"))
    for (_, bare, traced, left), listed in rows.values():  # left = traced - bare hooks - the parts listed
        parts = sum(float(item.rsplit(None, 1)[1]) for item in listed.split(", "))
        assert left == pytest.approx(traced - bare - parts, abs=3.0)  # each figure rounded to 1 µs
    assert "target 1.50 leaves" in out and "PyTorch's hooks" in out
    parts = {line.split(" µs:")[0].rsplit(None, 1)[0].strip(): line for line in lines if " µs: " in line}
    assert "index_select" in parts["forward hooks"]  # the copy of each output's sample
    assert "_foreach_norm" in parts["parameter norms"]
    assert {"outputs kept whole", "held gradients", "weights' snapshot"} <= set(parts)
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bounds.py"), "--models", "mlp", "--device", "meta"],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode != 0 and "--device cpu" in done.stderr and "Traceback" not in done.stderr


def test_bounds_gives_each_part_the_operators_it_calls_itself() -> None:
    """An operator counts in the part whose scope called it, with its children's time;
    operators outside any part, and those another operator calls, are not counted."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bounds import SCOPE, operators
    finally:
        sys.path.remove(str(BENCHMARKS))
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(1000)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(SCOPE + "norms"):
            torch.linalg.vector_norm(a), torch.linalg.vector_norm(a)
        with record_function(SCOPE + "copy"):
            a.clone()
        a.mul(2.0)  # outside the parts
    totals, ops = operators(prof.events())
    assert set(totals) == set(ops) == {"norms", "copy"}
    assert ops["norms"]["aten::linalg_vector_norm"][0] == 2 and set(ops["norms"]) == {"aten::linalg_vector_norm"}
    assert set(ops["copy"]) == {"aten::clone"}  # not its children (empty_like, copy_)
    clone = next(e for e in prof.events() if e.name == "aten::clone")
    assert ops["copy"]["aten::clone"] == (1, pytest.approx(clone.cpu_time_total))
    assert all(totals[p] >= sum(m for _, m in ops[p].values()) for p in totals)
