"""Appending to a trace file: runs, layers, and batches of step data as column chunks.

Each :meth:`TraceWriter.write` is one transaction, so an interrupted or killed writer
leaves every earlier batch whole and none of the batch it was writing. Run and layer ids
are never reused, and a writer whose run was removed or replaced by another process gets
:class:`RunReplaced` instead of writing into someone else's run.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from . import chunks
from .schema import DATA_TABLES, RUN_LAYER, TraceError, check_size, create_or_check, retry_locked

#: How long a writer waits for another writer's transaction (a sweep's workers share a file).
BUSY_TIMEOUT_S = 60


class RunReplaced(TraceError):
    """The writer's run is gone: removed, or replaced by another writer of that name."""


def describe(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e)


class TraceWriter:
    """Appends to a trace file, creating it (and its folder) when missing."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        target = Path(self.path)
        if target.is_dir():
            raise TraceError(f"cannot write the trace {self.path}: it is a directory")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TraceError(f"cannot create the folder of the trace {self.path} ({describe(e)})") from None
        try:
            self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as e:
            raise TraceError(f"cannot write the trace {self.path} ({e})") from None
        try:
            self._metrics = retry_locked(self._open, BUSY_TIMEOUT_S)
        except sqlite3.Error as e:
            self.conn.close()
            if "malformed" in str(e):
                raise TraceError(f"{self.path} is corrupt ({e})") from None
            raise TraceError(f"cannot write the trace {self.path} ({e})") from None
        except BaseException:
            self.conn.close()
            raise
        self._layers: dict[tuple[int, str], int] = {}
        self._parts: dict[int, int] = {}  # run id -> the last part written

    def _open(self) -> dict[str, int]:
        """Set up the connection, create or check the schema; the metric ids."""
        self.conn.execute("PRAGMA synchronous = NORMAL")  # WAL: a crash of the program loses nothing committed
        create_or_check(self.conn, self.path, __version__)
        check_size(self.path, self.conn)  # an existing trace is not truncated
        return dict((name, i) for i, name in self.conn.execute("SELECT id, name FROM metrics"))

    def transaction(self) -> _Transaction:
        """``with writer.transaction():`` the statements of the block on :attr:`conn`,
        committed together, or rolled back on any exception."""
        return _Transaction(self)

    def add_run(self, name: str, config: dict[str, Any], overwrite: bool = False) -> int:
        """Add a run and return its id. An existing run of that name is an error, or is
        replaced in the same transaction when ``overwrite``."""
        if not isinstance(name, str) or not name:
            raise ValueError("a run needs a non-empty name")
        with self.transaction():
            if not overwrite and self.conn.execute("SELECT 1 FROM runs WHERE name = ?", (name,)).fetchone():
                raise ValueError(
                    f"run {name!r} already exists in {self.path}: choose another run name, "
                    "or pass overwrite=True to replace it")
            replaced = self._delete_run(name)
            created = datetime.now(timezone.utc).isoformat(timespec="seconds")
            cur = self.conn.execute("INSERT INTO runs (name, config, created) VALUES (?, ?, ?)",
                                    (name, json.dumps(config, default=str), created))
        if replaced:
            self._reclaim()
        return int(cur.lastrowid)

    def remove_runs(self, names: Iterable[str]) -> list[str]:
        """Delete the named runs with all their data, in one transaction (all or none);
        returns the names that were in the file. The space is reclaimed."""
        with self.transaction():
            removed = [name for name in names if self._delete_run(name)]
        if removed:
            self._reclaim()
        return removed

    def _delete_run(self, name: str) -> bool:
        row = self.conn.execute("SELECT id FROM runs WHERE name = ?", (name,)).fetchone()
        if row is None:
            return False
        for table in DATA_TABLES:
            self.conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (row[0],))
        self.conn.execute("DELETE FROM runs WHERE id = ?", (row[0],))
        self._layers = {key: i for key, i in self._layers.items() if key[0] != row[0]}
        return True

    def _reclaim(self) -> None:
        """Return the pages of deleted data to the file system (auto_vacuum is incremental)."""
        self.conn.executescript("PRAGMA incremental_vacuum;")  # executescript steps it to the end

    def _config(self, run_id: int) -> dict[str, Any]:
        row = self.conn.execute("SELECT config FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise RunReplaced(f"run {run_id} of {self.path} was removed or replaced by another writer")
        return json.loads(row[0])

    def update_config(self, run_id: int, **values: Any) -> None:
        """Merge ``values`` into a run's config."""
        with self.transaction():
            self._set_config(run_id, {**self._config(run_id), **values})

    def _set_config(self, run_id: int, config: dict[str, Any]) -> None:
        self.conn.execute("UPDATE runs SET config = ? WHERE id = ?", (json.dumps(config, default=str), run_id))

    def add_layer(self, run_id: int, name: str, type_name: str, nonlinearity: str | None,
                  position: int, edges: Sequence[float] | None) -> None:
        """Register a layer once; later calls only fill in its histogram edges."""
        with self.transaction():
            self._config(run_id)
            self._register(run_id, name, type_name, nonlinearity, position, edges)

    def _register(self, run_id: int, name: str, type_name: str, nonlinearity: str | None, position: int,
                  edges: Sequence[float] | None) -> None:
        """:meth:`add_layer` inside the caller's transaction."""
        key = (run_id, name)
        if key not in self._layers:
            found = self.conn.execute("SELECT id FROM layers WHERE run_id = ? AND name = ?", key).fetchone()
            if found is None:
                found = (self.conn.execute(
                    "INSERT INTO layers (run_id, name, type, nonlinearity, position) VALUES (?, ?, ?, ?, ?)",
                    (run_id, name, type_name, nonlinearity, position)).lastrowid,)
            self._layers[key] = int(found[0])
        if edges is not None:
            self.conn.execute("UPDATE layers SET edges = ? WHERE id = ?",
                              (chunks.pack(np.asarray(edges, dtype=float), "<f8"), self._layers[key]))

    def _metric_id(self, name: str) -> int:
        if name not in self._metrics:
            self.conn.execute("INSERT OR IGNORE INTO metrics (name) VALUES (?)", (name,))
            (self._metrics[name],) = self.conn.execute("SELECT id FROM metrics WHERE name = ?", (name,)).fetchone()
        return self._metrics[name]

    def write(self, run_id: int, scalars: Iterable[tuple[int, str, str, float]],
              units: Iterable[tuple[int, str, int, float, float]],
              hists: Iterable[tuple[int, str, np.ndarray]], saved: tuple[int, int] | None = None,
              layers: Iterable[tuple[str, str, str | None, int, Sequence[float] | None]] = (),
              columns: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] | None = None,
              unit_arrays: Iterable[tuple[int, str, np.ndarray, np.ndarray]] = ()) -> None:
        """Append one batch of step data in a single transaction: ``(step, layer, metric,
        value)`` rows (the empty layer name is the run itself), ``(step, layer, unit, mean,
        var)`` rows and ``(step, layer, counts)``. Layers must have been added with
        :meth:`add_layer`, or be given in ``layers`` (its arguments, registered in the same
        transaction). ``saved``, the batch's first and last step, is added to the run's
        config ``saved_steps`` in the same transaction. ``columns`` gives more values as
        ``{(layer, metric): (steps, values)}`` arrays, and ``unit_arrays`` more per-unit
        rows as ``(step, layer, means, variances)`` with arrays indexed by unit."""
        series: dict[tuple[str, str], tuple[list[Any], list[Any]]] = defaultdict(lambda: ([], []))
        for step, name, metric, value in scalars:
            steps, values = series[(name, metric)]
            steps.append(step)
            values.append(value)
        for key, (steps, values) in (columns or {}).items():
            if key in series:  # also logged: one chunk of both
                series[key][0].extend(np.asarray(steps).tolist())
                series[key][1].extend(np.asarray(values).tolist())
            else:
                series[key] = (steps, values)
        per_unit: dict[tuple[str, int], list[tuple[int, float, float]]] = defaultdict(list)
        for step, name, unit, mean, var in units:
            per_unit[(name, step)].append((unit, mean, var))
        unit_rows = [(step, name, *_unit_arrays(values)) for (name, step), values in per_unit.items()]
        with self.transaction():
            config = self._config(run_id)
            for args in layers:
                self._register(run_id, *args)
            layer = {name: i for (rid, name), i in self._layers.items() if rid == run_id}
            layer[""] = RUN_LAYER
            if run_id not in self._parts:  # another writer may have written this run before
                self._parts[run_id] = self.conn.execute(
                    "SELECT COALESCE(MAX(part), 0) FROM series WHERE run_id = ?", (run_id,)).fetchone()[0]
            self._parts[run_id] += 1
            rows = []
            for (name, metric), (steps, values) in series.items():
                dtype = chunks.RUN_DTYPE if name == "" else chunks.LAYER_DTYPE
                c = chunks.encode(np.asarray(steps), np.asarray(values, dtype=np.float64), dtype)
                rows.append((run_id, layer[name], self._metric_id(metric), self._parts[run_id], c.first, c.count, c.stride,
                             c.steps, c.dtype, c.vals))
            self.conn.executemany("INSERT INTO series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self.conn.executemany("INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?)", [
                (run_id, layer[name], step, chunks.pack(mean, chunks.UNIT_DTYPE), chunks.pack(var, chunks.UNIT_DTYPE))
                for step, name, mean, var in [*unit_rows, *unit_arrays]])
            self.conn.executemany("INSERT OR REPLACE INTO histograms VALUES (?, ?, ?, ?)", [
                (run_id, layer[name], step, chunks.pack(counts, "<i4")) for step, name, counts in hists])
            if saved is not None:
                ranges = config.get("saved_steps", [])
                if ranges and ranges[-1][1] + 1 >= saved[0]:
                    ranges[-1][1] = max(ranges[-1][1], saved[1])
                else:
                    ranges.append(list(saved))
                self._set_config(run_id, {**config, "saved_steps": ranges})

    def close(self) -> None:
        self.conn.close()


def _unit_arrays(values: list[tuple[int, float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit ``(unit, mean, var)`` rows as float64 arrays indexed by unit (NaN where missing)."""
    units = np.asarray([u for u, _, _ in values], dtype=np.int64)
    mean = np.full(units.max() + 1, np.nan)
    var = np.full(units.max() + 1, np.nan)
    mean[units] = [m for _, m, _ in values]
    var[units] = [v for _, _, v in values]
    return mean, var


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception, and with it the
    writer's caches of ids (metrics, layers, parts) that the transaction created."""

    def __init__(self, writer: TraceWriter) -> None:
        self.writer, self.conn = writer, writer.conn

    def __enter__(self) -> None:
        w = self.writer
        self.caches = (dict(w._metrics), dict(w._layers), dict(w._parts))
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        committed = False
        try:
            if kind is None:
                self.conn.execute("COMMIT")
                committed = True
        finally:
            if not committed:  # an exception, or a COMMIT that failed (a full disk)
                if self.conn.in_transaction:  # SQLite may have rolled back itself
                    self.conn.execute("ROLLBACK")
                self.writer._metrics, self.writer._layers, self.writer._parts = self.caches
