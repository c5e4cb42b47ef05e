"""A flush's finished metrics as columns: ``(steps, values)`` per (layer, metric).

The records of a flush (:mod:`covshift.records`, fetched and summarised) are turned into
metrics layer by layer with numpy over all their steps at once; only a module called
several times in a step is merged call by call (exactly, Chan et al.'s pairwise update).
A value that cannot be computed (the update ratio of a zero weight) has no entry.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from . import stats
from .records import LayerStep, Slots, StepRecord, unit_parts

Columns = dict[tuple[str, str], tuple[list[np.ndarray], list[np.ndarray]]]


def _add(out: Columns, layer: str, metric: str, steps: np.ndarray, values: np.ndarray) -> None:
    if len(steps):
        parts = out.setdefault((layer, metric), ([], []))
        parts[0].append(np.asarray(steps, dtype=np.int64))
        parts[1].append(np.asarray(values, dtype=np.float64))


def columns(records: list[StepRecord]) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """Every metric of ``records`` (fetched and summarised) as ``(steps, values)`` arrays."""
    out: Columns = {}
    by_layer: dict[str, list[tuple[int, LayerStep, Slots]]] = defaultdict(list)
    for rec in records:
        for name, ls in rec.layers.items():
            by_layer[name].append((rec.step, ls, rec.slots))
    for name, entries in by_layer.items():
        _layer_columns(out, name, entries)
    _param_columns(out, records)
    losses = [r for r in records if r.loss is not None]
    _add(out, "", "loss", [r.step for r in losses], [r.slots.get(r.loss)[0] for r in losses])
    lrs: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for rec in records:
        for group, handle in rec.lrs:
            lrs[group].append((rec.step, rec.slots.get(handle)[0]))
    for group, pairs in lrs.items():
        _add(out, "", "lr" if group == 0 else f"lr.{group}", [s for s, _ in pairs], [v for _, v in pairs])
    return {key: (np.concatenate(s), np.concatenate(v)) for key, (s, v) in out.items()}


def _moments(entries: list[tuple[int, LayerStep, Slots]]) -> tuple[np.ndarray, ...]:
    """``(total, mean, var, lo, hi)`` per entry, every call of a step merged exactly."""
    if all(len(ls.moments) == 1 for _, ls, _ in entries):
        n = np.array([ls.moments[0][0] for _, ls, _ in entries], dtype=np.float64)
        c, s1, s2, lo, hi = np.stack([slots.get(ls.moments[0][1]) for _, ls, slots in entries]).T
        return n, c + s1 / n, np.maximum(s2 - s1 * s1 / n, 0.0) / n, lo, hi
    rows = []
    for _, ls, slots in entries:
        merged, lows, highs = (0, 0.0, 0.0), [], []
        for n, handle in ls.moments:
            c, s1, s2, lo, hi = slots.get(handle)
            merged = stats.merge_moments(merged, (n, *stats.finish_moments(n, c, s1, s2)))
            lows.append(lo)
            highs.append(hi)
        total, mean, m2 = merged
        rows.append((total, mean, m2 / total, min(lows), max(highs)))
    return tuple(np.array(col, dtype=np.float64) for col in zip(*rows))


def _layer_columns(out: Columns, name: str, entries: list[tuple[int, LayerStep, Slots]]) -> None:
    moments = [e for e in entries if e[1].moments]
    if moments:
        steps = np.array([s for s, _, _ in moments], dtype=np.int64)
        total, mean, var, lo, hi = _moments(moments)
        p15, p50, p85, sat, gain, bad = np.stack([ls.summary for _, ls, _ in moments]).T
        for metric, values in (("mean", mean), ("var", var), ("std", np.sqrt(var)), ("min", lo), ("max", hi),
                               ("p15", p15), ("p50", p50), ("p85", p85)):
            _add(out, name, metric, steps, values)
        derivative = np.array([ls.derivative for _, ls, _ in moments])
        _add(out, name, "saturation", steps[derivative], sat[derivative])
        _add(out, name, "gain", steps[derivative], gain[derivative])
        dead = [(s, float(np.sum(np.maximum.reduce(m) <= 0))) for s, ls, slots in moments
                if (m := [slots.get(h) for h in ls.maxima]) and len({x.shape for x in m}) == 1]
        _add(out, name, "dead", [s for s, _ in dead], [d for _, d in dead])
        # exact when every call was sampled whole; zero exactly when min and max are finite
        finite = np.isfinite(lo) & np.isfinite(hi)
        _add(out, name, "nonfinite", steps, np.where(finite, 0.0, np.maximum(np.round(bad * total), 1.0)))
        _add(out, name, "calls", steps, [ls.calls for _, ls, _ in moments])
    detail = [(s, sum(ls.unit_counts)) for s, ls, slots in entries if unit_parts(ls, slots)]
    _add(out, name, "unit_count", [s for s, _ in detail], [n for _, n in detail])
    grads = [(s, sum(n for n, _ in ls.grads), sum(float(slots.get(h)[0]) for _, h in ls.grads))
             for s, ls, slots in entries if ls.grads]
    if grads:
        steps, count, sumsq = (np.array(col, dtype=np.float64) for col in zip(*grads))
        _add(out, name, "grad_norm", steps, np.sqrt(sumsq))
        _add(out, name, "grad_rms", steps, np.sqrt(sumsq / count))


def _param_columns(out: Columns, records: list[StepRecord]) -> None:
    """Per-parameter norms, gradient norms and update ratios, and the global gradient norm."""
    global_norm = [(rec.step, np.sqrt(np.sum(rec.slots.get(rec.grad_norms) ** 2)))
                   for rec in records if rec.grad_norms is not None and len(rec.grad_params)]
    _add(out, "", "grad_norm", [s for s, _ in global_norm], [v for _, v in global_norm])
    groups: dict[int, list[StepRecord]] = defaultdict(list)
    for rec in records:
        if rec.weight_norms is not None:
            groups[len(rec.slots.get(rec.weight_norms))].append(rec)
    for count, group in groups.items():
        tracked = group[0].tracked[:count]
        index = np.array([p for _, _, p in tracked], dtype=np.int64)
        steps = np.array([rec.step for rec in group], dtype=np.int64)
        norms = np.stack([rec.slots.get(rec.weight_norms) for rec in group])
        grads, has_grad = zip(*(_grads_of(rec, index) for rec in group))
        ratios, has_ratio = zip(*(_ratios(rec, count) for rec in group))
        columns_of = {"grad_norm": (np.stack(grads), np.stack(has_grad)), "norm": (norms, np.ones_like(norms, bool)),
                      "update_ratio": (np.stack(ratios), np.stack(has_ratio))}
        for j, (layer, attr, _) in enumerate(tracked):
            for metric, (values, have) in columns_of.items():
                _add(out, layer, f"{attr}.{metric}", steps[have[:, j]], values[have[:, j], j])


def _grads_of(rec: StepRecord, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The gradient norms of the parameters ``index``, and which of them had a gradient."""
    size = max(int(index.max(initial=-1)), max(rec.grad_params, default=-1)) + 1
    values, have = np.zeros(size), np.zeros(size, dtype=bool)
    if rec.grad_norms is not None and len(rec.grad_params):
        values[rec.grad_params] = rec.slots.get(rec.grad_norms)
        have[rec.grad_params] = True
    return values[index], have[index]


def _ratios(rec: StepRecord, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``|update| / |weight before|`` per tracked parameter, and where it is defined (the
    weight before was not zero)."""
    if rec.update_norms is None or rec.prev_norms is None:
        return np.zeros(count), np.zeros(count, dtype=bool)
    prev = rec.slots.get(rec.prev_norms)
    have = prev > 0
    return np.divide(rec.slots.get(rec.update_norms), prev, out=np.zeros(count), where=have), have
