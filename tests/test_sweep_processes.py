"""`covshift sweep` leaves no worker process behind when it is killed or terminated.

Each test runs a real sweep in a subprocess with two workers and runs far too long to
finish, waits until both workers train (they hold the trace file open), signals the
sweep's process, and checks that every process it started is gone within a few seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import covshift

MODEL = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

config = {"batch_size": 8}


def build_model():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g)
    return TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])
'''

#: The subprocess runs the covshift these tests import.
SOURCE = str(Path(covshift.__file__).parents[1])
STARTUP_SECONDS = 60  # an upper bound only: the test goes on as soon as both workers train
GONE_SECONDS = 5


def training_workers(sweep: psutil.Process, trace: Path) -> list[psutil.Process]:
    """The sweep's worker processes that have the trace file open."""
    found = []
    for child in sweep.children():
        try:
            if any(Path(f.path) == trace for f in child.open_files()):
                found.append(child)
        except psutil.Error:
            continue
    return found


@pytest.fixture
def sweep(tmp_path):
    """A running ``covshift sweep --jobs 2`` whose workers train; yields (its Popen, every
    process it started). Whatever is still alive at the end is killed, by pid."""
    model = tmp_path / "net.py"
    model.write_text(MODEL)
    trace = tmp_path / "out" / "trace.covshift"
    proc = subprocess.Popen([sys.executable, "-m", "covshift", "sweep", str(model), "--lr", "0.01,0.02,0.03",
                             "--steps", "10000000", "--jobs", "2", "--out", str(trace.parent)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": SOURCE})
    parent = psutil.Process(proc.pid)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while len(training_workers(parent, trace)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        started = parent.children(recursive=True)
        yield proc, started
    finally:
        leftovers = [*started, *(parent.children(recursive=True) if proc.poll() is None else []), parent]
        for process in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def assert_all_gone(processes: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(processes, timeout=GONE_SECONDS)
    assert alive == [], [p.cmdline() for p in alive]


def test_kill_9_of_the_sweep_ends_its_workers(sweep):
    proc, started = sweep
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert_all_gone(started)


def test_sigterm_stops_the_workers_and_exits_143(sweep):
    proc, started = sweep
    proc.terminate()
    _, err = proc.communicate(timeout=GONE_SECONDS)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM) after 0 of 6 runs" in err
    assert "Traceback" not in err
    assert_all_gone(started)
