"""Running a sweep's jobs as Ray tasks: ``covshift sweep ... --backend ray``.

Each task trains one job into a trace shard of its own, a file in a temporary folder on
the node that runs it, and returns the shard's bytes through Ray's object store. The
driver and the workers need not share a disk: on a cluster they run on other machines,
where one SQLite file cannot be shared. The driver merges each shard into the sweep's
trace as its task finishes (:func:`covshift.store.merge.copy_runs`).

The tasks get this covshift package (Ray's ``py_modules``) and the model file's source,
so a node needs only Python, torch and ray. A node where the model file exists with the
same content loads it in place, so that files next to it (data, modules it imports) are
found; elsewhere it loads a copy. Ray is imported here only, when the backend is chosen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .modelfile import split_spec
from .sweep import Job, Terminated, run_job, sigterm_raises

if TYPE_CHECKING:
    from .runner import Outcome

#: Seconds to wait for a TCP connection to the cluster before calling it unreachable
#: (``ray.init`` itself retries for minutes, printing warnings).
CONNECT_TIMEOUT_S = 5.0
#: Seconds between the driver's checks for finished tasks (Ctrl-C is handled between them).
WAIT_S = 0.5


class RayError(Exception):
    """Ray is not installed, or the cluster cannot be reached."""


def run_sweep_ray(todo: list[Job], workers: int, address: str | None,
                  on_done: Callable[[Job, Outcome], None] | None = None) -> list[Outcome]:
    """Run ``todo`` as Ray tasks and merge each finished run into the trace; return the
    outcomes in finishing order. Connects to ``address`` (else ``RAY_ADDRESS``), or starts
    a local Ray with ``workers`` CPUs; a process already connected to Ray keeps its
    connection, which stays open. Ctrl-C or SIGTERM cancels the outstanding tasks."""
    if not todo:
        return []
    with session(address, workers):
        return _run(import_ray(), todo, on_done)


def import_ray() -> Any:
    """The ``ray`` module; :class:`RayError` when it is not installed."""
    try:
        import ray
    except ImportError:
        raise RayError("--backend ray needs Ray: pip install covshift[ray]") from None
    return ray


@contextlib.contextmanager
def session(address: str | None, workers: int) -> Iterator[None]:
    """Connected to Ray within the block (see :func:`start`); a connection made here is
    closed after it, which stops a local Ray started for it."""
    started = start(address, workers)
    try:
        yield
    finally:
        if started:
            import_ray().shutdown()


def start(address: str | None, workers: int) -> bool:
    """Connect this process to the Ray cluster at ``address`` (else ``RAY_ADDRESS``), or
    start a local Ray of ``workers`` CPUs, with this covshift package for its tasks; return
    False, doing nothing, when the process is already connected to Ray."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    package = {"py_modules": [str(Path(__file__).parent)], "excludes": ["__pycache__"]}
    common = {"runtime_env": package, "logging_level": logging.ERROR}
    if not address:
        ray.init(address="local", num_cpus=workers, include_dashboard=False, **common)
        return True
    _check_reachable(address)
    try:
        ray.init(address=address, **common)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayError(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    return True


def _check_reachable(address: str) -> None:
    """Raise :class:`RayError` when nothing answers at ``host:port`` (``ray://host:port``)
    within :data:`CONNECT_TIMEOUT_S`; other forms (``auto``) are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else getattr(e, "strerror", None) or str(e)
        raise RayError(f"cannot reach the Ray cluster at {address} ({reason})") from None


def _run(ray: Any, todo: list[Job], on_done: Callable[[Job, Outcome], None] | None) -> list[Outcome]:
    from .store import TraceWriter
    from .store.merge import copy_runs

    options: dict[str, Any] = {"num_cpus": 1}
    if any(dict(job.overrides).get("device", "cpu").startswith("cuda") for job in todo):
        options["num_gpus"] = 1
    task = ray.remote(train_shard).options(**options)
    file, factory = split_spec(todo[0].spec)
    path = Path(file).expanduser().resolve()  # the same file wherever a task runs
    spec = _spec(path, factory)
    source = ray.put(path.read_bytes())
    pending = {task.remote(replace(job, spec=spec), source): job for job in todo}
    outcomes = []
    writer = TraceWriter(todo[0].path)
    terminated = threading.Event()
    try:
        with sigterm_raises(terminated), tempfile.TemporaryDirectory(prefix="covshift-shards-") as folder:
            shard = Path(folder) / "shard.covshift"
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_S)
                if terminated.is_set():
                    raise Terminated()
                for ref in ready:
                    job = pending.pop(ref)
                    outcome, data = _result(ray, ref)
                    shard.write_bytes(data)
                    copy_runs(shard, writer)
                    shard.unlink()
                    outcomes.append(outcome)
                    if on_done is not None:
                        on_done(job, outcome)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        writer.close()
    return outcomes


def _result(ray: Any, ref: Any) -> tuple[Outcome, bytes]:
    """A finished task's result; the exception it raised, as raised in the task."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Exception):
            raise e.cause from None
        raise


def train_shard(job: Job, source: bytes) -> tuple[Outcome, bytes]:
    """A Ray task: train ``job`` into a trace shard of its own, in a temporary folder, and
    return the outcome and the shard's bytes. ``source`` is the model file's content."""
    folder = Path(tempfile.mkdtemp(prefix="covshift-shard-"))
    try:
        file, factory = split_spec(job.spec)
        spec = job.spec
        if not (os.path.isfile(file) and Path(file).read_bytes() == source):
            copy = folder / Path(file).name
            copy.write_bytes(source)
            spec = _spec(copy, factory)
        shard = folder / "shard.covshift"
        _, outcome = run_job(replace(job, spec=spec, path=str(shard)), model_file=file)
        return outcome, shard.read_bytes()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _spec(path: Path, factory: str | None) -> str:
    """The model-file spec ``path[:factory]``."""
    return f"{path}:{factory}" if factory else str(path)
