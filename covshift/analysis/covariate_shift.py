"""Covariate shift of each run's layers: how far each layer's output distribution moves between
detail steps, as Wasserstein distances per step, their sampling-noise baseline, their summary
and findings on the inputs of the nonlinearities.

**Covariate shift** (per run and layer, at each detail step t after the layer's first,
against a reference step r: the previous detail step for ``*_prev``, the first for
``*_first``). With m_u, v_u the mean and variance of unit u (a feature, or a conv channel),
over the units whose four statistics are finite:

- ``w2`` = √(mean_u W2_u²) / s_r, where W2_u² = (m_ut − m_ur)² + (√v_ut − √v_ur)² is the
  squared 2-Wasserstein distance between the Gaussians N(m_ut, v_ut) and N(m_ur, v_ur), and
  s_r = max(√(mean_u v_ur), SCALE_FLOOR × √(mean_u (v_ur + m_ur²))) is the layer's pooled
  within-unit std at r, floored at :data:`SCALE_FLOOR` of the layer's RMS value at r. The
  layer-level scale keeps a few near-constant units from dominating (a per-unit std of 4e-4
  turned a small move into W2 = 553); the floor bounds a layer that is nearly constant as a
  whole. NaN when no unit is left, when s_r is 0 or the layer has no per-unit statistics.
- ``w1`` = the 1-Wasserstein distance between the layer's histograms at t and r
  (``scipy.stats.wasserstein_distance``; each bin's count placed at its centre, the
  underflow bin at the first finite edge, the overflow bin at the last), divided by the
  layer's ``std`` at r (over all its values, so between-unit spread counts: it is small
  only for a layer constant as a whole); NaN when a histogram is empty or that std is
  missing, 0 or non-finite.
- ``baseline`` = the value ``w2_prev`` takes from sampling noise alone. Two exact estimates
  of the same Gaussian unit from independent samples (fresh mini-batches) of n_t and n_r
  elements (the ``unit_count`` metric: batch rows for a Linear output, batch × positions for
  a conv channel) differ by E W2_u² = 1.5 σ_u² (1/n_t + 1/n_r) (the means by σ²/n each, the
  stds by σ²/(2n) each), so ``baseline`` = √(1.5 (1/n_t + 1/n_r)) × √(mean_u v_ur) / s_r,
  which is √(3/n) for equal counts when the floor is not reached. NaN where ``unit_count``
  is not recorded (traces from before it). It assumes independent, Gaussian elements:
  correlated positions of a conv channel or heavy tails raise the real noise above it; the
  same batch at every step (full-batch training) and a BatchNorm output in training mode
  (each unit's batch mean and variance fixed) have less noise than it.

``summary`` averages each layer's values over its steps (``mean_w2_prev``, ``mean_w1_prev``,
``mean_w2_first``, ``mean_w1_first``, ``mean_baseline``); its rows with ``layer == ""``
average those over the run's *nonlinearity inputs* (the layer recorded just before each
nonlinearity, :func:`covshift.analysis.pairing.layers`), never over output
logits, pooling or Flatten. The findings and the claim use those inputs only: each run's
mean over its inputs with a finite ``w2``, and :func:`pair_shift` over the role-matched inputs
of a bn and a nobn run. A mean :class:`Shift` is *within noise* when it is below
:data:`BASELINE_FACTOR` × its mean baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import wasserstein_distance

from . import common
from .common import Finding
from .pairing import layers as role_layers

SCALE_FLOOR = 0.01  #: w2's scale is at least this fraction of the layer's RMS value at the reference step
BASELINE_FACTOR = 2.0  #: a shift below this multiple of its sampling-noise baseline is within noise
SHIFT_COLUMNS = ["run", "layer", "step", "prev_step", "w2_prev", "w2_first", "w1_prev", "w1_first", "baseline"]
SUMMARY_VALUES = ["w2_prev", "w1_prev", "w2_first", "w1_first", "baseline"]


@dataclass
class Shift:
    """A run's mean ``w2_prev`` over some layers, their mean baseline and how many layers."""
    value: float
    baseline: float
    layers: int

    @property
    def times_baseline(self) -> float:
        """The shift as a multiple of its baseline; NaN without a baseline."""
        ok = math.isfinite(self.baseline) and self.baseline > 0
        return self.value / self.baseline if ok else math.nan

    @property
    def within_noise(self) -> bool:
        """Whether the shift is below :data:`BASELINE_FACTOR` × its baseline (False without one)."""
        return self.times_baseline < BASELINE_FACTOR


