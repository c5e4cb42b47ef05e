"""Running a sweep: the BN / no-BN pair at every learning rate, init scale and seed, in
parallel worker processes, all recorded into one trace.

Each job trains one variant at one setting exactly as ``covshift trace`` does (same
model-file contract, same pairing guarantees) and writes its own run, named like
``bn lr=0.03 init=1 seed=0``, into the shared trace file. SQLite serialises the writers;
every batch is one transaction, so rows are neither lost nor interleaved.

The workers end with the sweep: when its process dies, even by ``kill -9``, each worker is
killed too (Linux: the parent-death signal), or ends itself within half a second (it
watches its parent process); on SIGTERM the sweep stops its workers and raises
:class:`Terminated`.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .ranges import FINITE_POSITIVE, SEED, shown

if TYPE_CHECKING:
    from .runner import Outcome

#: Default ``detail_every`` of a sweep: per-unit statistics and histograms are rarely
#: needed per setting, so sweeps record them at step 0 and every 500 steps only.
SWEEP_DETAIL_EVERY = 500

#: Seconds between a worker's checks that the sweep's process is still its parent.
PARENT_POLL_SECONDS = 0.5
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class Terminated(BaseException):
    """SIGTERM reached the sweep: its workers are stopped. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` takes it for a failed run."""


@dataclass(frozen=True)
class Job:
    """One variant at one setting of the sweep."""

    spec: str  # the model file, as given on the command line
    variant: str
    lr: float
    init_scale: float
    seed: int
    overrides: tuple[tuple[str, Any], ...]  # the rest of the settings
    path: str
    threads: int

    @property
    def run(self) -> str:
        return f"{self.variant} lr={self.lr:g} init={self.init_scale:g} seed={self.seed}"

    def settings(self) -> dict[str, Any]:
        return {**dict(self.overrides), "lr": self.lr, "init_scale": self.init_scale, "seed": self.seed}


def jobs(spec: str, lrs: list[float], scales: list[float], seeds: list[int], overrides: dict[str, Any],
         path: Path, threads: int) -> list[Job]:
    """Every (setting, variant), in the order lr, init scale, seed, variant."""
    from .runner import VARIANTS

    frozen = tuple(sorted((k, v) for k, v in overrides.items() if k not in ("lr", "init_scale", "seed")))
    return [Job(spec, variant, lr, scale, seed, frozen, str(path), threads)
            for lr, scale, seed, variant in itertools.product(lrs, scales, seeds, VARIANTS)]


def run_job(job: Job, model_file: str | None = None) -> tuple[Job, Outcome]:
    """Train one job (in a worker process, or inline). ``model_file``: the path to record
    in the run's config when ``job.spec`` names a copy of the model file."""
    import torch  # here, not at the top: `covshift --help` does not import torch

    from .modelfile import load as load_model_file
    from .runner import prepare, train_run

    if job.threads:
        torch.set_num_threads(job.threads)
    mf = load_model_file(job.spec)
    s, train, val, variants = prepare(mf, job.settings())
    extra = {"sweep": True, **({"model_file": model_file} if model_file else {})}
    outcome = train_run(mf, variants[job.variant], job.run, train, val, s, Path(job.path), variant=job.variant,
                        extra=extra)
    return job, outcome


def run_sweep(todo: list[Job], workers: int, on_done: Callable[[Job, Outcome], None] | None = None) -> list[Outcome]:
    """Run ``todo`` in ``workers`` processes (inline when 1) and return the outcomes in
    finishing order. The trace file is created first, so workers never race to make it."""
    if not todo:
        return []
    from .store import TraceWriter

    TraceWriter(todo[0].path).close()
    outcomes = []
    # closing: an exception in on_done stops the workers before it leaves this function
    with sigterm_raises(), contextlib.closing(_results(todo, workers)) as results:
        for job, outcome in results:
            outcomes.append(outcome)
            if on_done is not None:
                on_done(job, outcome)
    return outcomes


@contextlib.contextmanager
def sigterm_raises(noted: threading.Event | None = None) -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (elsewhere
    Python cannot handle signals, and SIGTERM keeps its effect). Given ``noted``, it sets
    that event instead, for a caller that waits in C code where a handler's exception is
    lost (Ray's), and raises :class:`Terminated` itself when it sees the event."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: object) -> None:
        if noted is None:
            raise Terminated()
        noted.set()

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


def _results(todo: list[Job], workers: int) -> Iterator[tuple[Job, Outcome]]:
    """The finished jobs, from worker processes that end with this one: the pool is created
    by the calling thread, whose end the parent-death signal follows (see :func:`_end_with_parent`)."""
    if workers <= 1:
        yield from map(run_job, todo)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    pool = context.Pool(min(workers, len(todo)), initializer=_end_with_parent, initargs=(os.getpid(),))
    try:
        yield from pool.imap_unordered(run_job, todo)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _end_with_parent(parent: int) -> None:
    """Pool initializer: end this worker when ``parent`` (the sweep's process) dies. On Linux
    the kernel kills it (``prctl(PR_SET_PDEATHSIG, SIGKILL)``); everywhere, a daemon thread
    checks every :data:`PARENT_POLL_SECONDS` that ``parent`` is still its parent process."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # the watching thread still ends the worker
    threading.Thread(target=_watch_parent, args=(parent,), name="covshift-watch-parent", daemon=True).start()


def _watch_parent(parent: int) -> None:
    """Exit this process at once when its parent is no longer ``parent``, which is also the
    case when the parent died before the parent-death signal was set."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


def default_workers() -> int:
    """Worker processes by default: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_list(text: str, kind: type, option: str) -> list[Any]:
    """``"0.01,0.1"`` -> ``[0.01, 0.1]``, without repeats; a clear ValueError names the
    option otherwise. Floats (learning rates, init scales) must be finite and positive,
    integers (seeds) in the range torch accepts."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option} takes a comma-separated list of numbers, not {text!r}") from None
    if not values:
        raise ValueError(f"{option} needs at least one value")
    expected = FINITE_POSITIVE if kind is float else SEED
    for value in values:
        if not expected.accepts(value):
            raise ValueError(f"{option} {text}: each value must be {expected.description}, not {shown(value)}")
    return list(dict.fromkeys(values))
