"""Reading a trace file: tidy DataFrames and single series, from column chunks.

A filtered read looks up only the chunks it returns (the chunks of a series are adjacent
in the file). Each read is one short transaction, so a live trace can be read while a
Tracer writes it; the writer never waits for a reader.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import chunks
from .schema import RUN_LAYER, TraceError, check_identity, check_size, quick_check, read_uri

_MAX_PARAMS = 900  # stay below SQLite's oldest limit on bound parameters


def load(path: str | os.PathLike[str]) -> Trace:
    """Open a trace file for reading; raises :class:`TraceError` when it cannot."""
    return Trace(path)


def connect(path: str) -> sqlite3.Connection:
    """A raw SQLite connection to the trace ``path`` that cannot change it (``query_only``);
    :class:`Trace` checks the file. It is opened read-write where the file allows it, so
    that the last connection to close checkpoints the WAL and removes its side files; else
    read-only; else ``immutable`` (a folder where the -shm file a WAL reader needs cannot be
    made, and no -wal file)."""
    first: sqlite3.Error | None = None
    for mode in ("rw", "ro", "immutable"):
        if mode == "immutable" and os.path.exists(path + "-wal"):
            break
        try:
            conn = sqlite3.connect(read_uri(path, mode), uri=True)
        except sqlite3.OperationalError as e:
            first = first or e
            continue
        try:
            conn.execute("PRAGMA query_only = ON")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError as e:
            conn.close()
            first = first or e
        except sqlite3.DatabaseError as e:
            conn.close()
            kind = "corrupt" if "malformed" in str(e) else "not a covshift trace"
            raise TraceError(f"{path} is {kind} ({e})") from None
    raise TraceError(f"cannot open {path} ({first})")


def _names(values: Any) -> list[str] | None:
    return None if values is None else [values] if isinstance(values, str) else list(values)


@dataclass(frozen=True)
class _Selection:
    """What a read selects: ``ranks`` {run id: rank}, ``chosen`` {(run id, layer id):
    (layer name, position)}, and the names of both, in rank and first-seen order."""

    ranks: dict[int, int]
    chosen: dict[tuple[int, int], tuple[str, int]]
    run_names: list[str]
    layer_names: list[str]


def _categorical(codes: np.ndarray, names: list[str]) -> pd.Categorical:
    """A categorical of the names that occur, in the order of ``names``."""
    used = np.unique(codes)
    remap = np.zeros(len(names), dtype=np.int32)
    remap[used] = np.arange(len(used))
    return pd.Categorical.from_codes(remap[codes], [names[i] for i in used])


class Trace:
    """A trace file opened read-only. Table methods return tidy DataFrames whose ``run``,
    ``layer`` and ``metric`` columns are pandas categoricals; :meth:`series` returns arrays."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise TraceError(f"no trace file at {self.path}")
        check_size(self.path)
        self._conn = connect(self.path)
        try:
            check_identity(self._conn, self.path)
            check_size(self.path, self._conn)
            quick_check(self._conn, self.path)
        except BaseException:
            self._conn.close()
            raise

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._conn.execute(sql, list(params)).fetchall()
        except sqlite3.DatabaseError as e:
            raise TraceError(f"cannot read {self.path} ({e})") from None

    # small tables ------------------------------------------------------------------------
    @property
    def runs(self) -> list[str]:
        """Run names, in the order they were added."""
        return [name for (name,) in self._rows("SELECT name FROM runs ORDER BY id")]

    @property
    def layers(self) -> list[str]:
        """Layer names in forward order (across runs: first run first, then new names)."""
        return list(dict.fromkeys(n for (n,) in self._rows("SELECT name FROM layers ORDER BY run_id, position")))

    def layer_info(self) -> pd.DataFrame:
        """One row per run and layer: ``run, layer, type, nonlinearity, position``."""
        rows = self._rows("SELECT r.name, l.name, l.type, l.nonlinearity, l.position FROM layers l "
                          "JOIN runs r ON r.id = l.run_id ORDER BY r.id, l.position")
        return pd.DataFrame(rows, columns=["run", "layer", "type", "nonlinearity", "position"])

    def config(self, run: str) -> dict[str, Any]:
        """The settings a run was recorded with, including ``steps`` once it closed and
        ``saved_steps``, the ranges ``[first, last]`` of steps written to the file."""
        rows = self._rows("SELECT config FROM runs WHERE name = ?", [run])
        if not rows:
            raise KeyError(f"no run {run!r} in {self.path}; runs: {', '.join(self.runs) or 'none'}")
        return json.loads(rows[0][0])

    def _selection(self, run: Any, layer: Any) -> _Selection:
        """The selected runs and their selected layers, the run itself as layer ``""``."""
        runs, layers = _names(run), _names(layer)
        picked = [(i, name) for i, name in self._rows("SELECT id, name FROM runs ORDER BY id")
                  if runs is None or name in runs]
        ranks = {i: k for k, (i, _) in enumerate(picked)}
        chosen = {(rid, RUN_LAYER): ("", -1) for rid in ranks if layers is None or "" in layers}
        for lid, rid, name, pos in self._rows("SELECT id, run_id, name, position FROM layers"):
            if rid in ranks and (layers is None or name in layers):
                chosen[(rid, lid)] = (name, pos)
        return _Selection(ranks, chosen, [name for _, name in picked],
                          list(dict.fromkeys(name for name, _ in chosen.values())))

    def _metric_ids(self, metric: Any) -> dict[int, str]:
        names = _names(metric)
        return {i: n for i, n in self._rows("SELECT id, name FROM metrics") if names is None or n in names}

    def _chunks(self, table: str, columns: str, ranks: dict[int, int], layers: Sequence[int],
                metrics: Sequence[int] | None = None) -> list[tuple[Any, ...]]:
        clauses, params = [], []
        for column, ids in (("run_id", list(ranks)), ("layer_id", sorted(set(layers))), ("metric_id", metrics)):
            if ids is not None and len(ids) <= _MAX_PARAMS:
                clauses.append(f"{column} IN ({', '.join('?' * len(ids))})")
                params += list(ids)
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        return self._rows(f"SELECT run_id, layer_id, {columns} FROM {table}{where}", params)

    # per-step values ---------------------------------------------------------------------
    def scalars(self, run: Any = None, layer: Any = None, metric: Any = None) -> pd.DataFrame:
        """Per-step values: ``run, step, layer, metric, value``, ordered by run, step, layer
        (forward order) and metric (run metrics have layer ""). Each filter takes a name or
        a list of names.

        >>> trace.scalars(run="bn", metric=["mean", "std"])  # doctest: +SKIP
        """
        sel = self._selection(run, layer)
        ranks, chosen = sel.ranks, sel.chosen
        metric_names = self._metric_ids(metric)
        rows = [r for r in self._chunks("series", "metric_id, first, count, stride, steps, dtype, vals", ranks,
                                        [lid for _, lid in chosen], list(metric_names))
                if (r[0], r[1]) in chosen and r[2] in metric_names]
        columns = ["run", "step", "layer", "metric", "value"]
        if not rows:
            return pd.DataFrame({c: pd.Series(dtype=float if c == "value" else int if c == "step" else object)
                                 for c in columns})
        counts = np.fromiter((r[4] for r in rows), np.int64, len(rows))
        steps, values = _decode(rows, counts)
        layer_code = {name: k for k, name in enumerate(sel.layer_names)}
        metric_code = {i: k for k, i in enumerate(metric_names)}
        # the sort key: run rank (11 bits), step (32 bits), then (position, metric id) by rank (20 bits)
        pairs = sorted({(chosen[(r[0], r[1])][1], r[2]) for r in rows})
        pair_rank = {pair: k for k, pair in enumerate(pairs)}
        if len(ranks) >= 1 << 11 or len(pairs) >= 1 << 20 or steps.min() < 0 or steps.max() >= 1 << 32:
            raise TraceError(f"{self.path} holds more runs, layers or steps than one scalars() frame can order")
        head = np.array([ranks[r[0]] << 52 | pair_rank[(chosen[(r[0], r[1])][1], r[2])] for r in rows], np.int64)
        key = np.repeat(head, counts)
        np.left_shift(steps, 20, out=steps)
        key |= steps
        del steps
        if not np.all(key[1:] >= key[:-1]):
            order = np.argsort(key, kind="stable")
            key, values = key[order], values[order]
            del order
        run_c = (key >> 52).astype(np.int32)
        pair = (key & ((1 << 20) - 1)).astype(np.int32)
        steps = (key >> 20) & ((1 << 32) - 1)
        del key
        # (run rank, position) -> layer code, and pair -> metric code
        positions = np.array([pos for pos, _ in pairs], dtype=np.int64)
        table = np.zeros((len(ranks), max(pos for _, pos in chosen.values()) + 2), dtype=np.int32)
        for (rid, _), (name, pos) in chosen.items():
            table[ranks[rid], pos + 1] = layer_code[name]
        layer_c = table[run_c, positions[pair] + 1]
        metric_c = np.array([metric_code[m] for _, m in pairs], dtype=np.int32)[pair]
        return pd.DataFrame({"run": _categorical(run_c, sel.run_names), "step": steps,
                             "layer": _categorical(layer_c, sel.layer_names),
                             "metric": _categorical(metric_c, list(metric_names.values())), "value": values},
                            copy=False)

    def series(self, run: str, layer: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """One metric of one layer (``""``: the run) of one run as ``(steps, values)`` arrays
        sorted by step; empty arrays when it was never recorded.

        >>> steps, loss = trace.series("bn", "", "loss")  # doctest: +SKIP
        """
        sel = self._selection(run, layer)
        ranks, chosen = sel.ranks, sel.chosen
        metric_ids = list(self._metric_ids(metric))
        if not ranks:
            raise KeyError(f"no run {run!r} in {self.path}; runs: {', '.join(self.runs) or 'none'}")
        rows = [] if not chosen or not metric_ids else self._chunks(
            "series", "metric_id, first, count, stride, steps, dtype, vals", ranks, [lid for _, lid in chosen],
            metric_ids)
        if not rows:
            return np.empty(0, dtype=np.int64), np.empty(0)
        steps, values = _decode(rows, np.fromiter((r[4] for r in rows), np.int64, len(rows)))
        order = np.argsort(steps, kind="stable")
        return steps[order], values[order]

    # detail steps ------------------------------------------------------------------------
    def units(self, run: Any = None, layer: Any = None) -> pd.DataFrame:
        """Per-unit (per-channel) statistics at detail steps: ``run, step, layer, unit, mean, var``."""
        sel = self._selection(run, layer)
        rows = self._blocks("units", "step, mean, var", sel)
        means = [chunks.unpack(r[3], chunks.UNIT_DTYPE) for r in rows]
        sizes = np.array([len(m) for m in means], dtype=np.int64)
        frame = self._block_frame(rows, sel, sizes)
        frame["unit"] = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        frame["mean"] = np.concatenate(means).astype(np.float64) if rows else np.empty(0)
        frame["var"] = (np.concatenate([chunks.unpack(r[4], chunks.UNIT_DTYPE) for r in rows]).astype(np.float64)
                        if rows else np.empty(0))
        return frame

    def histograms(self, run: Any = None, layer: Any = None) -> pd.DataFrame:
        """Histograms at detail steps: ``run, step, layer, bin, left, right, count``. Bin 0
        counts values below the first edge (left = -inf), the last bin those above the last."""
        sel = self._selection(run, layer)
        rows = self._blocks("histograms", "step, counts", sel)
        counts = [chunks.unpack(r[3], "<i4") for r in rows]
        sizes = np.array([len(c) for c in counts], dtype=np.int64)
        frame = self._block_frame(rows, sel, sizes)
        bins = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        edges = {lid: np.concatenate([[-np.inf], chunks.unpack(blob, "<f8") if blob else [], [np.inf]])
                 for lid, blob in self._rows("SELECT id, edges FROM layers")}
        full = [edges[r[1]] for r in rows]
        frame["bin"] = bins
        frame["left"] = np.concatenate([e[:n] for e, n in zip(full, sizes)]) if rows else np.empty(0)
        frame["right"] = np.concatenate([e[1:n + 1] for e, n in zip(full, sizes)]) if rows else np.empty(0)
        frame["count"] = np.concatenate(counts).astype(np.int64) if rows else np.empty(0, dtype=np.int64)
        return frame

    def _blocks(self, table: str, columns: str, sel: _Selection) -> list[tuple[Any, ...]]:
        """A detail table's rows of the selected layers, ordered by run, step and position."""
        rows = [r for r in self._chunks(table, columns, sel.ranks, [lid for _, lid in sel.chosen])
                if (r[0], r[1]) in sel.chosen]
        return sorted(rows, key=lambda r: (sel.ranks[r[0]], r[2], sel.chosen[(r[0], r[1])][1]))

    @staticmethod
    def _block_frame(rows: list[tuple[Any, ...]], sel: _Selection, sizes: np.ndarray) -> pd.DataFrame:
        code = {name: k for k, name in enumerate(sel.layer_names)}
        run_c = np.repeat(np.array([sel.ranks[r[0]] for r in rows], dtype=np.int64), sizes)
        layer_c = np.repeat(np.array([code[sel.chosen[(r[0], r[1])][0]] for r in rows], dtype=np.int64), sizes)
        steps = np.repeat(np.array([r[2] for r in rows], dtype=np.int64), sizes)
        return pd.DataFrame({"run": _categorical(run_c, sel.run_names), "step": steps,
                             "layer": _categorical(layer_c, sel.layer_names)}, copy=False)


def _decode(rows: list[tuple[Any, ...]], counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Steps and float64 values of chunk rows ``(run, layer, metric, first, count, stride,
    steps, dtype, vals)``, concatenated in row order."""
    starts = np.cumsum(counts) - counts
    firsts = np.fromiter((r[3] for r in rows), np.int64, len(rows))
    strides = np.fromiter((r[5] or 1 for r in rows), np.int64, len(rows))
    offset = np.arange(counts.sum(), dtype=np.int64) - np.repeat(starts, counts)
    steps = np.repeat(firsts, counts) + np.repeat(strides, counts) * offset
    for k, r in enumerate(rows):
        if r[6] is not None:
            steps[starts[k]:starts[k] + counts[k]] = chunks.decode_steps(r[3], r[4], r[5], r[6])
    values = np.concatenate([chunks.decode_values(r[7], r[8]) for r in rows])
    return steps, values
