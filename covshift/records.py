"""A step's raw device records, and their reduction to metric rows on the host.

Hooks leave small device tensors (shifted sums, a subsample, per-unit maxima, gradient
sums of squares). :class:`StepRecord` holds them for one step without reading them;
:func:`fetch` moves every pending record to the host in one transfer per dtype, and
:func:`covshift.columns.columns` turns a flush's records into finished metrics in float64.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from . import stats


class Slots:
    """Device tensors kept for a later single transfer; :meth:`put` returns a handle."""

    def __init__(self) -> None:
        self.tensors: list[Tensor] = []
        self.host: list[np.ndarray] = []
        self.raw: set[int] = set()

    def put(self, t: Tensor, raw: bool = False) -> int:
        """Keep ``t``; on the host it becomes float64, or stays in its dtype when ``raw``
        (samples, which are only ordered and thresholded)."""
        self.tensors.append(t.detach().reshape(-1))
        if raw:
            self.raw.add(len(self.tensors) - 1)
        return len(self.tensors) - 1

    def get(self, handle: int) -> np.ndarray:
        return self.host[handle]


def fetch(groups: list[Slots]) -> None:
    """Copy the tensors of every ``Slots`` to the host: one ``cat`` and one copy per
    (device, dtype), so a flush costs one synchronisation however many steps it holds."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[tuple[Slots, int]]] = defaultdict(list)
    for slots in groups:
        slots.host = [np.empty(0)] * len(slots.tensors)
        for i, t in enumerate(slots.tensors):
            by_kind[(t.device, t.dtype)].append((slots, i))
    for members in by_kind.values():
        parts = [s.tensors[i] for s, i in members]
        flat = torch.cat(parts).cpu()
        if flat.dtype == torch.bfloat16:  # numpy has no bfloat16
            flat = flat.float()
        values = flat.numpy()
        wide = values.astype(np.float64)  # one conversion; every slot is a view into it or ``values``
        ends = np.cumsum([part.numel() for part in parts]).tolist()
        for (slots, i), start, end in zip(members, [0, *ends], ends):
            slots.host[i] = (values if i in slots.raw else wide)[start:end]
    for slots in groups:
        slots.tensors = []


@dataclass
class LayerStep:
    """What one layer left during one step; ints are host values, others are handles."""

    moments: list[tuple[int, int]] = field(default_factory=list)  # (numel, moments) of each call
    samples: list[int] = field(default_factory=list)  # the subsample of each call
    inputs: list[int] = field(default_factory=list)  # the input subsample of each call (GELU, SiLU)
    calls: int = 0  # calls recorded in the step
    maxima: list[int] = field(default_factory=list)  # per-unit maxima of each call (ReLU family)
    pooled: np.ndarray | None = None  # the calls' samples pooled, set by summarize
    summary: np.ndarray | None = None  # sample_stats of ``pooled``, set by summarize
    derivative: bool = False  # whether ``summary`` has saturation and gain, set by summarize
    grads: list[tuple[int, int]] = field(default_factory=list)  # (numel, sum of squares)
    units: list[int] = field(default_factory=list)  # unit_sums, one per call
    unit_counts: list[int] = field(default_factory=list)  # elements per unit, one per call


