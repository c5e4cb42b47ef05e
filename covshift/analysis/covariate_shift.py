"""Covariate shift of each run's layers: how far each layer's output distribution moves between
detail steps, as Wasserstein distances per step, their summary and findings.

**Covariate shift** (per run and layer, at each detail step t after the layer's first,
against a reference step r: the previous detail step for ``*_prev``, the first for
``*_first``).
``w2`` = median over units u of W2(N(m_ut, v_ut), N(m_ur, v_ur)) / √v_ur, where the
2-Wasserstein distance between 1-D Gaussians is √((m_ut − m_ur)² + (√v_ut − √v_ur)²).
Units with v_ur = 0 or non-finite values are skipped; NaN when none is left or the layer has
no per-unit statistics. ``w1`` = the 1-Wasserstein distance between the layer's histograms
at t and r (``scipy.stats.wasserstein_distance``; each bin's count placed at its centre, the
underflow bin at the first finite edge, the overflow bin at the last), divided by the layer's
``std`` at r; NaN when a histogram is empty or that std is missing, 0 or non-finite. Both
measure the shift in units of the reference standard deviation; ``w2`` takes the median so
that a few units with a tiny reference variance (nearly dead or saturated) do not dominate it. ``shift_summary`` averages
each layer's values over its steps (``mean_w2_prev``, ``mean_w1_prev``, ``mean_w2_first``,
``mean_w1_first``); its rows with ``layer == ""`` average those over the run's layers.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import wasserstein_distance

from . import common
from .common import Finding


def _w2(mean_t: np.ndarray, var_t: np.ndarray, mean_r: np.ndarray, var_r: np.ndarray) -> float:
    """Median over units of the Gaussian W2 distance in reference standard deviations."""
    ok = np.isfinite(mean_t) & np.isfinite(var_t) & np.isfinite(mean_r) & np.isfinite(var_r) & (var_r > 0)
    if not ok.any():
        return math.nan
    s_t, s_r = np.sqrt(np.maximum(var_t[ok], 0.0)), np.sqrt(var_r[ok])
    return float(np.median(np.hypot(mean_t[ok] - mean_r[ok], s_t - s_r) / s_r))


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
                        g["count"].to_numpy(dtype=float)) for step, g in h.groupby("step")}


def table(units: pd.DataFrame, hists: pd.DataFrame, layer_frame: pd.DataFrame,
          info: pd.DataFrame) -> pd.DataFrame:
    std = layer_frame[layer_frame["metric"] == "std"]
    std_at = {(r, name, int(s)): float(v) for r, name, s, v in zip(std["run"], std["layer"], std["step"], std["value"])}
    unit_groups = {key: g for key, g in units.groupby(["run", "layer"], sort=False)}
    hist_groups = {key: g for key, g in hists.groupby(["run", "layer"], sort=False)}
    rows = []
    for run, layer in zip(info["run"], info["layer"]):
        stats = _unit_stats(unit_groups.get((run, layer)))
        histos = _histograms(hist_groups.get((run, layer)))
        ordered = sorted(set(stats) | set(histos))
        for prev, step in zip(ordered, ordered[1:]):
            row = {"run": run, "layer": layer, "step": step, "prev_step": prev}
            for suffix, ref in (("prev", prev), ("first", ordered[0])):
                a, b = stats.get(step), stats.get(ref)
                row[f"w2_{suffix}"] = math.nan if a is None or b is None else _w2(a[0], a[1], b[0], b[1])
                row[f"w1_{suffix}"] = _w1(histos.get(step), histos.get(ref), std_at.get((run, layer, ref), math.nan))
            rows.append(row)
    return pd.DataFrame(rows, columns=["run", "layer", "step", "prev_step", "w2_prev", "w2_first",
                                       "w1_prev", "w1_first"])


def summary(runs: list[str], shift: pd.DataFrame, info: pd.DataFrame) -> pd.DataFrame:
    columns = ["run", "layer", "mean_w2_prev", "mean_w1_prev", "mean_w2_first", "mean_w1_first", "steps"]
    values = ["w2_prev", "w1_prev", "w2_first", "w1_first"]
    rows = []
    for run in runs:
        s = shift[shift["run"] == run]
        if s.empty:
            continue
        per_layer = []
        for layer in info.loc[info["run"] == run, "layer"]:
            g = s[s["layer"] == layer]
            if g.empty:
                continue
            row = {"run": run, "layer": layer, "steps": len(g)}
            row.update({f"mean_{v}": g[v].mean() for v in values})
            per_layer.append(row)
        total = pd.DataFrame(per_layer)
        rows += per_layer
        rows.append({"run": run, "layer": "", "steps": int(total["steps"].max()),
                     **{f"mean_{v}": total[f"mean_{v}"].mean() for v in values}})
    return pd.DataFrame(rows, columns=columns)


def findings(summary: pd.DataFrame, runs: list[str], pair: tuple[str, str] | None) -> list[Finding]:
    out = []
    for run in runs:
        s = summary[summary["run"] == run]
        total, layers = s[s["layer"] == ""], s[s["layer"] != ""]
        if total.empty:
            continue
        t = total.iloc[0]
        parts = [f"{name} {common.num(t[col])}" for name, col in (("W2", "mean_w2_prev"), ("W1", "mean_w1_prev"))
                 if np.isfinite(t[col])]
        if not parts:
            continue
        key = "mean_w2_prev" if np.isfinite(t["mean_w2_prev"]) else "mean_w1_prev"
        top = layers.loc[layers[key].idxmax()] if layers[key].notna().any() else None
        text = (f"In the {run} run the mean covariate shift between consecutive detail steps is "
                f"{' and '.join(parts)} (in reference standard deviations, averaged over {len(layers)} layers)")
        if top is not None:
            text += f"; largest in `{top['layer']}` ({key[5:7].upper()} {common.num(top[key])})"
        out.append(Finding("covariate_shift", text + ".", run, None if top is None else top["layer"],
                           value=float(t[key])))
    if pair:
        a, b = (summary[(summary["run"] == p) & (summary["layer"] != "")].set_index("layer") for p in pair)
        shared = [layer for layer in a.index if layer in b.index]
        for name, col in (("W2", "mean_w2_prev"), ("W1", "mean_w1_prev")):
            ok = [layer for layer in shared if np.isfinite(a.loc[layer, col]) and np.isfinite(b.loc[layer, col])]
            if not ok:
                continue
            ma, mb = float(a.loc[ok, col].mean()), float(b.loc[ok, col].mean())
            text = (f"Over the {len(ok)} layers both runs share, the mean {name} shift between consecutive detail "
                    f"steps is {common.num(ma)} in the {pair[0]} run and {common.num(mb)} in the {pair[1]} run")
            lo, hi = sorted([(ma, pair[0]), (mb, pair[1])])
            if lo[0] > 0 and hi[0] != lo[0]:
                text += f" ({common.num(hi[0] / lo[0])} times as large in the {hi[1]} run)"
            out.append(Finding("covariate_shift", text + ".", value=mb - ma))
    return out
