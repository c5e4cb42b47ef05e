"""The trace file under hostile conditions: live readers, a full disk, kill -9, concurrent
writers, truncated and empty files, bad paths. Nothing recorded is lost or mixed, and
training never stops because of covshift's storage.

Each case failed with the schema-1 store (rollback journal, reused run ids, errors raised
from ``tracer.step()``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import covshift
from covshift.store import TraceError, TraceWriter

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

# a child process: train a tiny MLP with a Tracer for STEPS steps, flushing every FLUSH
# recorded steps, optionally under a file-size limit (a full disk) lifted at step LIFT
CHILD = textwrap.dedent('''
    import json, resource, signal, sys, warnings
    import torch
    from torch import nn
    import covshift

    path, steps, flush, limit, lift, max_unsaved = sys.argv[1], *map(int, sys.argv[2:7])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with covshift.Tracer(model, path, optimizer=opt, flush_every=flush, detail_every=10,
                             max_unsaved=max_unsaved, write_every=0) as tracer:
            if limit:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
            for step in range(steps):
                if step == lift:
                    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                tracer.step(loss)
                losses.append(loss.item())
                print(step, flush=True)
    print(json.dumps({"error": tracer.storage_error, "unsaved": tracer.unsaved_steps, "losses": losses,
                      "warnings": [str(w.message) for w in caught if "covshift" in str(w.message)]}))
''')


def child(path: Path, steps: int, flush: int = 5, limit: int = 0, lift: int = -1, max_unsaved: int = 10_000,
          **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(steps), str(flush), str(limit), str(lift),
                             str(max_unsaved)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            **kwargs)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def saved(path: Path, run: str = "run") -> tuple[list[list[int]], np.ndarray]:
    """The run's ``saved_steps`` and the steps that have a loss in the file."""
    with covshift.load(path) as trace:
        steps, _ = trace.series(run, "", "loss")
        return trace.config(run).get("saved_steps", []), steps


def covered(ranges: list[list[int]]) -> set[int]:
    return {s for a, b in ranges for s in range(a, b + 1)}


def tiny_tracer(path: Path, run: str = "run", **kwargs) -> tuple[covshift.Tracer, callable]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))

    def step(tracer: covshift.Tracer) -> None:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        tracer.step(loss)

    kwargs.setdefault("write_every", 0)  # write at every flush
    return covshift.Tracer(model, path, run=run, optimizer=opt, **kwargs), step


# ----------------------------------------------------------------------------- readers

def test_a_reader_holding_a_transaction_never_blocks_training(tmp_path):
    """A reader in the middle of a long SELECT (a full read of a live trace) used to make
    tracer.step() raise "database is locked" after the busy timeout, losing the batch."""
    path = tmp_path / "t.covshift"
    tracer, step = tiny_tracer(path, flush_every=2)
    with tracer:
        for _ in range(4):
            step(tracer)
        reader = sqlite3.connect(covshift.store.schema.read_uri(str(path), "ro"), uri=True)
        reader.execute("BEGIN")
        cursor = reader.execute("SELECT * FROM series")
        cursor.fetchone()  # the read transaction stays open
        start = time.monotonic()
        for _ in range(20):
            step(tracer)
        assert time.monotonic() - start < 20  # nobody waited for the busy timeout
        assert tracer.storage_error is None
        reader.close()
    ranges, steps = saved(path)
    assert ranges == [[0, 23]] and steps.tolist() == list(range(24))


def test_a_reader_leaves_no_side_files_and_cannot_write(tmp_path):
    path = tmp_path / "t.covshift"
    tracer, step = tiny_tracer(path)
    with tracer:
        step(tracer)
    with covshift.load(path) as trace:
        assert len(trace.series("run", "", "loss")[0]) == 1
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            trace._conn.execute("DELETE FROM runs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.covshift"]


def test_a_live_trace_reads_while_it_is_written(tmp_path):
    path = tmp_path / "t.covshift"
    tracer, step = tiny_tracer(path, flush_every=3)
    with tracer:
        for k in range(1, 4):
            for _ in range(3):
                step(tracer)
            with covshift.load(path) as live:
                assert live.series("run", "", "loss")[0].tolist() == list(range(3 * k))


# ----------------------------------------------------------------------------- a full disk

def test_a_full_disk_never_stops_training_and_the_config_says_what_was_saved(tmp_path):
    """Past the file-size limit every flush fails: training goes on, one warning, and
    saved_steps / unsaved_steps partition the recorded steps exactly."""
    path = tmp_path / "t.covshift"
    result = finish(child(path, steps=60, flush=5, limit=300_000, max_unsaved=20))
    assert len(result["losses"]) == 60
    assert result["error"] and len(result["warnings"]) == 1
    ranges, steps = saved(path)
    lost = covered(result["unsaved"])
    assert lost and covered(ranges) | lost == set(range(60)) and not covered(ranges) & lost
    assert set(steps.tolist()) == covered(ranges)  # the file holds exactly the steps it says
    with covshift.load(path) as trace:
        assert trace.scalars(metric="mean")["step"].isin(list(covered(ranges))).all()


