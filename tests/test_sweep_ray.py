"""`covshift sweep --backend ray`: Ray tasks, each training into a trace shard of its own,
merged by the driver into a trace equal, run for run, to the process backend's; cancelling
on Ctrl-C; one-line errors when Ray is missing or the cluster unreachable.

The tests share one local Ray of two CPUs (starting one takes seconds)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

import covshift
from covshift import sweep_ray
from covshift.cli import app
from covshift.sweep import Terminated, jobs, run_sweep
from covshift.sweep_ray import run_sweep_ray

from test_sweep import MODEL
from trace_compare import assert_same_data

GRID = ([0.05, 0.5], [1.0], [0])  # 2 learning rates x 1 init scale x 1 seed: 4 runs
SETTINGS = {"steps": 7, "detail_every": 3}
CANCELLED_SECONDS = 30  # an upper bound only: the test goes on as soon as the CPUs are free


@pytest.fixture(scope="module")
def ray():
    """A local Ray of two CPUs, started the way the sweep starts one, shut down after."""
    ray = pytest.importorskip("ray")
    assert sweep_ray.start(None, 2)
    yield ray
    ray.shutdown()


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(MODEL)
    return path


def test_ray_sweep_equals_the_process_sweep(ray, model_file, tmp_path):
    paths = {backend: tmp_path / backend / "trace.covshift" for backend in ("process", "ray")}
    done = []
    outcomes = run_sweep_ray(jobs(str(model_file), *GRID, SETTINGS, paths["ray"], 1), 2, None,
                             lambda job, outcome: done.append((job.run, covshift.load(paths["ray"]).runs)))
    run_sweep(jobs(str(model_file), *GRID, SETTINGS, paths["process"], 1), 1)
    assert len(outcomes) == 4
    # merged run by run, as each task finished
    assert [len(runs) for _, runs in done] == [1, 2, 3, 4] and all(run in runs for run, runs in done)
    with covshift.load(paths["process"]) as by_process, covshift.load(paths["ray"]) as by_ray:
        assert sorted(by_ray.runs) == sorted(by_process.runs) and len(by_ray.runs) == 4
        for run in by_process.runs:
            assert_same_data(by_process, by_ray, run)
            expected, got = by_process.config(run), by_ray.config(run)
            assert {**got, "wall_time": None} == {**expected, "wall_time": None}
            assert got["model_file"] == str(model_file)


def test_a_node_without_the_model_file_trains_a_copy(ray, model_file, tmp_path):
    """On a node where the model file does not exist, the task loads the source it was given,
    and records the driver's path."""
    todo = jobs(str(model_file), [0.05], [1.0], [0], SETTINGS, tmp_path / "unused.covshift", 1)
    moved = tmp_path / "elsewhere.py"
    outcome, shard = sweep_ray.train_shard(replace(todo[0], spec=str(moved)),
                                           model_file.read_bytes())
    assert outcome.steps == 7 and not moved.exists()
    copied = tmp_path / "shard.covshift"
    copied.write_bytes(shard)
    with covshift.load(copied) as trace:
        assert trace.runs == [todo[0].run] and trace.config(todo[0].run)["model_file"] == str(moved)


def test_the_sweep_command_with_backend_ray(ray, model_file, tmp_path):
    result = CliRunner().invoke(app, ["sweep", str(model_file), "--lr", "0.05,0.5", "--steps", "3",
                                      "--backend", "ray", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    with covshift.load(tmp_path / "o" / "trace.covshift") as trace:
        assert len(trace.runs) == 4
    assert "bn lr=0.5 init=1 seed=0: 3 steps" in result.output
    assert (tmp_path / "o" / "report.md").is_file()


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_an_interrupt_cancels_the_outstanding_tasks(ray, model_file, tmp_path, stop):
    """The first run to finish diverges at once; Ctrl-C (in the driver's code) or SIGTERM
    (while the driver waits for Ray) then comes, while the other three tasks would train for
    days: they are cancelled and the CPUs come back."""
    todo = jobs(f"{model_file}:build_relu", [1e6, 0.01], [4.0], [0], {"steps": 10_000_000}, tmp_path / "t.covshift", 1)

    def interrupt(job, outcome):
        if stop == "ctrl-c":
            raise KeyboardInterrupt
        # the sweep waits for tasks that never end: SIGTERM reaches it inside ray.wait
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()

    with pytest.raises(KeyboardInterrupt if stop == "ctrl-c" else Terminated):
        run_sweep_ray(todo, 2, None, interrupt)
    deadline = time.monotonic() + CANCELLED_SECONDS
    while ray.available_resources().get("CPU", 0) < 2:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.1)
    with covshift.load(tmp_path / "t.covshift") as trace:
        assert len(trace.runs) == 1


def test_ray_not_installed_is_one_line(model_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = CliRunner().invoke(app, ["sweep", str(model_file), "--steps", "1", "--backend", "ray",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: --backend ray needs Ray: pip install covshift[ray]"


def test_usage_errors_of_the_backend_options(model_file):
    runner = CliRunner()
    wrong = runner.invoke(app, ["sweep", str(model_file), "--backend", "dask"])
    assert wrong.exit_code == 2 and "--backend takes process or ray" in wrong.output
    stray = runner.invoke(app, ["sweep", str(model_file), "--address", "10.0.0.1:6379"])
    assert stray.exit_code == 2 and "--backend ray" in stray.output


def test_an_unreachable_address_is_one_line(model_file, tmp_path):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = str(Path(covshift.__file__).parents[1])
    done = subprocess.run([sys.executable, "-m", "covshift", "sweep", str(model_file), "--steps", "1",
                           "--backend", "ray", "--address", f"127.0.0.1:{port}", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": source})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"error: cannot reach the Ray cluster at 127.0.0.1:{port} (Connection refused)"
