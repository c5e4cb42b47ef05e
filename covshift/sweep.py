"""Running a sweep: the BN / no-BN pair at every learning rate, init scale and seed, in
parallel worker processes, all recorded into one trace.

Each job trains one variant at one setting exactly as ``covshift trace`` does (same
model-file contract, same pairing guarantees) and writes its own run, named like
``bn lr=0.03 init=1 seed=0``, into the shared trace file. SQLite serialises the writers;
every batch is one transaction, so rows are neither lost nor interleaved.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import Outcome

#: Default ``detail_every`` of a sweep: per-unit statistics and histograms are rarely
#: needed per setting, so sweeps record them at step 0 and every 500 steps only.
SWEEP_DETAIL_EVERY = 500


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


def run_job(job: Job) -> tuple[Job, Outcome]:
    """Train one job (in a worker process, or inline)."""
    import torch  # here, not at the top: `covshift --help` does not import torch

    from .modelfile import load as load_model_file
    from .runner import prepare, train_run

    if job.threads:
        torch.set_num_threads(job.threads)
    mf = load_model_file(job.spec)
    s, train, val, variants = prepare(mf, job.settings())
    outcome = train_run(mf, variants[job.variant], job.run, train, val, s, Path(job.path),
                        variant=job.variant, extra={"sweep": True})
    return job, outcome


def run_sweep(todo: list[Job], workers: int, on_done: Callable[[Job, Outcome], None] | None = None) -> list[Outcome]:
    """Run ``todo`` in ``workers`` processes (inline when 1) and return the outcomes in
    finishing order. The trace file is created first, so workers never race to make it."""
    if not todo:
        return []
    from .store import TraceWriter

    TraceWriter(todo[0].path).close()
    outcomes = []
    for job, outcome in _results(todo, workers):
        outcomes.append(outcome)
        if on_done is not None:
            on_done(job, outcome)
    return outcomes


def _results(todo: list[Job], workers: int) -> Iterator[tuple[Job, Outcome]]:
    if workers <= 1:
        yield from map(run_job, todo)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    pool = context.Pool(min(workers, len(todo)))
    try:
        yield from pool.imap_unordered(run_job, todo)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def default_workers() -> int:
    """Worker processes by default: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_list(text: str, kind: type, option: str) -> list[Any]:
    """``"0.01,0.1"`` -> ``[0.01, 0.1]``; a clear ValueError names the option otherwise."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option} takes a comma-separated list of numbers, not {text!r}") from None
    if not values:
        raise ValueError(f"{option} needs at least one value")
    if kind is float and any(v <= 0 for v in values):
        raise ValueError(f"{option} values must be positive, got {text!r}")
    return list(dict.fromkeys(values))
