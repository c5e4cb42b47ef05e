"""A step's raw records, and their transfer to the host in a few copies per flush.

Hooks write what they record into an :class:`Arena`, preallocated buffers on the
device (``out=`` arguments: no allocation, no concatenation later): per forward call
the shifted sums and a subsample of the output, per gradient its sum of squares. The
:class:`StepRecord` of a step keeps only where each call wrote. Nothing is read during
training: :func:`gather` moves a flush's records to the host at once, one copy per
buffer, as the :class:`Calls` arrays that :mod:`covshift.columns` turns into metrics
with numpy. Per-step values (loss, learning rates, parameter norms) go through :class:`Slots`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


class Place:
    """Where a hook took elements of an :class:`Arena` at the last step (given to
    :meth:`Arena.claim` or :meth:`Arena.take`): as long as the arena's buffers stay the same
    and the calls before come as then, the same elements are the next free ones, and are
    taken again without a lookup."""

    __slots__ = ("generation", "index", "offset", "n", "view")

    def __init__(self) -> None:
        self.generation, self.index, self.offset, self.n = -1, 0, 0, 0
        self.view: Tensor | None = None


class Arena:
    """Preallocated 1-D buffers, one being filled per dtype and device, that hooks write
    into; each :meth:`take` hands out the next free elements. Buffers grow by doubling,
    and :meth:`reset` keeps the largest of each kind for the next flush.

    >>> arena = Arena(8)
    >>> buffer, offset, view = arena.take(3, torch.zeros(1))
    >>> (buffer, offset, tuple(view.shape))
    (0, 0, (3,))
    """

    def __init__(self, size: int = 1 << 16, fill: float | None = None) -> None:
        self.size, self.fill = size, fill  # new buffers hold ``fill`` when given
        self.buffers: list[Tensor] = []
        self.used: list[int] = []
        self.current: dict[tuple[torch.dtype, torch.device], int] = {}
        self.generation = 0  # changes whenever the buffers do (a Place of another generation is stale)

    def take(self, n: int, like: Tensor, place: Place | None = None) -> tuple[int, int, Tensor]:
        """``(buffer, offset, view)``: ``n`` free elements of ``like``'s dtype and device;
        those of ``place`` when they are the next free ones (and ``place`` notes them)."""
        if place is not None and place.view is not None and self._again(place, n, like):
            return place.index, place.offset, place.view
        index, offset = self.claim(n, like)
        view = self.buffers[index][offset:offset + n]
        if place is not None:
            place.generation, place.index, place.offset, place.n, place.view = self.generation, index, offset, n, view
        return index, offset, view

    def claim(self, n: int, like: Tensor, place: Place | None = None) -> tuple[int, int]:
        """``(buffer, offset)`` of ``n`` free elements of ``like``'s dtype and device, for a
        later write (:meth:`take` without the view)."""
        if place is not None and self._again(place, n, like):
            return place.index, place.offset
        key = (like.dtype, like.device)
        index = self.current.get(key)
        if index is None or self.used[index] + n > self.buffers[index].numel():
            grown = 2 * self.buffers[index].numel() if index is not None else 0
            self.reserve(max(n, self.size, grown), like.dtype, like.device)
            index = self.current[key]
        offset = self.used[index]
        self.used[index] = offset + n
        if place is not None:
            place.generation, place.index, place.offset, place.n, place.view = self.generation, index, offset, n, None
        return index, offset

    def _again(self, place: Place, n: int, like: Tensor) -> bool:
        """Take ``place``'s elements again when they are the ``n`` next free ones of a buffer
        of ``like``'s kind: what :meth:`claim` would take, without its lookups."""
        if place.generation != self.generation or place.n != n or self.used[place.index] != place.offset:
            return False
        buffer = self.buffers[place.index]
        if buffer.dtype is not like.dtype or buffer.device != like.device:
            return False
        self.used[place.index] = place.offset + n
        return True

    def reserve(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        """Start a buffer of ``n`` elements that the next takes of its kind fill."""
        self.generation += 1
        shape = (n,)
        buffer = torch.empty(shape, dtype=dtype, device=device) if self.fill is None else torch.full(
            shape, self.fill, dtype=dtype, device=device)
        self.buffers.append(buffer)
        self.used.append(0)
        self.current[(dtype, device)] = len(self.buffers) - 1

    def read(self) -> np.ndarray:
        """The used part of every buffer on the host, end to end (one copy per buffer; on
        the CPU a buffer is read in place): buffer ``i`` starts at ``bases()[i]``."""
        parts = [_numpy(buffer[:used]) for buffer, used in zip(self.buffers, self.used)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, np.float32)

    def bases(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.used)[:-1]]).astype(np.int64) if self.used else np.zeros(0, np.int64)

    def reset(self) -> None:
        """Forget every record, keeping the buffer being filled of each kind (the largest)."""
        self.buffers = [self.buffers[i] for i in self.current.values()]
        self.current = {key: i for i, key in enumerate(self.current)}
        self.used = [0] * len(self.buffers)
        self.generation += 1