def _w2(t: tuple[np.ndarray, np.ndarray], r: tuple[np.ndarray, np.ndarray], n_t: float,
        n_r: float) -> tuple[float, float]:
    """``w2`` of the unit statistics ``t`` (means, variances) against ``r``, and its baseline."""
    (m_t, v_t), (m_r, v_r) = t, r
    ok = np.isfinite(m_t) & np.isfinite(v_t) & np.isfinite(m_r) & np.isfinite(v_r)
    if not ok.any():
        return math.nan, math.nan
    m_t, m_r = m_t[ok], m_r[ok]
    v_t, v_r = np.maximum(v_t[ok], 0.0), np.maximum(v_r[ok], 0.0)
    spread = math.sqrt(float(np.mean(v_r)))
    scale = max(spread, SCALE_FLOOR * math.sqrt(float(np.mean(v_r + m_r ** 2))))
    if not scale > 0:
        return math.nan, math.nan
    squared = (m_t - m_r) ** 2 + (np.sqrt(v_t) - np.sqrt(v_r)) ** 2
    noise = math.sqrt(1.5 * (1 / n_t + 1 / n_r)) if n_t > 0 and n_r > 0 else math.nan
    return math.sqrt(float(np.mean(squared))) / scale, noise * spread / scale


def _w1(hist_t: tuple[np.ndarray, np.ndarray] | None, hist_r: tuple[np.ndarray, np.ndarray] | None,
        std_r: float) -> float:
    """W1 distance between two histograms (centres, counts) over the reference std."""
    if hist_t is None or hist_r is None or not (np.isfinite(std_r) and std_r > 0):
        return math.nan
    (x_t, c_t), (x_r, c_r) = hist_t, hist_r
    if c_t.sum() <= 0 or c_r.sum() <= 0:
        return math.nan
    return float(wasserstein_distance(x_t, x_r, c_t, c_r) / std_r)


