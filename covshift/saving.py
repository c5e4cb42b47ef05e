"""Saving a Tracer's batches to its run, without ever stopping the user's training.

Batches handed over less than ``interval`` seconds after the last write wait in memory
and go into the next write together, so a fast training loop writes fewer, larger chunks.
A batch that cannot be written (a full disk, a file locked for longer than the busy
timeout, an I/O error) stays in memory and is written with the next batch; the first such
error is reported once as a warning, and training goes on. Beyond ``max_unsaved`` steps the
oldest batches are dropped, and their step ranges are stated in the run's config as
``unsaved_steps``. Each batch written adds its steps to the config's ``saved_steps`` in the
same transaction, so the file always says exactly which steps it holds.
"""

from __future__ import annotations

import os
import sqlite3
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .store import RunReplaced, TraceError, TraceWriter

#: What a failed write can raise: SQLite's errors, the OS's, and the store's own.
STORAGE_ERRORS = (sqlite3.Error, OSError, TraceError)
#: Most steps written in one transaction (one chunk per series): a layer metric's chunk
#: (float32, compressed) then fits in one page of the file (store.schema.PAGE_SIZE).
MERGED_STEPS = 1000


@dataclass
class Batch:
    """The rows of consecutive recorded steps ``first`` … ``last``, ready for the writer."""

    first: int
    last: int
    layers: list[tuple[str, str, str | None, int, list[float] | None]] = field(default_factory=list)
    scalars: list[tuple[int, str, str, float]] = field(default_factory=list)
    units: list[tuple[int, str, np.ndarray, np.ndarray]] = field(default_factory=list)  # (step, layer, means, vars)
    hists: list[tuple[int, str, np.ndarray]] = field(default_factory=list)
    columns: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.last - self.first + 1


def merge_batches(batches: list[Batch]) -> Batch:
    """Consecutive batches as one: their rows concatenated, each column's arrays joined,
    each layer registered once with its last registration (edges are fixed late)."""
    if len(batches) == 1:
        return batches[0]
    out = Batch(batches[0].first, batches[-1].last)
    layers: dict[str, tuple[str, str, str | None, int, list[float] | None]] = {}
    parts: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    for batch in batches:
        layers.update((row[0], row) for row in batch.layers)
        out.scalars += batch.scalars
        out.units += batch.units
        out.hists += batch.hists
        for key, column in batch.columns.items():
            parts.setdefault(key, []).append(column)
    out.layers = list(layers.values())
    out.columns = {key: (np.concatenate([s for s, _ in cols]), np.concatenate([v for _, v in cols]))
                   for key, cols in parts.items()}
    return out


def merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    """Sorted ``[first, last]`` ranges with touching and overlapping ones merged."""
    merged: list[list[int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return merged


class Saver:
    """A run in a trace file: created on construction (errors raise: nothing has trained
    yet), then written batch by batch (errors are kept, never raised)."""

    def __init__(self, path: str | os.PathLike[str], run: str, config: dict[str, Any], overwrite: bool,
                 max_unsaved: int, interval: float = 0.0) -> None:
        self.path, self.run, self.max_unsaved, self.interval = os.fspath(path), run, max_unsaved, interval
        self.written_at = time.monotonic()  # of the last write, or of the run's creation
        self.writer = TraceWriter(path)
        try:
            self.run_id = self.writer.add_run(run, config, overwrite)
        except BaseException:
            self.writer.close()
            raise
        self.unsaved: deque[Batch] = deque()
        self.lost: list[list[int]] = []
        self.error: str | None = None  # the first storage error, as a sentence
        self.stopped = False  # the run was replaced by another writer: nothing more is written

    def save(self, batch: Batch | None = None, now: bool = True) -> None:
        """Write ``batch`` after every batch still unsaved, oldest first, consecutive batches
        of up to :data:`MERGED_STEPS` steps in one transaction; unless ``now``, only when
        ``interval`` seconds have passed since the last write (or the run's creation). Stop
        at the first failure and keep the rest."""
        if batch is not None and not self.stopped:
            self.unsaved.append(batch)
        if not now and time.monotonic() - self.written_at < self.interval:
            return
        while self.unsaved and not self.stopped:
            count, steps = 0, 0
            while count < len(self.unsaved) and (count == 0 or steps + self.unsaved[count].steps <= MERGED_STEPS):
                steps += self.unsaved[count].steps
                count += 1
            pending = merge_batches([self.unsaved[i] for i in range(count)])
            try:
                self.writer.write(self.run_id, pending.scalars, [], pending.hists,
                                  saved=(pending.first, pending.last), layers=pending.layers,
                                  columns=pending.columns, unit_arrays=pending.units)
            except RunReplaced as e:
                self._fail(e, f"covshift stopped recording run {self.run!r}: {e}")
                self.stopped = True
                self.lost += [[b.first, b.last] for b in self.unsaved]
                self.unsaved.clear()
                return
            except STORAGE_ERRORS as e:
                self._fail(e, f"covshift cannot write the trace {self.path} ({e}); training goes on, and the "
                              f"unsaved steps are kept in memory (at most {self.max_unsaved}) and written when "
                              "the file can be written again")
                self._bound()
                return
            for _ in range(count):
                self.unsaved.popleft()
            self.written_at = time.monotonic()

    def _fail(self, error: BaseException, message: str) -> None:
        if self.error is None:
            self.error = str(error) or type(error).__name__
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _bound(self) -> None:
        """Drop the oldest unsaved batches beyond ``max_unsaved`` steps."""
        while len(self.unsaved) > 1 and sum(b.steps for b in self.unsaved) > self.max_unsaved:
            dropped = self.unsaved.popleft()
            self.lost.append([dropped.first, dropped.last])

    @property
    def unsaved_steps(self) -> list[list[int]]:
        """The ranges of recorded steps that are not in the file (dropped, or still unsaved)."""
        return merge_ranges(self.lost + [[b.first, b.last] for b in self.unsaved])

    def close(self, config: dict[str, Any]) -> None:
        """Write what is left, then merge ``config`` (and ``unsaved_steps`` when some steps
        could not be written) into the run's config, and close the file."""
        try:
            self.save()
            if not self.stopped:
                extra = {"unsaved_steps": self.unsaved_steps} if self.unsaved_steps else {}
                self.writer.update_config(self.run_id, **config, **extra)
        except STORAGE_ERRORS as e:
            self._fail(e, f"covshift cannot write the trace {self.path} ({e})")
        finally:
            try:
                self.writer.close()
            except STORAGE_ERRORS:
                pass
