"""Merging traces: every run of each source trace, with all its data, copied into one trace.

A run is copied row for row (its config and creation time, layers with their histogram
edges, every series chunk, per-unit row and histogram), each run in one transaction, with
its run, layer and metric ids renumbered for the target. The chunks are copied as stored,
so the merged values are bit for bit the sources'. Meta keys the target lacks are copied;
its own ``format`` and ``covshift_version`` stay.

>>> merge(["a.covshift", "b.covshift"], "all.covshift", on_clash="rename")  # doctest: +SKIP
['bn', 'nobn', 'bn (2)', 'nobn (2)']
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from .reader import connect, load
from .schema import RUN_LAYER, TraceError
from .writer import TraceWriter

Clash = Literal["error", "rename", "replace"]
#: What to do with a run whose name the target already holds: fail, copy it as ``name (2)``
#: (the first free number), or replace the target's run.
CLASHES: tuple[Clash, ...] = ("error", "rename", "replace")
#: The tables of a run's data, copied with their run, layer and metric ids renumbered.
_ROW_TABLES = ("series", "units", "histograms")


class RunClash(TraceError):
    """A run of a source has the name of a run already in the target."""


def merge(sources: Sequence[str | os.PathLike[str]], target: str | os.PathLike[str], on_clash: Clash = "error",
          overwrite: bool = False) -> list[str]:
    """Write every run of ``sources``, in order, into the new trace ``target``; returns the
    run names written. The merge is written next to ``target`` and moved into place when
    complete, so a failure leaves no partial output (and an overwritten file intact).
    Raises :class:`TraceError` for an unreadable source, an existing ``target`` without
    ``overwrite``, a target that is one of the sources, or (:class:`RunClash`) a clash."""
    _check_clash(on_clash)
    target = Path(target)
    for source in sources:
        load(source).close()  # a missing, corrupt or foreign file fails before anything is written
        if target.exists() and os.path.samefile(source, target):
            raise TraceError(f"the output {target} is one of the inputs: give another output file")
    if target.is_dir():
        raise TraceError(f"the output {target} is a folder: give a file name")
    if target.exists() and not overwrite:
        raise TraceError(f"{target} exists: pass --overwrite to replace it")
    partial = target.with_name(f".{target.name}.merging")
    _remove(partial)
    try:
        writer = TraceWriter(partial)
        try:
            names = [name for source in sources for name in copy_runs(source, writer, on_clash)]
        finally:
            writer.close()
        _remove_side_files(target)  # an old WAL must not be applied to the new file
        os.replace(partial, target)
    finally:
        _remove(partial)
    return names


def copy_runs(source: str | os.PathLike[str], writer: TraceWriter, on_clash: Clash = "error") -> list[str]:
    """Copy every run of the trace ``source`` into ``writer``'s trace, each in one
    transaction, and return the names they got there."""
    _check_clash(on_clash)
    load(source).close()  # the checks of a trace: identity, version, size, integrity
    src = connect(os.fspath(source))
    try:
        with writer.transaction():
            _copy_meta(src, writer.conn)
        runs = src.execute("SELECT id, name, config, created FROM runs ORDER BY id").fetchall()
        names = []
        for run_id, name, config, created in runs:
            taken = {n for (n,) in writer.conn.execute("SELECT name FROM runs")}
            if name in taken and on_clash == "error":
                raise RunClash(f"run {name!r} of {os.fspath(source)} is already in {writer.path}")
            if name in taken and on_clash == "replace":
                writer.remove_runs([name])
            new_name = _free_name(name, taken) if on_clash == "rename" else name
            with writer.transaction():
                _copy_run(src, writer.conn, run_id, (new_name, config, created))
            names.append(new_name)
        return names
    except sqlite3.DatabaseError as e:
        raise TraceError(f"cannot merge {os.fspath(source)} into {writer.path} ({e})") from None
    finally:
        src.close()


def _copy_run(src: sqlite3.Connection, dst: sqlite3.Connection, run_id: int, run: tuple[str, str, str]) -> None:
    """One run of ``src``, renumbered, into ``dst`` (inside the caller's transaction)."""
    new_run = dst.execute("INSERT INTO runs (name, config, created) VALUES (?, ?, ?)", run).lastrowid
    layers = {RUN_LAYER: RUN_LAYER}
    for layer_id, *values in src.execute("SELECT id, name, type, nonlinearity, position, edges FROM layers "
                                         "WHERE run_id = ? ORDER BY id", (run_id,)):
        layers[layer_id] = dst.execute("INSERT INTO layers (run_id, name, type, nonlinearity, position, edges) "
                                       "VALUES (?, ?, ?, ?, ?, ?)", (new_run, *values)).lastrowid
    metrics = {}
    for metric_id, name in src.execute("SELECT id, name FROM metrics"):
        dst.execute("INSERT OR IGNORE INTO metrics (name) VALUES (?)", (name,))
        (metrics[metric_id],) = dst.execute("SELECT id FROM metrics WHERE name = ?", (name,)).fetchone()
    renumber: dict[str, Callable[[int], int]] = {
        "run_id": lambda _: new_run, "layer_id": layers.__getitem__, "metric_id": metrics.__getitem__}
    for table in _ROW_TABLES:
        columns = [c for _, c, *_ in dst.execute(f"PRAGMA table_info({table})")]
        maps = [renumber.get(c) for c in columns]  # None: a column that is not an id
        rows = src.execute(f"SELECT {', '.join(columns)} FROM {table} WHERE run_id = ?", (run_id,))
        dst.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                        (tuple(v if f is None else f(v) for f, v in zip(maps, row)) for row in rows))


def _copy_meta(src: sqlite3.Connection, dst: sqlite3.Connection) -> None:
    """The source's meta keys that the target lacks."""
    dst.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                    src.execute("SELECT key, value FROM meta").fetchall())


def _free_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name (2)``, ``name (3)``, ...: the first not in ``taken``."""
    number = 1
    candidate = name
    while candidate in taken:
        number += 1
        candidate = f"{name} ({number})"
    return candidate


def _check_clash(on_clash: str) -> None:
    if on_clash not in CLASHES:
        raise ValueError(f"on_clash takes {', '.join(CLASHES)}, not {on_clash!r}")


def _remove(path: Path) -> None:
    """Remove the trace file ``path`` and its WAL side files, where they exist."""
    path.unlink(missing_ok=True)
    _remove_side_files(path)


def _remove_side_files(path: Path) -> None:
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
