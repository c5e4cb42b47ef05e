"""A flush's finished metrics as columns: ``(steps, values)`` per (layer, metric).

The calls of a flush (:func:`covshift.records.gather`) are grouped into *entries*, one per
layer and step, with numpy over all of them at once: the calls of a module called several
times in a step are merged exactly (means and squared deviations summed per entry), and
the samples of the entries are summarised in a few stacked arrays. Only entries with
several calls, per-unit statistics and histograms (detail steps) are handled one by one.
A value that cannot be computed (the update ratio of a zero weight) has no entry.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from . import stats
from .records import Calls, StepRecord, pool

Columns = dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]


@dataclass
class Summary:
    """What a flush writes: metric columns, per-unit means and variances (arrays indexed
    by unit, per step and layer) and histogram rows."""

    columns: Columns = field(default_factory=dict)
    units: list[tuple[int, str, np.ndarray, np.ndarray]] = field(default_factory=list)
    hists: list[tuple[int, str, np.ndarray]] = field(default_factory=list)

    def add(self, layer: str, metric: str, steps: np.ndarray, values: np.ndarray) -> None:
        if len(steps):
            self.columns[(layer, metric)] = (np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64))


@dataclass
class Layers:
    """The tracer's layers by index: names, nonlinearities and histogram edges (None
    until a layer's first recorded range fixes them)."""

    names: list[str]
    kinds: list[stats.Nonlinearity | None]
    edges: list[np.ndarray | None]
    bins: int


def summarize(calls: Calls, layers: Layers, detail: set[int]) -> Summary:
    """Every layer metric, per-unit row and histogram of ``calls``; fixes the edges of
    layers recorded for the first time. ``detail``: the detail steps."""
    out = Summary()
    if len(calls.step):
        _layer_metrics(out, calls, layers, detail)
    _grad_metrics(out, calls, layers.names)
    return out