class Staging(Arena):
    """The step in progress: an :class:`Arena` that hooks write into from offset 0 at every
    step, so that a call writes to the same place at every step as long as the step's calls
    come in the same order (torch.compile then runs one graph, with no guard that changes
    from step to step). :meth:`move` hands the step over to the flush's arena.

    With ``parts``, :meth:`take` in a compiled graph hands out a new tensor for the place
    instead of a view: a graph that writes into slices of one buffer rewrites the whole
    buffer for every slice (functionalization), where new tensors are plain graph outputs.

    >>> staging, arena = Staging(8), Arena(8)
    >>> staging.take(3, torch.ones(1))[2].fill_(2.0).tolist()
    [2.0, 2.0, 2.0]
    >>> staging.move(arena), arena.read().tolist(), staging.used
    ([(0, 0)], [2.0, 2.0, 2.0], [0])
    """

    def __init__(self, size: int = 1 << 16, fill: float | None = None, parts: bool = False) -> None:
        super().__init__(size, fill)
        self.with_parts = parts
        self.parts: dict[int, list[tuple[int, Tensor]]] = {}  # buffer -> (offset, tensor) handed out compiled

    def take(self, n: int, like: Tensor, compiling: bool | None = None,
             place: Place | None = None) -> tuple[int, int, Tensor]:
        """:meth:`Arena.take`; ``compiling`` says whether a graph is being compiled (None: ask
        torch; a hook that knows it already spares the question). A graph takes no ``place``
        again: it would read the offsets."""
        if torch.compiler.is_compiling() if compiling is None else compiling:
            index, offset, view = super().take(n, like)
            if self.with_parts:
                view = torch.empty_like(view)
                self.parts.setdefault(index, []).append((offset, view))
            return index, offset, view
        return super().take(n, like, place)

    def move(self, arena: Arena) -> list[tuple[int, int]]:
        """Copy the step's records into ``arena``, one copy per buffer, and start the next
        step; return where each buffer's records went, ``(arena buffer, offset)``. A kind
        that needed several buffers gets one as large as the step needed."""
        places, need = [], {}
        for index, (buffer, used) in enumerate(zip(self.buffers, self.used)):
            key = (buffer.dtype, buffer.device)
            need[key] = need.get(key, 0) + used
            if not used:
                places.append((-1, 0))  # nothing of the step in it
                continue
            at_buffer, at, view = arena.take(used, buffer)
            places.append((at_buffer, at))
            parts = self.parts.get(index, [])
            if sum(part.numel() for _, part in parts) == used:  # a compiled step: all of it in parts
                torch.cat([part for _, part in parts], out=view)
                continue
            view.copy_(buffer[:used])
            for offset, part in parts:
                view[offset:offset + part.numel()].copy_(part)
            if self.fill is not None:
                buffer[:used].fill_(self.fill)
        self.parts = {}
        if len(self.buffers) > len(self.current):
            self.buffers, self.used, self.current = [], [], {}
            for (dtype, device), n in need.items():  # reserve() starts a new generation
                self.reserve(max(n, self.size), dtype, device)
        else:
            self.used = [0] * len(self.buffers)
        return places


