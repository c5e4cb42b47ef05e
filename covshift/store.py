"""The trace file: one SQLite database holding runs, layers, metrics and step data.

:class:`TraceWriter` appends batches inside transactions, so an interrupted run keeps
every batch already written. :func:`load` opens a trace read-only as a :class:`Trace`
whose methods return tidy pandas DataFrames.

>>> trace = load("runs/demo.covshift")  # doctest: +SKIP
>>> trace.scalars(metric="loss").plot(x="step", y="value")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from . import __version__

SCHEMA_VERSION = 1
#: SQLite ``application_id`` of a covshift trace (the bytes "CvSh").
APPLICATION_ID = 0x43765368

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, config TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE layers (
    id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id), name TEXT NOT NULL,
    type TEXT NOT NULL, nonlinearity TEXT, position INTEGER NOT NULL, edges TEXT,
    UNIQUE (run_id, name));
CREATE TABLE metrics (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE scalars (
    run_id INTEGER NOT NULL, step INTEGER NOT NULL, layer_id INTEGER, metric_id INTEGER NOT NULL, value REAL);
CREATE TABLE units (
    run_id INTEGER NOT NULL, step INTEGER NOT NULL, layer_id INTEGER NOT NULL, unit INTEGER NOT NULL,
    mean REAL, var REAL);
CREATE TABLE histograms (
    run_id INTEGER NOT NULL, step INTEGER NOT NULL, layer_id INTEGER NOT NULL, bin INTEGER NOT NULL,
    count INTEGER NOT NULL);
"""


class TraceError(Exception):
    """A file that is missing, not a covshift trace, corrupt, or from a newer covshift."""


def _check(conn: sqlite3.Connection, path: str) -> None:
    """Raise :class:`TraceError` unless ``conn`` is a covshift trace this version can read."""
    try:
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise TraceError(f"{path} is not a covshift trace ({e})") from None
    if app != APPLICATION_ID:
        raise TraceError(f"{path} is not a covshift trace (an SQLite file of another program)")
    if version > SCHEMA_VERSION:
        raise TraceError(
            f"{path} was written by a newer covshift (trace schema {version}, this covshift reads "
            f"up to {SCHEMA_VERSION}): upgrade covshift to read it"
        )


def _quick_check(conn: sqlite3.Connection, path: str) -> None:
    try:
        result = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise TraceError(f"{path} is corrupt ({e})") from None
    if result != "ok":
        raise TraceError(f"{path} is corrupt ({result})")