def _entries(layer: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(entry layer, entry step, first item of each entry, entry of each item, items per
    entry)``, entries sorted by layer, then step."""
    low = int(step.min())
    span = int(step.max()) - low + 1
    keys, first, inverse, counts = np.unique(layer * span + (step - low), return_index=True, return_inverse=True,
                                             return_counts=True)
    return keys // span, keys % span + low, first, inverse, counts


def _layer_metrics(out: Summary, calls: Calls, layers: Layers, detail: set[int]) -> None:
    e_layer, e_step, first, inverse, counts = _entries(calls.layer, calls.step)
    count = len(e_layer)
    n = calls.size.astype(np.float64)
    total_of_sample, s1, s2, lo_i, hi_i = calls.moments.T
    # the shift each call used is its sample's mean
    mean_i, m2_i = stats.finish_moments(n, total_of_sample / calls.length, s1, s2)
    total = np.bincount(inverse, n, count)
    mean = np.bincount(inverse, n * mean_i, count) / total
    var = np.bincount(inverse, m2_i + n * (mean_i - mean[inverse]) ** 2, count) / total
    lo, hi = np.full(count, np.inf), np.full(count, -np.inf)
    np.minimum.at(lo, inverse, lo_i)
    np.maximum.at(hi, inverse, hi_i)
    finite = np.isfinite(lo) & np.isfinite(hi)
    entries = _Entries(e_layer, first, inverse, counts, np.isin(e_step, list(detail)))
    summary, derivative, pooled = _sample_summaries(calls, layers, entries, finite)
    special = entries.detail | (np.bincount(inverse, _flags(len(inverse), calls.maxima), count) > 0)
    for rows in np.split(np.arange(count), np.flatnonzero(np.diff(e_layer)) + 1):
        index = int(e_layer[rows[0]])
        name, steps = layers.names[index], e_step[rows]
        if layers.edges[index] is None:
            layers.edges[index] = stats.hist_edges(float(lo[rows[0]]), float(hi[rows[0]]), layers.kinds[index],
                                                   layers.bins)
        p15, p50, p85, sat, gain, bad = summary[rows].T
        for metric, values in (("mean", mean[rows]), ("var", var[rows]), ("std", np.sqrt(var[rows])),
                               ("min", lo[rows]), ("max", hi[rows]), ("p15", p15), ("p50", p50), ("p85", p85),
                               ("calls", counts[rows] / calls.ranks)):
            out.add(name, metric, steps, values)
        have = derivative[rows]
        out.add(name, "saturation", steps[have], sat[have])
        out.add(name, "gain", steps[have], gain[have])
        # exact when every call was sampled whole; zero exactly when min and max are finite
        out.add(name, "nonfinite", steps, np.where(finite[rows], 0.0, np.maximum(np.round(bad * total[rows]), 1.0)))
        _per_call_metrics(out, calls, name, layers.edges[index],
                          [(int(e_step[e]), entries.calls_of(int(e)), pooled.get(int(e))) for e in rows[special[rows]]])


def _flags(size: int, keys: dict[int, np.ndarray]) -> np.ndarray:
    """1.0 at the calls in ``keys``, 0.0 elsewhere."""
    flags = np.zeros(size)
    flags[list(keys)] = 1.0
    return flags


class _Entries:
    """The entries (layer, step) of a flush's calls: ``first`` gives an entry's first call,
    ``multi`` the calls of the entries that have several."""

    def __init__(self, layer: np.ndarray, first: np.ndarray, inverse: np.ndarray, counts: np.ndarray,
                 detail: np.ndarray) -> None:
        self.layer, self.first, self.counts, self.detail = layer, first, counts, detail
        self.multi: dict[int, list[int]] = defaultdict(list)
        for call in np.flatnonzero(counts[inverse] > 1).tolist():
            self.multi[int(inverse[call])].append(call)

    def calls_of(self, entry: int) -> list[int]:
        return self.multi.get(entry) or [int(self.first[entry])]


def _sample_summaries(calls: Calls, layers: Layers, entries: _Entries,
                      finite: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """``stats.SAMPLE_FIELDS`` of every entry's (pooled) sample, whether saturation and gain
    were computed, and the samples of detail entries (for the histograms). Entries are
    summarised together when their samples have the same length and their layers the same
    nonlinearity; only the values a field needs are copied out of the samples: the first
    ``PERCENTILE_VALUES`` for the percentiles, whole samples for a nonlinearity of the
    output (unless the step took its saturation and gain, ``calls.derived``), for the histograms, and for the non-finite fraction where ``finite`` (the
    entry's min and max are finite) does not make it 0."""
    rng = np.random.default_rng(0)
    rows: dict[int, np.ndarray] = {}
    inputs: dict[int, np.ndarray] = {}
    has_inputs = _flags(len(calls.step), calls.inputs)[entries.first] > 0
    length = calls.length[entries.first]
    for e, calls_of in entries.multi.items():  # pool the calls of a module called several times
        sizes = [int(calls.size[c]) for c in calls_of]
        rows[e] = pool(sizes, [calls.sample(c) for c in calls_of], rng)
        length[e] = len(rows[e])
        has_inputs[e] = all(c in calls.inputs for c in calls_of)
        if has_inputs[e]:
            inputs[e] = pool(sizes, [calls.inputs[c] for c in calls_of], rng)
    _, layer_of_kind, kind_of_layer = np.unique([id(k) for k in layers.kinds], return_index=True,
                                                return_inverse=True)
    # saturation and gain taken at the step (an output kept whole, a module called once)
    derived = (entries.counts == 1) & np.isfinite(calls.derived[entries.first]).all(axis=1)
    keys = np.stack([length, kind_of_layer[entries.layer], has_inputs, derived])
    # one integer per key: np.unique along an axis costs ten times as much
    code = ((length * len(layer_of_kind) + keys[1]) * 2 + has_inputs) * 2 + derived
    _, key_at, which = np.unique(code, return_index=True, return_inverse=True)
    summary = np.full((len(length), len(stats.SAMPLE_FIELDS)), np.nan)
    summary[:, 5] = 0.0
    derivative = np.zeros(len(length), dtype=bool)
    for j, key in enumerate(keys[:, key_at].T):
        kind = layers.kinds[int(layer_of_kind[key[1]])]
        of_output = kind is not None and not kind.of_input and not key[3]
        width = int(key[0]) if of_output else min(int(key[0]), stats.PERCENTILE_VALUES)
        # rows of ``width`` values starting anywhere in the samples, as a view: indexing it copies the rows
        windows = np.lib.stride_tricks.sliding_window_view(calls.samples, width)
        for group in _blocks(np.flatnonzero(which == j), width):
            firsts = entries.first[group]
            own = entries.counts[group] == 1  # the others have a pooled sample in ``rows``
            samples = np.empty((len(group), width), dtype=calls.samples.dtype)
            samples[own] = windows[calls.start[firsts[own]]]
            for i in np.flatnonzero(~own).tolist():
                samples[i] = rows[int(group[i])][:width]
            summary[group, :3] = stats.percentiles(samples)
            source = samples if of_output else None
            if kind is not None and kind.of_input and key[2]:
                source = np.stack([inputs[e] if e in inputs else calls.inputs[c] for e, c in zip(group.tolist(), firsts)])
            if key[3]:
                summary[group, 3:5] = calls.derived[firsts]
                derivative[group] = True
            elif source is not None:
                summary[group, 3:5] = stats.derivative_stats(source, kind)
                derivative[group] = True
    pooled: dict[int, np.ndarray] = {}
    for e in np.flatnonzero(entries.detail | ~finite).tolist():
        whole = rows[e] if e in rows else calls.sample(int(entries.first[e]))
        if entries.detail[e]:
            pooled[e] = whole
        if not finite[e]:
            summary[e, 5] = stats.nonfinite_fraction(whole[None, :])[0]
    return summary, derivative, pooled


#: Values summarised at once: a block of samples and its temporaries stay in the CPU's cache.
BLOCK_VALUES = 1 << 19


def _blocks(group: np.ndarray, length: int) -> list[np.ndarray]:
    """``group`` in consecutive pieces of about :data:`BLOCK_VALUES` sample values."""
    rows = max(1, BLOCK_VALUES // max(length, 1))
    return [group[i:i + rows] for i in range(0, len(group), rows)]


def _per_call_metrics(out: Summary, calls: Calls, name: str, edges: np.ndarray | None,
                      entries: list[tuple[int, list[int], np.ndarray | None]]) -> None:
    """``dead`` (per-unit maxima), and at detail steps ``unit_count``, the per-unit rows and
    the histogram, of one layer's entries ``(step, calls, pooled detail sample)`` that have
    maxima or are at detail steps."""
    dead, unit_count = [], []
    for step, calls_of, sample in entries:
        maxima = [calls.maxima[c] for c in calls_of if c in calls.maxima]
        if maxima and len(maxima) == len(calls_of) and len({m.shape for m in maxima}) == 1:
            dead.append((step, float(np.sum(np.maximum.reduce(maxima) <= 0))))
        if sample is not None and edges is not None:
            out.hists.append((step, name, stats.histogram(sample, edges)))
        parts = [calls.units[c].reshape(3, -1) for c in calls_of if c in calls.units]
        if not parts or len(parts) != len(calls_of) or len({p.shape for p in parts}) != 1:
            continue
        merged = (0, 0.0, 0.0)
        for c, (shift, s1, s2) in zip(calls_of, parts):
            count = int(calls.size[c]) // parts[0].shape[1]
            merged = stats.merge_moments(merged, (count, *stats.finish_moments(count, shift, s1, s2)))
        total, mean, m2 = merged
        unit_count.append((step, total))
        out.units.append((step, name, np.asarray(mean, dtype=np.float64), m2 / total))
    for metric, pairs in (("dead", dead), ("unit_count", unit_count)):
        out.add(name, metric, [s for s, _ in pairs], [v for _, v in pairs])


def _grad_metrics(out: Summary, calls: Calls, names: list[str]) -> None:
    """``grad_norm`` and ``grad_rms`` of every layer's output gradients, summed per step."""
    if not len(calls.grad_step):
        return
    e_layer, e_step, _, inverse, _ = _entries(calls.grad_layer, calls.grad_step)
    count = np.bincount(inverse, calls.grad_size, len(e_layer))
    sumsq = np.bincount(inverse, calls.grad_sumsq, len(e_layer))
    for rows in np.split(np.arange(len(e_layer)), np.flatnonzero(np.diff(e_layer)) + 1):
        name = names[int(e_layer[rows[0]])]
        out.add(name, "grad_norm", e_step[rows], np.sqrt(sumsq[rows]))
        out.add(name, "grad_rms", e_step[rows], np.sqrt(sumsq[rows] / count[rows]))


def run_columns(out: Summary, records: list[StepRecord]) -> None:
    """Loss, learning rates, the global gradient norm and the parameter metrics."""
    losses = [r for r in records if r.loss is not None]
    out.add("", "loss", [r.step for r in losses], [r.slots.get(r.loss)[0] for r in losses])
    lrs: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for rec in records:
        for group, handle in rec.lrs:
            lrs[group].append((rec.step, rec.slots.get(handle)[0]))
    for group, pairs in lrs.items():
        out.add("", "lr" if group == 0 else f"lr.{group}", [s for s, _ in pairs], [v for _, v in pairs])
    global_norm = [(rec.step, np.sqrt(np.sum(rec.slots.get(rec.grad_norms) ** 2)))
                   for rec in records if rec.grad_norms is not None and len(rec.grad_params)]
    out.add("", "grad_norm", [s for s, _ in global_norm], [v for _, v in global_norm])
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
                out.add(layer, f"{attr}.{metric}", steps[have[:, j]], values[have[:, j], j])


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
