"""The statistics of outputs kept whole, computed at a step's end for all of them at once.

A forward hook copies an output of at most twice ``sample_size`` values whole into the step's
staging and computes nothing. At the step's end, :class:`WholePlan` views the step's
copies of one size as the rows of one 2-D tensor and takes their moments
(:func:`covshift.stats.row_moments`) in one batch, and the saturation and gain of those
of a nonlinearity of the output (:func:`covshift.stats.row_derivative_stats`) in one
batch per nonlinearity. The plan is made from the step's calls and kept while the calls
stay the same (a training loop calls its layers in the same order at every step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import stats
from .records import Arena, StepRecord


class DeviceIndices:
    """Index tensors on the device, each built once per key (a step's calls come in the same
    order at every step, so an index is not sent again); at most ``limit`` are kept."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self.kept: dict[tuple[Any, ...], Tensor] = {}

    def get(self, key: tuple[Any, ...], build: Callable[[], Tensor]) -> Tensor:
        if key not in self.kept:
            if len(self.kept) >= self.limit:  # layouts that keep changing: do not keep them all
                self.kept.clear()
            self.kept[key] = build()
        return self.kept[key]


@dataclass
class _Group:
    """A step's outputs kept whole of one size in one staging buffer: the rows at ``first +
    i * gap``, or where ``gap`` is 0 at ``first + starts[i]``; the step's calls they belong
    to; and for each nonlinearity of the output among them its rows (None: all; a slice
    when evenly spaced) and calls."""

    buffer: int
    n: int
    first: int
    gap: int
    starts: tuple[int, ...]
    calls: list[int]
    kinds: list[tuple[stats.Nonlinearity, slice | tuple[int, ...] | None, list[int]]]


def _even(offsets: Sequence[int], n: int) -> int:
    """The common distance of ``offsets`` when it is at least ``n`` (rows that do not
    overlap, viewable as one strided tensor), else 0."""
    gap = offsets[1] - offsets[0] if len(offsets) > 1 else n
    return gap if gap >= n and all(b - a == gap for a, b in zip(offsets, offsets[1:])) else 0


class WholePlan:
    """Where a step's outputs kept whole lie, by size, and which rows take derivative
    statistics; :meth:`compute` puts their statistics into the step's record.

    ``kind_of(i)``, given to :meth:`compute` (not kept: a tracer's bound method kept here would
    make a reference cycle), is the nonlinearity of layer ``i``'s output (None for other
    layers, and for one of the input: its saturation is taken from the input's sample at the
    flush)."""

    def __init__(self, indices: DeviceIndices) -> None:
        self.indices = indices
        self.calls: list[tuple[int, ...]] | None = None  # the calls the groups were made for
        self.groups: list[_Group] = []

    def compute(self, rec: StepRecord, arena: Arena, kind_of: Callable[[int], stats.Nonlinearity | None]) -> None:
        """The moments (and saturation and gain) of ``rec``'s outputs kept whole, from their
        copies in ``arena`` (``rec.places`` says where the staging went), into ``rec.whole``
        and ``rec.derived``."""
        if rec.calls != self.calls:
            self._plan(rec.calls, kind_of)
        for group in self.groups:
            arena_buffer, base = rec.places[group.buffer]
            source = arena.buffers[arena_buffer]
            rows = self._rows(group, source, base + group.first)
            rec.whole.append((group.calls, rec.slots.put(stats.row_moments(rows))))
            for kind, pick, members in group.kinds:
                if isinstance(pick, tuple):
                    at = self.indices.get(("pick", pick, rows.device), lambda: torch.tensor(pick, device=rows.device))
                    some = rows.index_select(0, at)
                else:
                    some = rows if pick is None else rows[pick]
                rec.derived.append((members, rec.slots.put(stats.row_derivative_stats(some, kind))))

    def _rows(self, group: _Group, source: Tensor, start: int) -> Tensor:
        """The group's rows of a 1-D ``source`` whose step starts at ``start``: a view when
        they lie evenly spaced (usually end to end), else a gather by positions."""
        k, n = len(group.calls), group.n
        if group.gap:
            return source.as_strided((k, n), (group.gap, 1), source.storage_offset() + start)
        at = self.indices.get(("rows", n, group.starts, source.device), lambda: (
            torch.tensor(group.starts).unsqueeze(1) + torch.arange(n)).reshape(-1).to(source.device))
        return torch.index_select(source[start:], 0, at).view(k, n)

    def _plan(self, calls: list[tuple[int, ...]], kind_of: Callable[[int], stats.Nonlinearity | None]) -> None:
        found: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for call, (index, n, buffer, offset, _, at_buffer, _) in enumerate(calls):
            if at_buffer < 0:
                found.setdefault((buffer, n), []).append((call, offset))
        self.groups = []
        for (buffer, n), members in found.items():
            offsets = [o for _, o in members]
            first, gap = offsets[0], _even(offsets, n)
            starts = () if gap else tuple(o - first for o in offsets)
            by_kind: dict[int, tuple[stats.Nonlinearity, list[int]]] = {}
            for row, (call, _) in enumerate(members):
                kind = kind_of(calls[call][0])
                if kind is not None:
                    by_kind.setdefault(id(kind), (kind, []))[1].append(row)
            kinds = [(kind, _pick(rows, len(members)), [members[r][0] for r in rows])
                     for kind, rows in by_kind.values()]
            self.groups.append(_Group(buffer, n, first, gap, starts, [c for c, _ in members], kinds))
        self.calls = list(calls)


def _pick(rows: list[int], count: int) -> slice | tuple[int, ...] | None:
    """Rows ``rows`` of ``count``: None for all, a slice when evenly spaced, else a tuple."""
    if len(rows) == count:
        return None
    step = _even(rows, 1)
    return slice(rows[0], rows[-1] + 1, step) if step else tuple(rows)