class TraceWriter:
    """Appends to a trace file, creating it (and its folder) when missing."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        fresh = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        self.conn = sqlite3.connect(self.path, timeout=60)
        try:
            if fresh:
                with self.conn:
                    self.conn.executescript(_SCHEMA)
                    self.conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    self.conn.executemany("INSERT INTO meta VALUES (?, ?)",
                                          [("format", "covshift trace"), ("covshift_version", __version__)])
            else:
                _check(self.conn, self.path)
        except BaseException:
            self.conn.close()
            raise
        self._metrics: dict[str, int] = dict(
            (name, i) for i, name in self.conn.execute("SELECT id, name FROM metrics"))
        self._layers: dict[tuple[int, str], int] = {}

    def add_run(self, name: str, config: dict[str, Any], overwrite: bool = False) -> int:
        """Add a run and return its id. An existing run of that name is an error, or is
        replaced when ``overwrite``."""
        if not isinstance(name, str) or not name:
            raise ValueError("a run needs a non-empty name")
        with self.conn:
            if not overwrite and self.conn.execute("SELECT 1 FROM runs WHERE name = ?", (name,)).fetchone():
                raise ValueError(
                    f"run {name!r} already exists in {self.path}: choose another run name, "
                    "or pass overwrite=True to replace it")
            self._delete_run(name)
            created = datetime.now(timezone.utc).isoformat(timespec="seconds")
            cur = self.conn.execute("INSERT INTO runs (name, config, created) VALUES (?, ?, ?)",
                                    (name, json.dumps(config, default=str), created))
        return int(cur.lastrowid)

    def remove_runs(self, names: Iterable[str]) -> list[str]:
        """Delete the named runs with all their rows, in one transaction (all or none);
        returns the names that were in the file."""
        with self.conn:
            return [name for name in names if self._delete_run(name)]

    def _delete_run(self, name: str) -> bool:
        """Delete a run and its rows inside the caller's transaction; False when there is none."""
        row = self.conn.execute("SELECT id FROM runs WHERE name = ?", (name,)).fetchone()
        if row is None:
            return False
        for table in ("scalars", "units", "histograms", "layers"):
            self.conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (row[0],))
        self.conn.execute("DELETE FROM runs WHERE id = ?", (row[0],))
        self._layers = {key: i for key, i in self._layers.items() if key[0] != row[0]}
        return True

    def update_config(self, run_id: int, **values: Any) -> None:
        """Merge ``values`` into a run's config."""
        with self.conn:
            (text,) = self.conn.execute("SELECT config FROM runs WHERE id = ?", (run_id,)).fetchone()
            config = {**json.loads(text), **values}
            self.conn.execute("UPDATE runs SET config = ? WHERE id = ?", (json.dumps(config, default=str), run_id))

    def add_layer(self, run_id: int, name: str, type_name: str, nonlinearity: str | None,
                  position: int, edges: Sequence[float] | None) -> None:
        """Register a layer once; later calls only fill in its histogram edges."""
        key = (run_id, name)
        with self.conn:
            if key not in self._layers:
                cur = self.conn.execute(
                    "INSERT INTO layers (run_id, name, type, nonlinearity, position) VALUES (?, ?, ?, ?, ?)",
                    (run_id, name, type_name, nonlinearity, position))
                self._layers[key] = int(cur.lastrowid)
            if edges is not None:
                self.conn.execute("UPDATE layers SET edges = ? WHERE id = ?",
                                  (json.dumps(list(edges)), self._layers[key]))

    def _metric_id(self, name: str) -> int:
        if name not in self._metrics:
            self.conn.execute("INSERT OR IGNORE INTO metrics (name) VALUES (?)", (name,))
            (self._metrics[name],) = self.conn.execute("SELECT id FROM metrics WHERE name = ?", (name,)).fetchone()
        return self._metrics[name]

    def write(self, run_id: int, scalars: Iterable[tuple[int, str, str, float]],
              units: Iterable[tuple[int, str, int, float, float]],
              hists: Iterable[tuple[int, str, np.ndarray]]) -> None:
        """Append one batch of step data in a single transaction. Layer names must have been
        added with :meth:`add_layer`; the empty name means the run itself."""
        layer = {name: i for (rid, name), i in self._layers.items() if rid == run_id}
        layer[""] = None  # type: ignore[assignment]
        with self.conn:
            self.conn.executemany(
                "INSERT INTO scalars VALUES (?, ?, ?, ?, ?)",
                [(run_id, s, layer[n], self._metric_id(m), None if math.isnan(v) else v) for s, n, m, v in scalars])
            self.conn.executemany(
                "INSERT INTO units VALUES (?, ?, ?, ?, ?, ?)",
                [(run_id, s, layer[n], u, mean, var) for s, n, u, mean, var in units])
            self.conn.executemany(
                "INSERT INTO histograms VALUES (?, ?, ?, ?, ?)",
                [(run_id, s, layer[n], b, int(c)) for s, n, counts in hists for b, c in enumerate(counts)])

    def close(self) -> None:
        self.conn.close()


def load(path: str | os.PathLike[str]) -> Trace:
    """Open a trace file for reading; raises :class:`TraceError` when it cannot."""
    return Trace(path)