@dataclass
class StepRecord:
    """Everything one step recorded, until it is flushed."""

    step: int
    detail: bool = False  # a detail step: per-unit statistics and histograms
    slots: Slots = field(default_factory=Slots)
    layers: dict[str, LayerStep] = field(default_factory=dict)
    loss: int | None = None
    lrs: list[tuple[int, int]] = field(default_factory=list)  # (param group, lr) at optimizer.step()
    grad_params: list[int] = field(default_factory=list)  # indices of params that had a grad
    grad_norms: int | None = None
    tracked: list[tuple[str, str, int]] = field(default_factory=list)  # (layer, attr, param index)
    weight_norms: int | None = None
    update_norms: int | None = None
    prev_norms: int | None = None

    def entry(self, layer: str) -> LayerStep:
        """The layer's record of this step, created on first use."""
        found = self.layers.get(layer)
        if found is None:
            found = self.layers[layer] = LayerStep()
        return found

    def unit_rows(self) -> list[tuple[str, int, float, float]]:
        """``(layer, unit, mean, var)`` rows for a detail step. A module whose calls differ
        in their number of units gets none."""
        out = []
        for name, ls in self.layers.items():
            parts = unit_parts(ls, self.slots)
            if not parts:
                continue
            merged = (0, 0.0, 0.0)
            for count, (c, s1, s2) in zip(ls.unit_counts, parts):
                merged = stats.merge_moments(merged, (count, c + s1 / count, np.maximum(s2 - s1 * s1 / count, 0.0)))
            n, mean, m2 = merged
            out += [(name, u, float(mu), float(v)) for u, (mu, v) in enumerate(zip(mean, m2 / n))]
        return out


    def hist_rows(self, edges: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
        """``(layer, counts)`` of the pooled samples at a detail step, with under- and
        overflow counts at the ends."""
        if not self.detail:
            return []
        return [(n, stats.histogram(ls.pooled, edges[n])) for n, ls in self.layers.items() if ls.pooled is not None]

    def value_range(self, name: str) -> tuple[float, float] | None:
        """``(min, max)`` of a layer's outputs in this step, or None when it made none."""
        ls = self.layers.get(name)
        if ls is None or not ls.moments:
            return None
        values = np.stack([self.slots.get(h) for _, h in ls.moments])
        return float(values[:, 3].min()), float(values[:, 4].max())


def pool(sizes: list[int], samples: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One sample standing for all of a step's calls, each weighted by its size: every call
    keeps the share of its sample that the most thinly sampled call has of its output."""
    if len(samples) == 1:
        return samples[0]
    rate = min(len(s) / n for n, s in zip(sizes, samples))
    parts = []
    for n, s in zip(sizes, samples):
        keep = min(len(s), max(1, round(rate * n)))
        parts.append(s if keep == len(s) else rng.choice(s, keep, replace=False))
    return np.concatenate(parts)


def summarize(records: list[StepRecord], kinds: dict[str, stats.Nonlinearity | None]) -> None:
    """Pool and summarise the samples of every fetched record, batching the steps of a
    layer whose pooled samples have the same length into one array."""
    rng = np.random.default_rng(0)
    groups: dict[tuple[str, int, bool], list[tuple[LayerStep, np.ndarray | None]]] = defaultdict(list)
    for rec in records:
        for name, ls in rec.layers.items():
            if ls.samples:
                sizes = [n for n, _ in ls.moments]
                ls.pooled = pool(sizes, [rec.slots.get(h) for h in ls.samples], rng)
                inputs = None
                if len(ls.inputs) == len(ls.samples):  # every call's input was sampled
                    inputs = pool(sizes, [rec.slots.get(h) for h in ls.inputs], rng)
                groups[(name, len(ls.pooled), inputs is not None)].append((ls, inputs))
    for (name, _, has_inputs), members in groups.items():
        kind = kinds[name]
        inputs = np.stack([x for _, x in members]) if has_inputs else None
        summaries = stats.sample_stats(np.stack([ls.pooled for ls, _ in members]), kind, inputs)
        for (ls, _), summary in zip(members, summaries):
            ls.summary = summary
            ls.derivative = kind is not None and (has_inputs or not kind.of_input)


def unit_parts(ls: LayerStep, slots: Slots) -> list[np.ndarray]:
    """The per-call unit sums (3 × units each) of a fetched layer, or none when there are
    none or the calls differ in their number of units."""
    parts = [slots.get(h).reshape(3, -1) for h in ls.units]
    return parts if len({p.shape for p in parts}) == 1 else []
