"""The trace file's schema, identity and integrity checks.

A trace is one SQLite database in WAL mode (readers never block the writer) with
``application_id`` "CvSh" and ``user_version`` the schema version. Per-step values are kept
as column chunks: one row per (run, layer, metric) and flush, holding that flush's steps
and values as little-endian arrays (:mod:`covshift.store.chunks`).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

SCHEMA_VERSION = 2
#: SQLite ``application_id`` of a covshift trace (the bytes "CvSh").
APPLICATION_ID = 0x43765368
#: ``layer_id`` of the run's own metrics (loss, lr, validation): no layer has id 0.
RUN_LAYER = 0

TABLES = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, "
    "config TEXT NOT NULL, created TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS layers (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER NOT NULL, "
    "name TEXT NOT NULL, type TEXT NOT NULL, nonlinearity TEXT, position INTEGER NOT NULL, edges BLOB, "
    "UNIQUE (run_id, name))",
    "CREATE TABLE IF NOT EXISTS metrics (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
    # one chunk of a series; the primary key clusters a series' chunks, so a filtered read
    # touches only the pages it returns
    "CREATE TABLE IF NOT EXISTS series (run_id INTEGER NOT NULL, layer_id INTEGER NOT NULL, "
    "metric_id INTEGER NOT NULL, part INTEGER NOT NULL, first INTEGER NOT NULL, count INTEGER NOT NULL, "
    "stride INTEGER, steps BLOB, dtype TEXT NOT NULL, vals BLOB NOT NULL, "
    "PRIMARY KEY (run_id, layer_id, metric_id, part)) WITHOUT ROWID",
    # rowid tables: their rows of a few KB stay on one page (WITHOUT ROWID spills them)
    "CREATE TABLE IF NOT EXISTS units (run_id INTEGER NOT NULL, layer_id INTEGER NOT NULL, "
    "step INTEGER NOT NULL, mean BLOB NOT NULL, var BLOB NOT NULL)",
    "CREATE UNIQUE INDEX IF NOT EXISTS units_key ON units (run_id, layer_id, step)",
    "CREATE TABLE IF NOT EXISTS histograms (run_id INTEGER NOT NULL, layer_id INTEGER NOT NULL, "
    "step INTEGER NOT NULL, counts BLOB NOT NULL)",
    "CREATE UNIQUE INDEX IF NOT EXISTS histograms_key ON histograms (run_id, layer_id, step)",
]
DATA_TABLES = ("series", "units", "histograms", "layers")


class TraceError(Exception):
    """A file that is missing, empty, not a covshift trace, corrupt, from another covshift
    version, or that cannot be written."""


def check_size(path: str, conn: sqlite3.Connection | None = None) -> None:
    """An empty file, or (given a connection) a file shorter than its pages: truncated.

    Only ``os.stat`` and SQLite touch the file: opening and closing it here would release
    every POSIX lock this process holds on it, SQLite's included, and let two writers in.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise TraceError(f"{path} is empty (0 bytes): not a covshift trace")
    if conn is None:
        return
    wal = path + "-wal"
    if os.path.exists(wal) and os.path.getsize(wal) > 0:
        return  # pages still in the write-ahead log: the main file may be shorter; quick_check decides
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise TraceError(f"{path} is not a covshift trace ({e})") from None
    if size % page_size or pages * page_size > size:
        raise TraceError(f"{path} is corrupt (truncated: {size} bytes, the file describes "
                         f"{pages} pages of {page_size} bytes)")


def check_identity(conn: sqlite3.Connection, path: str, writing: bool = False) -> int:
    """The schema version of a covshift trace; raise :class:`TraceError` for another
    program's file or a version this covshift cannot read (or, ``writing``, append to)."""
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
            f"up to {SCHEMA_VERSION}): upgrade covshift to read it")
    if version < SCHEMA_VERSION:
        action = "append to" if writing else "read"
        raise TraceError(
            f"{path} is a trace of schema {version}, written by covshift 0.1; this covshift cannot "
            f"{action} it: record it again (`covshift trace` rewrites it) or read it with covshift 0.1")
    return version


def quick_check(conn: sqlite3.Connection, path: str) -> None:
    try:
        result = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise TraceError(f"{path} is corrupt ({e})") from None
    if result != "ok":
        raise TraceError(f"{path} is corrupt ({result})")


T = TypeVar("T")
#: Bytes per page of a new trace file.
PAGE_SIZE = 16384


def retry_locked(action: Callable[[], T], timeout: float) -> T:
    """``action()``, retried with a growing pause while SQLite reports the database locked
    or busy, for at most ``timeout`` seconds: opening a file that other processes are
    creating or switching to WAL can fail at once, without SQLite's busy handler waiting."""
    deadline, pause = time.monotonic() + timeout, 0.005
    while True:
        try:
            return action()
        except sqlite3.OperationalError as e:
            if not ("locked" in str(e) or "busy" in str(e)) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.25)


def create_or_check(conn: sqlite3.Connection, path: str, version: str) -> None:
    """Give a new file the schema, or check an existing one, in one immediate transaction:
    processes creating the same file at once see either nothing or the whole schema."""
    if os.path.getsize(path) == 0:
        # settings until the first table is made (page_size first): a chunk of up to
        # saving.MERGED_STEPS float32 values stays inside its page, where 4 KB pages would
        # spill it onto a mostly empty overflow page
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        empty = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        if empty and app == 0:
            for statement in TABLES:
                conn.execute(statement)
            conn.executemany("INSERT INTO meta VALUES (?, ?)",
                             [("format", "covshift trace"), ("covshift_version", version)])
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        else:
            check_identity(conn, path, writing=True)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back itself (a full disk)
            conn.execute("ROLLBACK")
        raise
    if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
        raise TraceError(f"cannot write {path}: the file system does not support SQLite's WAL mode")


def read_uri(path: str, mode: str = "rw") -> str:
    """The URI that opens ``path`` without creating it: ``rw`` (a reader that can clean up the
    WAL's side files when it is the last connection), ``ro``, or ``immutable`` (where no
    -shm file can be made)."""
    return Path(path).resolve().as_uri() + ("?immutable=1" if mode == "immutable" else f"?mode={mode}")