def _centres(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Bin centres; the underflow bin at its right edge, the overflow bin at its left."""
    return np.where(np.isinf(left), right, np.where(np.isinf(right), left, (left + right) / 2))


def _unit_stats(u: pd.DataFrame | None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per detail step: unit means and variances, aligned on the same units."""
    if u is None:
        return {}
    means = u.pivot_table(index="step", columns="unit", values="mean", aggfunc="last", dropna=False)
    variances = u.pivot_table(index="step", columns="unit", values="var", aggfunc="last", dropna=False)
    variances = variances.reindex(index=means.index, columns=means.columns)
    return {int(step): (means.loc[step].to_numpy(dtype=float), variances.loc[step].to_numpy(dtype=float))
            for step in means.index}


def _histograms(h: pd.DataFrame | None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per detail step: bin positions (see :func:`_centres`) and counts."""
    if h is None:
        return {}
    h = h[~(np.isinf(h["left"].to_numpy()) & np.isinf(h["right"].to_numpy()))]
    return {int(step): (_centres(g["left"].to_numpy(dtype=float), g["right"].to_numpy(dtype=float)),
                        g["count"].to_numpy(dtype=float)) for step, g in h.groupby("step", observed=True)}


def _at(layer_frame: pd.DataFrame, metric: str) -> dict[tuple[str, str, int], float]:
    rows = layer_frame[layer_frame["metric"] == metric]
    return {(r, name, int(s)): float(v)
            for r, name, s, v in zip(rows["run"], rows["layer"], rows["step"], rows["value"])}


def table(units: pd.DataFrame, hists: pd.DataFrame, layer_frame: pd.DataFrame,
          info: pd.DataFrame) -> pd.DataFrame:
    """One row per run, layer and detail step after the layer's first (:data:`SHIFT_COLUMNS`)."""
    std_at, count_at = _at(layer_frame, "std"), _at(layer_frame, "unit_count")
    unit_groups = {key: g for key, g in units.groupby(["run", "layer"], sort=False, observed=True)}
    hist_groups = {key: g for key, g in hists.groupby(["run", "layer"], sort=False, observed=True)}
    rows = []
    for run, layer in zip(info["run"], info["layer"]):
        stats = _unit_stats(unit_groups.get((run, layer)))
        histos = _histograms(hist_groups.get((run, layer)))
        ordered = sorted(set(stats) | set(histos))
        for prev, step in zip(ordered, ordered[1:]):
            row = {"run": run, "layer": layer, "step": step, "prev_step": prev}
            for suffix, ref in (("prev", prev), ("first", ordered[0])):
                a, b = stats.get(step), stats.get(ref)
                n_t, n_r = (count_at.get((run, layer, s), math.nan) for s in (step, ref))
                w2, baseline = (math.nan, math.nan) if a is None or b is None else _w2(a, b, n_t, n_r)
                row[f"w2_{suffix}"] = w2
                row[f"w1_{suffix}"] = _w1(histos.get(step), histos.get(ref), std_at.get((run, layer, ref), math.nan))
                if suffix == "prev":
                    row["baseline"] = baseline
            rows.append(row)
    return pd.DataFrame(rows, columns=SHIFT_COLUMNS)


def summary(runs: list[str], shift: pd.DataFrame, info: pd.DataFrame) -> pd.DataFrame:
    """Per run and layer the mean of each value over its steps; per run (``layer == ""``)
    their mean over the run's nonlinearity inputs, when it has any with a row."""
    columns = ["run", "layer", *(f"mean_{v}" for v in SUMMARY_VALUES), "steps"]
    rows = []
    for run in runs:
        s = shift[shift["run"] == run]
        per_layer = []
        for layer in info.loc[info["run"] == run, "layer"]:
            g = s[s["layer"] == layer]
            if not g.empty:
                per_layer.append({"run": run, "layer": layer, "steps": len(g),
                                  **{f"mean_{v}": g[v].mean() for v in SUMMARY_VALUES}})
        rows += per_layer
        inputs = pd.DataFrame(per_layer, columns=columns)
        inputs = inputs[inputs["layer"].isin(role_layers(info, run, "input"))]
        if not inputs.empty:
            rows.append({"run": run, "layer": "", "steps": int(inputs["steps"].max()),
                         **{f"mean_{v}": inputs[f"mean_{v}"].mean() for v in SUMMARY_VALUES}})
    return pd.DataFrame(rows, columns=columns)


def _means(summary: pd.DataFrame, run: str, layers: list[str]) -> Shift:
    """The mean ``mean_w2_prev`` and ``mean_baseline`` over ``layers`` of ``run`` (the
    baseline NaN unless every layer has one)."""
    rows = summary[(summary["run"] == run) & summary["layer"].isin(layers)]
    if rows.empty:
        return Shift(math.nan, math.nan, 0)
    baselines = rows["mean_baseline"].to_numpy(dtype=float)
    baseline = float(baselines.mean()) if np.isfinite(baselines).all() else math.nan
    return Shift(float(rows["mean_w2_prev"].mean()), baseline, len(rows))


def _finite_w2(summary: pd.DataFrame, run: str, layers: list[str]) -> list[str]:
    rows = summary[(summary["run"] == run) & summary["layer"].isin(layers)]
    ok = set(rows.loc[np.isfinite(rows["mean_w2_prev"].to_numpy(dtype=float)), "layer"])
    return [layer for layer in layers if layer in ok]


def pair_shift(summary: pd.DataFrame, pairs: pd.DataFrame, bn: str, nobn: str) -> tuple[Shift, Shift]:
    """Both runs' mean ``w2_prev`` and baseline over the role-matched nonlinearity inputs
    (``pairs`` rows of kind ``input``) where both have a finite ``w2``."""
    roles = pairs[pairs["kind"] == "input"]
    ok_b, ok_n = set(_finite_w2(summary, bn, list(roles["bn"]))), set(_finite_w2(summary, nobn, list(roles["nobn"])))
    both = [(b, n) for b, n in zip(roles["bn"], roles["nobn"]) if b in ok_b and n in ok_n]
    return _means(summary, bn, [b for b, _ in both]), _means(summary, nobn, [n for _, n in both])


def _noise(s: Shift) -> str:
    """E.g. "4.1 times the sampling-noise baseline 0.03"."""
    if not math.isfinite(s.times_baseline):
        return "no sampling-noise baseline (the trace has no unit_count)"
    return f"{common.num(s.times_baseline)} times the sampling-noise baseline {common.num(s.baseline)}"


def findings(summary: pd.DataFrame, info: pd.DataFrame, pairs: pd.DataFrame, runs: list[str],
             pair: tuple[str, str] | None) -> list[Finding]:
    """Per run, its mean shift over its nonlinearity inputs and the largest; for ``pair``,
    both runs' shifts over the matched inputs."""
    out = []
    for run in runs:
        layers = _finite_w2(summary, run, role_layers(info, run, "input"))
        if not layers:
            continue
        s = _means(summary, run, layers)
        rows = summary[(summary["run"] == run) & summary["layer"].isin(layers)]
        top = rows.loc[rows["mean_w2_prev"].idxmax()]
        which = f"inputs of its {s.layers} nonlinearities shift" if s.layers > 1 else "input of its nonlinearity shifts"
        text = (f"In the {run} run the {which} by W2 {common.num(s.value)} per detail interval on average "
                f"(in units of the layer's spread), {_noise(s)}")
        if s.layers > 1:
            text += f"; largest at `{top['layer']}` ({common.num(top['mean_w2_prev'])})"
        out.append(Finding("covariate_shift", text + ".", run, str(top["layer"]), value=s.value))
    if pair:
        b, n = pair_shift(summary, pairs, *pair)
        if b.layers:
            text = (f"Over the {b.layers} matched nonlinearity input{'s' * (b.layers > 1)}, the mean W2 shift per "
                    f"detail interval is {common.num(b.value)} in the {pair[0]} run ({_noise(b)}) and "
                    f"{common.num(n.value)} in the {pair[1]} run ({_noise(n)})")
            lo, hi = sorted([(b.value, pair[0]), (n.value, pair[1])])
            if lo[0] > 0 and hi[0] != lo[0]:
                text += f"; {common.num(hi[0] / lo[0])} times as large in the {hi[1]} run"
            if b.within_noise and n.within_noise:
                text += f"; both are within {BASELINE_FACTOR:g}× their sampling-noise baseline"
            out.append(Finding("covariate_shift", text + ".", value=n.value - b.value))
    return out