def _numpy(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


class Slots:
    """Device tensors (and numbers) kept for a later single transfer; :meth:`put` returns a handle."""

    def __init__(self) -> None:
        self.tensors: list[Tensor | float] = []
        self.host: list[np.ndarray] = []

    def put(self, t: Tensor | float) -> int:
        """Keep ``t``: a tensor that does not require a gradient and is not changed in place
        until the flush (a result of the step's own computation), or a number; on the host
        it becomes a flat float64 array. Nothing but an append: a detach and a view cost
        more than the rest of a put, and most puts are flat already."""
        self.tensors.append(t)
        return len(self.tensors) - 1

    def get(self, handle: int) -> np.ndarray:
        return self.host[handle]


def host(tensors: list[Tensor]) -> np.ndarray:
    """``torch.cat`` of 1-D ``tensors`` as one numpy array on the host: one copy from the
    device, whatever their number (tensors on several devices are moved first). Dtypes
    are promoted as by ``torch.cat``; bfloat16 and float16 become float32."""
    if not tensors:
        return np.empty(0, dtype=np.float32)
    try:
        joined = torch.cat(tensors)
    except RuntimeError:  # tensors on several devices
        joined = torch.cat([t.cpu() for t in tensors])
    return _numpy(joined)


def fetch(groups: list[Slots]) -> None:
    """Copy the tensors of every ``Slots`` to the host in one transfer, as float64."""
    tensors = [t if t.dim() == 1 else t.reshape(-1) for slots in groups for t in slots.tensors
               if isinstance(t, Tensor)]
    values = host(tensors).astype(np.float64)
    starts = np.cumsum([0] + [t.numel() for t in tensors]).tolist()
    done = 0  # tensors placed so far
    for slots in groups:
        placed = []
        for t in slots.tensors:
            if isinstance(t, Tensor):
                placed.append(values[starts[done]:starts[done + 1]])
                done += 1
            else:
                placed.append(np.array([t], dtype=np.float64))
        slots.host, slots.tensors = placed, []


@dataclass
class StepRecord:
    """Everything one step recorded, until it is flushed. Per forward call ``(layer index,
    output size, sample buffer, sample offset, sample length, moments buffer, moments
    offset)`` into the :class:`Arena`, where the sample and ``[sample sum, S1, S2, min,
    max]`` (:func:`covshift.stats.moments`, shifted by the sample's mean) were written
    (moments buffer -1: the sample is the whole output, and ``whole`` has its moments);
    per output that requires a gradient ``(layer index, size, buffer, offset)`` of its
    gradient's sum of squares, :data:`UNSET` while no gradient came. Buffers and offsets
    are the :class:`Staging`'s, ``places`` and ``grad_places`` say where they went."""

    step: int
    detail: bool = False  # a detail step: per-unit statistics and histograms
    calls: list[tuple[int, int, int, int, int, int, int]] = field(default_factory=list)
    places: list[tuple[int, int]] = field(default_factory=list)  # Staging.move: buffer -> (arena buffer, offset)
    grad_places: list[tuple[int, int]] = field(default_factory=list)  # the same for the gradients' buffers
    inputs: dict[int, tuple[int, int]] = field(default_factory=dict)  # call -> input sample (GELU, SiLU)
    whole: list[tuple[list[int], int]] = field(default_factory=list)  # (calls, slot of their moments rows)
    derived: list[tuple[list[int], int]] = field(default_factory=list)  # (calls, slot of their saturation and gain)
    maxima: dict[int, Tensor] = field(default_factory=dict)  # call -> per-unit maxima (ReLU family)
    units: dict[int, Tensor] = field(default_factory=dict)  # call -> unit sums (3 × units), detail steps
    grads: list[tuple[int, int, int, int]] = field(default_factory=list)
    slots: Slots = field(default_factory=Slots)
    loss: int | None = None
    lrs: list[tuple[int, int]] = field(default_factory=list)  # (param group, lr) at optimizer.step()
    grad_params: list[int] = field(default_factory=list)  # indices of params that had a grad
    grad_norms: int | None = None
    tracked: list[tuple[str, str, int]] = field(default_factory=list)  # (layer, attr, param index)
    weight_norms: int | None = None
    update_norms: int | None = None
    prev_norms: int | None = None


@dataclass
class Calls:
    """The forward calls and output gradients of a flush's records, on the host. Per call
    ``i``: ``step[i]``, ``layer[i]``, ``size[i]``, ``moments[i]`` (float64) and the sample
    ``samples[start[i]:start[i] + length[i]]`` in the samples' dtype; ``inputs``,
    ``maxima`` and ``units`` by call; ``derived``, the saturation and gain the step took of
    an output kept whole. Merged from ``ranks`` processes, a step has each process's calls
    of a layer."""

    step: np.ndarray
    layer: np.ndarray
    size: np.ndarray
    moments: np.ndarray
    samples: np.ndarray
    start: np.ndarray
    length: np.ndarray
    inputs: dict[int, np.ndarray]
    maxima: dict[int, np.ndarray]
    units: dict[int, np.ndarray]
    grad_step: np.ndarray
    grad_layer: np.ndarray
    grad_size: np.ndarray
    grad_sumsq: np.ndarray
    ranks: int = 1  # processes whose calls these are (covshift.distributed.merge)
    derived: np.ndarray | None = None  # (calls, 2): saturation and gain taken at the step, NaN where not

    def __post_init__(self) -> None:
        if self.derived is None:
            self.derived = np.full((len(self.step), 2), np.nan)

    def sample(self, call: int) -> np.ndarray:
        return self.samples[self.start[call]:self.start[call] + self.length[call]]


def _by_call(records: list[StepRecord], offsets: list[int], attr: str) -> dict[int, np.ndarray]:
    """One of the per-call tensor dicts of ``records`` keyed by the call's index in the flush."""
    keys, tensors = [], []
    for rec, offset in zip(records, offsets):
        for call, t in getattr(rec, attr).items():
            keys.append(offset + call)
            tensors.append(t.reshape(-1))
    values = host(tensors)
    ends = np.cumsum([t.numel() for t in tensors]).tolist()
    return {key: values[start:end] for key, start, end in zip(keys, [0, *ends], ends)}


#: The sum of squares of an output's gradient until the gradient comes (a true one is >= 0 or NaN).
UNSET = -1.0


class _Origins:
    """Where the staging buffers of each record start among the values of :meth:`Arena.read`."""

    def __init__(self, records: list[StepRecord], bases: np.ndarray, attr: str) -> None:
        places = [getattr(r, attr) for r in records]
        self.origins = np.array([bases[b] + at if b >= 0 else 0 for p in places for b, at in p], dtype=np.int64)
        self.first = np.cumsum([0] + [len(p) for p in places])[:-1].astype(np.int64)

    def __call__(self, record: np.ndarray, buffer: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """Positions of ``offset`` in staging ``buffer`` of record ``record`` (arrays alike)."""
        return self.origins[self.first[record] + buffer] + offset


def _table(rows: Sequence[Sequence[tuple[int, ...]]], width: int) -> np.ndarray:
    """The rows of every record, end to end, as one int64 array of ``width`` columns. A
    record whose rows equal the previous record's (a training loop calls the same layers in
    the same order at every step) reuses its array: comparing tuples costs a fraction of
    converting them.

    >>> _table([[(1, 2)], [(1, 2)], [(3, 4)]], 2).tolist()
    [[1, 2], [1, 2], [3, 4]]
    """
    blocks: list[np.ndarray] = []
    last: Sequence[tuple[int, ...]] | None = None
    block = np.empty((0, width), dtype=np.int64)
    for these in rows:
        if these != last:
            last, block = these, np.array(these, dtype=np.int64).reshape(-1, width)
        blocks.append(block)
    return np.concatenate(blocks) if blocks else np.empty((0, width), dtype=np.int64)


def _rows_of(records: list[StepRecord], offsets: list[int], attr: str) -> tuple[np.ndarray, np.ndarray]:
    """The calls (indices in the flush) and the host values of the ``(calls, handle)``
    pairs in ``attr`` (``whole`` or ``derived``) of every record, end to end."""
    rows, values = [], []
    arrays: dict[int, np.ndarray] = {}  # a plan's list of calls, the same object at every step
    for rec, offset in zip(records, offsets):
        for members, handle in getattr(rec, attr):
            key = id(members)
            if key not in arrays:
                arrays[key] = np.asarray(members, dtype=np.int64)
            rows.append(arrays[key] + offset)
            values.append(rec.slots.get(handle))
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(rows), np.concatenate(values)


def gather(records: list[StepRecord], arena: Arena) -> Calls:
    """Every call and gradient of ``records`` on the host, in one copy per arena buffer."""
    values, bases = arena.read(), arena.bases()
    counts = [len(r.calls) for r in records]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
    steps = [r.step for r in records]
    calls = _table([r.calls for r in records], 7)
    owner = np.repeat(np.arange(len(records)), counts)
    at = _Origins(records, bases, "places")
    start = at(owner, calls[:, 2], calls[:, 3])
    kept = calls[:, 5] >= 0  # the others were sampled whole, their moments are in ``whole``
    moments = np.empty((len(calls), 5))
    moments[kept] = values[at(owner[kept], calls[kept, 5], calls[kept, 6])[:, None] + np.arange(5)]
    derived = np.full((len(calls), 2), np.nan)
    for attr, table in (("whole", moments), ("derived", derived)):
        rows, found = _rows_of(records, offsets, attr)
        table[rows] = found.reshape(-1, table.shape[1])
    sampled = np.array([(offset + call, i, b, off) for i, (rec, offset) in enumerate(zip(records, offsets))
                        for call, (b, off) in rec.inputs.items()], dtype=np.int64).reshape(-1, 4)
    inputs = {int(call): values[begin:begin + calls[call, 4]]
              for call, begin in zip(sampled[:, 0], at(sampled[:, 1], sampled[:, 2], sampled[:, 3]))}
    grads = _table([r.grads for r in records], 4)
    grad_step = np.repeat(steps, [len(r.grads) for r in records]).astype(np.int64)
    grad_owner = np.repeat(np.arange(len(records)), [len(r.grads) for r in records])
    sumsq = values[_Origins(records, bases, "grad_places")(grad_owner, grads[:, 2], grads[:, 3])].astype(np.float64)
    came = ~(sumsq < 0)  # UNSET: no gradient reached the output
    return Calls(
        step=np.repeat(steps, counts).astype(np.int64), layer=calls[:, 0], size=calls[:, 1],
        moments=moments, samples=values, start=start, length=calls[:, 4], inputs=inputs,
        maxima=_by_call(records, offsets, "maxima"), units=_by_call(records, offsets, "units"),
        grad_step=grad_step[came], grad_layer=grads[came, 0], grad_size=grads[came, 1].astype(np.float64),
        grad_sumsq=sumsq[came], derived=derived,
    )


def pool(sizes: list[int], samples: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One sample standing for all of a step's calls, each weighted by its size: every call
    keeps the share of its sample that the most thinly sampled call has of its output. The
    values are shuffled, so that a prefix is a random sample of all calls too."""
    if len(samples) == 1:
        return samples[0]
    rate = min(len(s) / n for n, s in zip(sizes, samples))
    parts = []
    for n, s in zip(sizes, samples):
        keep = min(len(s), max(1, round(rate * n)))
        parts.append(s if keep == len(s) else rng.choice(s, keep, replace=False))
    return rng.permutation(np.concatenate(parts))
