"""Statistics of the global batch when training runs in several processes (DDP, FSDP2).

Every rank hooks its own replica and records the statistics of its shard of the batch.
At each flush the ranks send what they recorded to rank 0 in one collective
(:meth:`Ranks.gather`, over a gloo group of covshift's own with a timeout), and rank 0
merges it exactly into the statistics of the global batch before it writes the file:

- moments, minima and maxima, per-unit sums and maxima: each rank's calls become calls
  of one step, which :mod:`covshift.columns` merges exactly as it merges the calls of a
  module called twice;
- samples: each rank sends a random part of its sample (``sample_size / world`` values),
  so the merged sample keeps the size of one process's;
- output gradients: DDP and FSDP2 average the ranks' gradients, so the gradient of the
  loss they optimise with respect to a rank's outputs is that rank's gradient divided by
  the world size; the sums of squares are scaled by ``1 / world**2`` and summed;
- loss: the mean of the ranks' losses (the loss DDP optimises);
- parameters: after the gradient all-reduce every replica holds the same parameters and
  gradients, so rank 0's are the global ones; a sharded parameter (an FSDP2 ``DTensor``)
  contributes each rank's local shard, and the squared norms are summed.

A rank that stops with an exception does not take part in another collective, and a
collective that fails or times out (a rank died) stops the distributed recording with a
warning: the steps since the last flush are not written; training is not interrupted.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import stats
from .records import Calls, StepRecord

#: Seconds a rank waits at a flush for the others before it gives distributed recording up.
DEFAULT_TIMEOUT = 300.0


def unwrap(model: nn.Module) -> nn.Module:
    """The model a training wrapper holds: ``torch.compile``'s (``_orig_mod``) and
    ``DistributedDataParallel``'s (``module``), so layer names carry neither prefix."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def local(t: Tensor) -> Tensor:
    """A ``DTensor``'s local shard (no communication); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def replicas(p: Tensor) -> int:
    """How many ranks hold each element of ``p`` in their local shard: 1 for a ``DTensor``
    sharded on every dimension of its mesh, the mesh's size for a replicated one, 0 for a
    plain tensor (the same whole tensor on every rank)."""
    mesh, placements = getattr(p, "device_mesh", None), getattr(p, "placements", None)
    if mesh is None or placements is None:
        return 0
    return math.prod(mesh.size(i) for i, place in enumerate(placements) if not place.is_shard())


@dataclass
class Share:
    """What one rank sends at a flush: its calls (samples cut to its part), the names of
    its layers by index, its loss by step and, for sharded parameters, its local norms by
    step (``grad``, ``weight``, ``update``, ``prev``)."""

    calls: Calls
    names: list[str]
    losses: dict[int, float] = field(default_factory=dict)
    norms: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass
class Ranks:
    """This process's place in the process group, and covshift's gloo group for the flushes.

    >>> ranks = Ranks.detect()  # doctest: +SKIP
    >>> ranks.rank, ranks.world  # doctest: +SKIP
    (0, 2)
    """

    rank: int
    world: int
    group: Any
    failed: str | None = None

    @classmethod
    def detect(cls, timeout: float = DEFAULT_TIMEOUT) -> Ranks | None:
        """The ranks of the initialised default process group, or None when there is none
        or it has one process. Collective: every rank must call it (the Tracer's start)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        return cls(dist.get_rank(), dist.get_world_size(), group)

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def agree(self, error: str | None) -> str | None:
        """Rank 0's ``error`` on every rank (rank 0 opens the file; the others learn whether
        it could)."""
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, share: Share) -> list[Share] | None:
        """Every rank's share on rank 0 (None elsewhere, and None everywhere once a
        collective has failed). The samples, nearly all of the bytes, travel as one tensor
        (pickling them, as ``gather_object`` does, takes 3-4 times as long); the rest as
        objects."""
        import torch.distributed as dist

        if self.failed is not None:
            return None
        samples = torch.from_numpy(share.calls.samples)
        shares: list[Share] | None = [share] * self.world if self.writes else None
        try:
            longest = torch.tensor([len(samples)])
            dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=self.group)
            if len(samples) < int(longest):
                samples = torch.cat([samples, samples.new_zeros(int(longest) - len(samples))])
            parts = [torch.empty_like(samples) for _ in range(self.world)] if self.writes else None
            dist.gather(samples, parts, dst=0, group=self.group)
            rest = replace(share, calls=replace(share.calls, samples=share.calls.samples[:0]))
            dist.gather_object(rest, shares, dst=0, group=self.group)
        except Exception as error:  # a rank died or timed out: recording stops, training does not
            self.failed = f"{type(error).__name__}: {error}".splitlines()[0]
            warnings.warn(f"covshift: rank {self.rank} could not gather the other ranks' statistics "
                          f"({self.failed}); distributed recording stops here", RuntimeWarning, stacklevel=3)
            return None
        if shares is None or parts is None:
            return None
        for one, part in zip(shares, parts):
            one.calls.samples = part.numpy()
        return shares

    def close(self) -> None:
        """Release covshift's process group."""
        import torch.distributed as dist

        if self.failed is None and dist.is_initialized():
            dist.destroy_process_group(self.group)
        # let the group go now, not with the Tracer: a gloo group freed during the
        # interpreter's exit aborts the process ("terminate called without an active exception")
        self.group = None

    def part(self, calls: Calls, sample_size: int, whole: np.ndarray, detail: set[int]) -> Calls:
        """``calls`` with each sample (and input sample) cut to a uniform random part of it,
        its first values (:func:`covshift.stats.sample_indices`): ``sample_size // world``
        values where the whole sample is summarised (layers whose nonlinearity is a function
        of the output, ``whole[layer]``; calls with an input sample; ``detail`` steps; outputs
        with non-finite values), elsewhere the ``PERCENTILE_VALUES // world`` values the
        percentiles use."""
        most = np.minimum(calls.length, max(1, sample_size // self.world))
        needed = whole[calls.layer] | np.isin(calls.step, list(detail)) | ~np.isfinite(calls.moments[:, 3:]).all(axis=1)
        needed[list(calls.inputs)] = True
        keep = np.where(needed, most, np.minimum(most, -(-stats.PERCENTILE_VALUES // self.world)))
        if np.array_equal(keep, calls.length):
            return calls
        inputs = {c: x[:keep[c]] for c, x in calls.inputs.items()}
        samples = np.empty(int(keep.sum()), dtype=calls.samples.dtype)
        start = np.empty(len(keep), dtype=np.int64)
        done = 0
        for length in np.unique(keep).tolist():  # the calls cut to one length: rows copied in one go
            rows = np.flatnonzero(keep == length)
            windows = np.lib.stride_tricks.sliding_window_view(calls.samples, length)
            samples[done:done + len(rows) * length].reshape(len(rows), length)[:] = windows[calls.start[rows]]
            start[rows] = done + length * np.arange(len(rows))
            done += len(rows) * length
        moments = calls.moments.copy()
        moments[:, 0] *= keep / calls.length  # the sample's sum over its length is the shift: kept
        return replace(calls, moments=moments, samples=samples, start=start, length=keep, inputs=inputs)


def merge(shares: list[Share], names: list[str]) -> Calls:
    """The calls of every rank as the calls of one process, layers indexed as in ``names``
    (each rank's call a call of its step; gradient sums of squares over the world size
    squared, see the module's docstring)."""
    world = len(shares)
    parts = [_renamed(s.calls, s.names, names) for s in shares]
    counts = [len(c.step) for c in parts]
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
    bases = np.concatenate([[0], np.cumsum([len(c.samples) for c in parts])[:-1]]).astype(np.int64)

    def joined(attr: str) -> np.ndarray:
        return np.concatenate([getattr(c, attr) for c in parts])

    def keyed(attr: str) -> dict[int, np.ndarray]:
        return {first + key: value for c, first in zip(parts, firsts) for key, value in getattr(c, attr).items()}

    return Calls(step=joined("step"), layer=joined("layer"), size=joined("size"),
                 moments=np.concatenate([c.moments for c in parts]).reshape(-1, 5),
                 samples=np.concatenate([c.samples for c in parts]),
                 start=np.concatenate([c.start + base for c, base in zip(parts, bases)]), length=joined("length"),
                 inputs=keyed("inputs"), maxima=keyed("maxima"), units=keyed("units"),
                 grad_step=joined("grad_step"), grad_layer=joined("grad_layer"), grad_size=joined("grad_size"),
                 grad_sumsq=joined("grad_sumsq") / world ** 2, ranks=world)


def _renamed(calls: Calls, own: list[str], names: list[str]) -> Calls:
    """``calls`` with layer indices into ``own`` turned into indices into ``names``."""
    if own == names[:len(own)]:
        return calls
    where = {name: i for i, name in enumerate(names)}
    missing = [name for name in own if name not in where]
    if missing:
        raise ValueError(f"ranks hook different layers: {missing[:3]} are not hooked on rank 0")
    index = np.array([where[name] for name in own], dtype=np.int64)
    return replace(calls, layer=index[calls.layer], grad_layer=index[calls.grad_layer])


def combine_norms(parts: list[np.ndarray], copies: np.ndarray) -> np.ndarray:
    """Global 2-norms from every rank's local norms of the same tensors: where ``copies``
    (:func:`replicas`) is 0 the tensors are whole on every rank and rank 0's norm is the
    norm; elsewhere each element is held by ``copies`` ranks, so the squares summed over
    the ranks count it that many times."""
    squares = np.sum(np.square(np.stack(parts)), axis=0)
    return np.where(copies > 0, np.sqrt(squares / np.maximum(copies, 1)), parts[0])


def _norm_slots(rec: StepRecord) -> dict[str, tuple[int | None, list[int]]]:
    """A record's parameter norms by kind: ``(slot, indices of their parameters)``."""
    tracked = [i for _, _, i in rec.tracked]
    return {"grad": (rec.grad_norms, rec.grad_params), "weight": (rec.weight_norms, tracked),
            "update": (rec.update_norms, tracked), "prev": (rec.prev_norms, tracked)}


def share(calls: Calls, names: list[str], records: list[StepRecord], sharded: bool) -> Share:
    """This rank's share of a flush: ``calls`` (cut by :meth:`Ranks.part`), the losses of
    ``records`` and, when some parameters are ``sharded``, their local norms (on the host)."""
    losses = {r.step: float(r.slots.get(r.loss)[0]) for r in records if r.loss is not None}
    norms = {r.step: {key: r.slots.get(h) for key, (h, _) in _norm_slots(r).items() if h is not None}
             for r in records} if sharded else {}
    return Share(calls, names, losses, norms)


def make_global(records: list[StepRecord], shares: list[Share], copies: np.ndarray) -> None:
    """Put the global loss (the ranks' mean) and, for sharded parameters, the global norms
    (:func:`combine_norms`, ``copies`` by parameter) into the host slots of rank 0's ``records``."""
    for rec in records:
        if rec.loss is not None:
            rec.slots.host[rec.loss] = np.array([np.mean([s.losses[rec.step] for s in shares if rec.step in s.losses])])
        if not shares[0].norms:
            continue
        for key, (handle, index) in _norm_slots(rec).items():
            if handle is not None:
                rec.slots.host[handle] = combine_norms([s.norms[rec.step][key] for s in shares], copies[index])