def test_unsaved_steps_are_written_when_the_disk_has_room_again(tmp_path):
    path = tmp_path / "t.covshift"
    result = finish(child(path, steps=40, flush=5, limit=300_000, lift=30))
    assert result["error"] and result["unsaved"] == []
    ranges, steps = saved(path)
    assert ranges == [[0, 39]] and steps.tolist() == list(range(40))
    with covshift.load(path) as trace:
        assert trace.config("run")["steps"] == 40
        np.testing.assert_allclose(trace.series("run", "", "loss")[1], result["losses"], rtol=1e-6)


def test_covshift_trace_reports_a_full_disk_as_a_storage_failure(tmp_path):
    model = tmp_path / "net.py"
    model.write_text(textwrap.dedent('''
        import torch
        from torch import nn
        from torch.utils.data import TensorDataset
        config = {"steps": 300, "batch_size": 16}
        def build_model():
            return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 3))
        def data():
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
            return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])
    '''))
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY)); "
              "from covshift.cli import app; sys.argv = ['covshift'] + sys.argv[1:]; app()")
    done = subprocess.run([sys.executable, "-c", script, "trace", str(model), "--only", "nobn", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "could not be fully written" in done.stderr and "failed at step" not in done.stderr
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- kill -9

def test_kill_9_mid_write_leaves_a_readable_trace_of_whole_batches(tmp_path):
    path = tmp_path / "t.covshift"
    proc = child(path, steps=100_000, flush=1)
    for line in proc.stdout:  # wait until a few batches are in the file
        if int(line) >= 30:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert Path(str(path) + "-wal").exists()  # the writer had no chance to checkpoint
    ranges, steps = saved(path)
    assert ranges and set(steps.tolist()) == covered(ranges)
    with covshift.load(path) as trace:
        frame = trace.scalars(metric="mean")
        per_step = frame.groupby("step", observed=True).size()
        assert (per_step == per_step.iloc[0]).all()  # every saved step has all its layers
    info = subprocess.run([sys.executable, "-m", "covshift", "info", str(path)], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert info.returncode == 0, info.stderr


# ----------------------------------------------------------------------------- two writers

def test_a_second_writer_of_a_live_run_name_is_refused(tmp_path):
    path = tmp_path / "t.covshift"
    first, step = tiny_tracer(path)
    with first:
        step(first)
        second, _ = tiny_tracer(path)
        with pytest.raises(ValueError, match="already exists"):
            second.start()


def test_overwriting_a_live_run_never_mixes_the_two_writers(tmp_path):
    """The old store reused the deleted run's id: the first writer's later batches landed
    in the replacing run."""
    path = tmp_path / "t.covshift"
    first, step1 = tiny_tracer(path, flush_every=2)
    second, step2 = tiny_tracer(path, flush_every=2, overwrite=True)
    with first:
        for _ in range(4):
            step1(first)
        with pytest.warns(RuntimeWarning, match="stopped recording"):
            with second:
                for _ in range(3):
                    step2(second)
                for _ in range(6):
                    step1(first)  # its run is gone: it must not write into the new one
    assert first.storage_error is not None and second.storage_error is None
    ranges, steps = saved(path)
    assert ranges == [[0, 2]] and steps.tolist() == [0, 1, 2]
    with covshift.load(path) as trace:
        assert trace.runs == ["run"] and trace.config("run")["steps"] == 3
        assert trace.scalars()["step"].max() == 2


def _create(path: str, run: str, barrier) -> None:
    barrier.wait()
    writer = TraceWriter(path)
    try:
        writer.add_run(run, {})
    finally:
        writer.close()


def test_processes_creating_one_new_file_at_once_all_succeed(tmp_path):
    """Creating the schema raced: one process died with "table meta already exists"."""
    path = str(tmp_path / "t.covshift")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_create, args=(path, f"r{k}", barrier)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with covshift.load(path) as trace:
        assert sorted(trace.runs) == ["r0", "r1", "r2", "r3"]


def _write_and_read(path: str, k: int) -> None:
    for i in range(20):
        writer = TraceWriter(path)
        run = writer.add_run(f"r{k}-{i}", {})
        writer.write(run, [(s, "", "loss", 1.0) for s in range(5)], [], [], saved=(0, 4))
        with covshift.load(path) as trace:  # a reader in the writer's process, as covshift trace has
            trace.series(f"r{k}-{i}", "", "loss")
        writer.update_config(run, steps=5)
        writer.close()


def test_a_reader_in_a_writers_process_loses_no_commit_of_other_writers(tmp_path):
    """Opening and closing the trace file outside SQLite (to read its header) released this
    process's POSIX locks, SQLite's included: with three writers, some commits were lost."""
    path = str(tmp_path / "t.covshift")
    TraceWriter(path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_and_read, args=(path, k)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    with covshift.load(path) as trace:
        assert len(trace.runs) == 60 and all(trace.config(run).get("steps") == 5 for run in trace.runs)


def test_run_ids_are_never_reused(tmp_path):
    path = tmp_path / "t.covshift"
    writer = TraceWriter(path)
    first = writer.add_run("a", {})
    writer.remove_runs(["a"])
    assert writer.add_run("a", {}) > first
    writer.close()


def test_overwrite_reclaims_the_space_of_the_replaced_run(tmp_path):
    path = tmp_path / "t.covshift"
    tracer, step = tiny_tracer(path, detail_every=1)
    with tracer:
        for _ in range(300):
            step(tracer)
    big = path.stat().st_size
    tracer, step = tiny_tracer(path, overwrite=True)
    with tracer:
        step(tracer)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    fresh = tmp_path / "fresh.covshift"  # a new file holding what the overwritten one now holds
    tracer, step = tiny_tracer(fresh)
    with tracer:
        step(tracer)
    page = covshift.store.schema.PAGE_SIZE
    assert path.stat().st_size <= fresh.stat().st_size + 2 * page < big / 2


# ----------------------------------------------------------------------------- bad files

@pytest.fixture
def recorded(tmp_path) -> Path:
    path = tmp_path / "t.covshift"
    tracer, step = tiny_tracer(path, detail_every=2)
    with tracer:
        for _ in range(30):
            step(tracer)
    return path


@pytest.mark.parametrize("cut", [1, 4096])
def test_a_truncated_trace_is_called_corrupt(recorded, cut):
    """Cut by one byte, the old store loaded it and silently changed a histogram row."""
    data = recorded.read_bytes()
    recorded.write_bytes(data[:-cut])
    with pytest.raises(TraceError, match="corrupt"):
        covshift.load(recorded)
    with pytest.raises(TraceError, match="corrupt"):
        TraceWriter(recorded)


def test_an_empty_file_is_called_empty(tmp_path):
    path = tmp_path / "t.covshift"
    path.write_bytes(b"")
    with pytest.raises(TraceError, match="empty"):
        covshift.load(path)


def test_a_schema_1_trace_gets_a_clear_message(tmp_path):
    path = tmp_path / "old.covshift"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute(f"PRAGMA application_id = {covshift.store.APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 1")
    with pytest.raises(TraceError, match="schema 1.*record it again"):
        covshift.load(path)
    with pytest.raises(TraceError, match="schema 1"):
        TraceWriter(path)


def test_a_directory_at_the_trace_path_is_named(tmp_path):
    path = tmp_path / "t.covshift"
    path.mkdir()
    tracer, _ = tiny_tracer(path)
    with pytest.raises(TraceError, match=f"{path}.*directory"):
        tracer.start()


def test_a_folder_that_cannot_be_created_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TraceError, match="cannot create the folder"):
        TraceWriter(tmp_path / "file" / "t.covshift")


def test_log_after_close_raises_and_flush_after_close_does_nothing(tmp_path):
    tracer, step = tiny_tracer(tmp_path / "t.covshift")
    with tracer:
        step(tracer)
    with pytest.raises(RuntimeError, match="after close"):
        tracer.log(val_loss=1.0)
    tracer.flush()


def test_opening_retries_while_sqlite_reports_the_file_locked_without_waiting():
    """Under load, one of four processes creating a file at once got "database is locked"
    straight away (some WAL transitions skip SQLite's busy handler): opening retries."""
    from covshift.store.schema import retry_locked

    attempts = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "open"

    assert retry_locked(flaky, timeout=5) == "open" and len(attempts) == 3
    with pytest.raises(sqlite3.OperationalError, match="no such table"):  # other errors: at once
        retry_locked(lambda: (_ for _ in ()).throw(sqlite3.OperationalError("no such table: x")), timeout=5)
    start = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):  # and not forever
        retry_locked(lambda: (_ for _ in ()).throw(sqlite3.OperationalError("database is locked")), timeout=0.2)
    assert time.monotonic() - start < 2


def test_a_failed_write_forgets_the_ids_it_created(tmp_path, monkeypatch):
    """A write that fails after registering a new metric and layer rolls them back; the
    writer's id caches must roll back too, or the next write stores chunks under ids
    that no longer exist (on a full disk the config said steps 0-9 were saved, yet the
    file had no loss)."""
    path = tmp_path / "t.covshift"
    writer = TraceWriter(path)
    run = writer.add_run("r", {})
    real_encode = covshift.store.chunks.encode

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(covshift.store.chunks, "encode", fail)
    with pytest.raises(OSError, match="simulated"):
        writer.write(run, [(0, "fc", "mean", 1.0), (0, "", "loss", 2.0)], [], [], saved=(0, 0),
                     layers=[("fc", "Linear", None, 0, None)])
    monkeypatch.setattr(covshift.store.chunks, "encode", real_encode)
    writer.write(run, [(1, "fc", "mean", 3.0), (1, "", "loss", 4.0)], [], [], saved=(1, 1),
                 layers=[("fc", "Linear", None, 0, None)])
    writer.close()
    with covshift.load(path) as trace:
        assert trace.series("r", "", "loss")[1].tolist() == [4.0]
        assert trace.series("r", "fc", "mean")[1].tolist() == [3.0]
        assert trace.config("r")["saved_steps"] == [[1, 1]]
