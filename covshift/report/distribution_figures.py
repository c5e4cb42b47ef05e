"""Figures of how each layer's output distribution moves over training, from the detail
steps: the covariate shift between consecutive detail steps and the histograms of the outputs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import colors as mcolors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..analysis.pairing import layers as role_layers
from ..store import Trace
from . import style


SHIFT_COLUMNS = ("run", "layer", "step", "w2_prev", "w2_first", "w1_prev", "w1_first")


def covariate_shift(trace: Trace, shift: pd.DataFrame | None) -> Figure:
    """Wasserstein distance between each layer's output distribution at a detail step and
    at the previous one (W2 top row, W1 bottom row when given), one column per run. Shows
    a run's nonlinearity inputs (the layers the claim compares) when ``shift`` has any, else
    its nonlinearity layers, else all its layers in ``shift``. With a ``baseline`` column the
    W2 panels draw its mean over the shown layers, the sampling-noise level, dashed."""
    if shift is None or shift.empty:
        fig, axes = style.new_figure(1, 1)
        ax = axes[0][0]
        ax.set_xlabel("step")
        ax.set_ylabel("W₂ to previous detail step (units of the output)")
        ax.set_title("Internal covariate shift", fontsize=10)
        style.empty(ax, "covariate shift needs per-unit statistics at two or more detail steps: record them "
                    "more often (Tracer detail_every, covshift trace --detail-every)")
        return fig
    missing = [c for c in ("run", "layer", "step", "w2_prev") if c not in shift.columns]
    if missing:
        raise ValueError(f"shift is missing columns {missing}; expected {list(SHIFT_COLUMNS)}")
    runs = trace.runs + [r for r in dict.fromkeys(shift["run"]) if r not in trace.runs]
    colors = style.run_colors(runs)
    metrics = [("w2_prev", "W₂")]
    if "w1_prev" in shift.columns and np.isfinite(shift["w1_prev"].to_numpy(dtype=float)).any():
        metrics.append(("w1_prev", "W₁"))
    info = trace.layer_info()
    noisy = False  # whether a sampling-noise baseline was drawn
    fig, axes = style.new_figure(len(metrics), len(runs), height=3.2 * len(metrics) + 0.8, sharex="col", sharey="row")
    for col, run in enumerate(runs):
        mine = shift[shift["run"] == run]
        layers = [name for name in role_layers(info, run, "input") if name in set(mine["layer"])]
        kind = "nonlinearity input"
        if not layers:
            layers = style.candidates(info, run, set(mine["layer"]))
            mine_info = info[(info["run"] == run) & info["layer"].isin(layers)]
            kind = "nonlinearity" if mine_info["nonlinearity"].notna().any() else "layer"
        shades = style.depth_colors(colors[run], len(layers))
        for row, (metric, symbol) in enumerate(metrics):
            ax = axes[row][col]
            ax.set_title(f"{style.literal(run)}: {symbol} shift per {kind}", fontsize=10)
            if row == len(metrics) - 1:  # the columns share their step axis
                ax.set_xlabel("step")
            ax.set_ylabel(f"{symbol} to previous detail step\n(units of the output)")
            if not layers:
                style.empty(ax, f"no detail steps recorded for run {run}")
                continue
            for name, color in zip(layers, shades):
                rows = mine[mine["layer"] == name].sort_values("step")
                ax.plot(rows["step"], style.finite(rows[metric].to_numpy(dtype=float)), "o-", color=color,
                        ms=2.5, lw=1.2, label=style.literal(name))
            if metric == "w2_prev" and "baseline" in mine.columns:
                noise = mine[mine["layer"].isin(layers)].groupby("step", observed=True)["baseline"].mean().dropna()
                if len(noise):
                    ax.plot(noise.index, noise.to_numpy(), "--", color="0.45", lw=1.0, label="sampling noise")
                    noisy = True
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        style.depth_key(fig, [axes[r][col] for r in range(len(metrics))], layers, shades)
    for row, (metric, _) in enumerate(metrics):
        if style.spans_decades(shift[metric].to_numpy(dtype=float)):
            axes[row][0].set_yscale("log")
    note = "\n(dashed: the W₂ of sampling noise alone)" if noisy else ""
    fig.suptitle("Internal covariate shift: how far each layer's output distribution moves "
                 "between detail steps" + note, fontsize=11)
    style.run_legend(fig, runs, colors)
    return fig


def histograms(trace: Trace, layer: str | None = None) -> Figure:
    """Output distribution over training as a heat map (x: step, y: output value, colour:
    fraction of the values in the bin), one column per run and one row per layer: ``layer``,
    or up to four of each run's nonlinearity layers spread over depth, the last included
    (paired by rank across runs, like :func:`covshift.report.figures.percentiles`)."""
    runs, info = trace.runs, trace.layer_info()
    colors = style.run_colors(runs)
    hists = trace.histograms(layer=layer) if layer is not None else trace.histograms()
    if layer is not None and layer not in set(info["layer"]):
        raise ValueError(f"no layer {layer!r} in {trace.path}; layers: {', '.join(trace.layers)}")
    if hists.empty:
        fig, axes = style.new_figure(1, 1)
        ax = axes[0][0]
        ax.set_title("Output distributions over training", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("output value")
        style.empty(ax, "no histograms recorded (they are taken at detail steps: Tracer detail_every)")
        return fig
    have = {r: set(hists.loc[hists["run"] == r, "layer"]) for r in runs}
    if layer is not None:
        picks = {r: [layer] for r in runs}
    else:  # up to four layers spread over depth, the last one included
        count = min((len(style.candidates(info, r, have[r])) for r in runs if have[r]), default=1)
        fractions = np.linspace(0.0, 1.0, min(4, count)) if count > 1 else np.array([1.0])
        picks = {r: style.pick_layers(info, r, fractions, have[r]) for r in runs}
    rows = len(next(iter(picks.values()), [None]))
    panels: dict[tuple[str, str], tuple[np.ndarray, np.ndarray | None, np.ndarray, float]] = {}
    for (run, name), frame in hists.groupby(["run", "layer"], sort=False, observed=True):
        if name not in picks.get(run, []):
            continue
        counts = frame.pivot_table(index="step", columns="bin", values="count", aggfunc="sum").fillna(0)
        total = counts.sum(axis=1).to_numpy(dtype=float)
        bins = frame.drop_duplicates("bin").set_index("bin").sort_index()
        inner = bins.index[np.isfinite(bins["left"]) & np.isfinite(bins["right"])]
        frac = counts.reindex(columns=inner, fill_value=0).to_numpy(dtype=float) / np.maximum(total, 1)[:, None]
        edges = np.append(bins.loc[inner, "left"].to_numpy(), bins.loc[inner[-1], "right"]) if len(inner) else None
        outside = 1.0 - frac.sum(axis=1)
        panels[(run, name)] = (counts.index.to_numpy(), edges, frac, float(outside.max(initial=0.0)))
    vmax = max((float(p[2].max(initial=0.0)) for p in panels.values()), default=1.0) or 1.0
    fig, axes = style.new_figure(rows, max(1, len(runs)), height=2.6 * rows + 1.0)
    cmap = sns.color_palette("rocket_r", as_cmap=True)
    norm = mcolors.PowerNorm(0.5, vmin=0.0, vmax=vmax)
    for row in range(rows):
        for col, run in enumerate(runs):
            ax, name = axes[row][col], picks[run][row]
            kind = style.layer_type(info, run, name) if name is not None else ""
            ax.set_title(f"{style.literal(run)}: layer {style.literal(name)}"
                         + (f" ({style.literal(kind)})" if kind else "") + " output", fontsize=9, color=colors[run])
            ax.set_xlabel("step")
            ax.set_ylabel("output value")
            panel = panels.get((run, name))
            if panel is None or panel[1] is None:
                style.empty(ax, f"no histograms of layer {name} in run {run}")
                continue
            steps, edges, frac, outside = panel
            if len(steps) == 1:  # one detail step (a run shorter than detail_every): its histogram
                ax.stairs(frac[0], edges, orientation="horizontal", fill=True, color=colors[run], alpha=0.6)
                ax.set_xlabel(f"fraction of values in bin (step {int(steps[0])}, the only detail step)")
            else:
                ax.pcolormesh(style.step_edges(steps), edges, frac.T, cmap=cmap, norm=norm, shading="flat",
                              rasterized=True)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if outside > 0.005:
                ax.text(0.01, 0.97, f"outside the plotted range: up to {outside:.0%}", transform=ax.transAxes,
                        fontsize=7, va="top", color="0.2")
    fig.colorbar(ScalarMappable(norm, cmap), ax=axes.ravel().tolist(), fraction=0.03, pad=0.01).set_label(
        "fraction of values in bin")
    fig.suptitle("Output distributions over training (detail steps)", fontsize=11)
    style.run_legend(fig, runs, colors)
    return fig