class Trace:
    """A trace file opened read-only. Every table method returns a tidy DataFrame."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise TraceError(f"no trace file at {self.path}")
        uri = Path(self.path).resolve().as_uri() + "?mode=ro"
        try:
            self._conn = sqlite3.connect(uri, uri=True)
        except sqlite3.Error as e:
            raise TraceError(f"cannot open {self.path} ({e})") from None
        try:
            _check(self._conn, self.path)
            _quick_check(self._conn, self.path)
        except BaseException:
            self._conn.close()
            raise

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        try:
            return pd.read_sql_query(sql, self._conn, params=list(params))
        except (sqlite3.DatabaseError, pd.errors.DatabaseError) as e:
            raise TraceError(f"cannot read {self.path} ({e})") from None

    @property
    def runs(self) -> list[str]:
        """Run names, in the order they were added."""
        return self._query("SELECT name FROM runs ORDER BY id")["name"].tolist()

    @property
    def layers(self) -> list[str]:
        """Layer names in forward order (across runs: first run first, then new names)."""
        frame = self._query("SELECT l.name FROM layers l ORDER BY l.run_id, l.position")
        return list(dict.fromkeys(frame["name"]))

    def layer_info(self) -> pd.DataFrame:
        """One row per run and layer: ``run, layer, type, nonlinearity, position``."""
        return self._query(
            "SELECT r.name AS run, l.name AS layer, l.type, l.nonlinearity, l.position FROM layers l "
            "JOIN runs r ON r.id = l.run_id ORDER BY r.id, l.position")

    def config(self, run: str) -> dict[str, Any]:
        """The settings a run was recorded with, including ``steps`` once it closed."""
        frame = self._query("SELECT config FROM runs WHERE name = ?", [run])
        if frame.empty:
            raise KeyError(f"no run {run!r} in {self.path}; runs: {', '.join(self.runs) or 'none'}")
        return json.loads(frame["config"].iloc[0])

    def _where(self, run: Any, layer: Any, metric: Any = None) -> tuple[str, list[Any]]:
        clauses, params = [], []
        for column, value in (("r.name", run), ("COALESCE(l.name, '')", layer), ("m.name", metric)):
            if value is None:
                continue
            values = [value] if isinstance(value, str) else list(value)
            clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
            params += values
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def scalars(self, run: Any = None, layer: Any = None, metric: Any = None) -> pd.DataFrame:
        """Per-step values: ``run, step, layer, metric, value`` (run metrics have layer "").
        Each filter takes a name or a list of names."""
        where, params = self._where(run, layer, metric)
        return self._query(
            "SELECT r.name AS run, s.step, COALESCE(l.name, '') AS layer, m.name AS metric, "
            "CAST(s.value AS REAL) AS value FROM scalars s JOIN runs r ON r.id = s.run_id "
            "JOIN metrics m ON m.id = s.metric_id LEFT JOIN layers l ON l.id = s.layer_id" + where +
            " ORDER BY r.id, s.step, COALESCE(l.position, -1), m.id", params)

    def units(self, run: Any = None, layer: Any = None) -> pd.DataFrame:
        """Per-unit (per-channel) statistics at detail steps: ``run, step, layer, unit, mean, var``."""
        where, params = self._where(run, layer)
        return self._query(
            "SELECT r.name AS run, u.step, l.name AS layer, u.unit, u.mean, u.var FROM units u "
            "JOIN runs r ON r.id = u.run_id JOIN layers l ON l.id = u.layer_id" + where +
            " ORDER BY r.id, u.step, l.position, u.unit", params)

    def histograms(self, run: Any = None, layer: Any = None) -> pd.DataFrame:
        """Histograms at detail steps: ``run, step, layer, bin, left, right, count``. Bin 0
        counts values below the first edge (left = -inf), the last bin those above the last."""
        where, params = self._where(run, layer)
        frame = self._query(
            "SELECT r.name AS run, h.step, l.name AS layer, h.bin, h.count, l.edges FROM histograms h "
            "JOIN runs r ON r.id = h.run_id JOIN layers l ON l.id = h.layer_id" + where +
            " ORDER BY r.id, h.step, l.position, h.bin", params)
        left, right = [], []
        cache: dict[str, np.ndarray] = {}
        for b, edges_text in zip(frame["bin"], frame["edges"]):
            edges = cache.get(edges_text)
            if edges is None:
                edges = cache[edges_text] = np.concatenate([[-np.inf], json.loads(edges_text or "[]"), [np.inf]])
            left.append(edges[b])
            right.append(edges[b + 1])
        frame = frame.drop(columns="edges")
        frame.insert(4, "left", np.asarray(left, dtype=float))
        frame.insert(5, "right", np.asarray(right, dtype=float))
        return frame
