"""Figures of a covshift trace, one function per figure, each returning a matplotlib Figure.

Figures are built with :class:`matplotlib.figure.Figure` on an Agg canvas: no pyplot
state, no window, nothing to close. :func:`save_all` writes the seven PNGs of a report.

Conventions shared by every figure:

- each run has one colour (:func:`run_colors`); a figure legend maps colours to runs;
- layers are in forward order; where a run's layers are drawn as several lines, their
  colour goes from pale (first layer) to the run's colour (last layer);
- at most ``MAX_LABELS`` layer names are written on an axis or colour bar;
- non-finite values are masked (gaps in lines, grey cells in heat maps);
- names are escaped, so a ``$`` in a layer name is printed, not read as mathtext.

>>> import covshift, covshift.plots as plots
>>> plots.save_all(covshift.load("trace.covshift"), shift, "report/")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import colors as mcolors
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

from .store import Trace

__all__ = ["FILES", "PALETTE", "activations", "covariate_shift", "gradient_flow", "histograms",
           "percentiles", "run_colors", "saturation", "save_all", "training_loss"]

_COLORBLIND: list[str] = sns.color_palette("colorblind").as_hex()
#: Fixed run colours (seaborn "colorblind": blue and vermillion). Other runs: :func:`run_colors`.
PALETTE: dict[str, str] = {"bn": _COLORBLIND[0], "nobn": _COLORBLIND[3]}
_OTHER_COLORS: list[str] = [c for c in _COLORBLIND if c not in PALETTE.values()]

#: File name of each figure written by :func:`save_all`.
FILES: dict[str, str] = {
    "training_loss": "batchnorm_training_loss.png",
    "activations": "activations.png",
    "percentiles": "percentiles.png",
    "saturation": "saturation.png",
    "covariate_shift": "covariate_shift.png",
    "gradient_flow": "gradient_flow.png",
    "histograms": "histograms.png",
}
WIDTH, HEIGHT, DPI = 12.0, 4.0, 100
MAX_LABELS = 20  # most layer names written along one axis
_LEGEND_LAYERS = 10  # up to this many layers get a legend, more get a colour bar
MASKED = "#d9d9d9"  # masked heat-map cells
SHIFT_COLUMNS = ("run", "layer", "step", "w2_prev", "w2_first", "w1_prev", "w1_first")


# helpers ---------------------------------------------------------------------------------
def run_colors(runs: Sequence[str]) -> dict[str, str]:
    """One colour per run: ``PALETTE`` for "bn" and "nobn", other runs take the remaining
    seaborn "colorblind" colours in the order given (the order of ``trace.runs``)."""
    others = [r for r in runs if r not in PALETTE]
    colors = {r: _OTHER_COLORS[i % len(_OTHER_COLORS)] for i, r in enumerate(others)}
    return {r: PALETTE.get(r, colors.get(r, "")) for r in runs}


def literal(text: object) -> str:
    """Text printed literally: every ``$`` escaped, so mathtext never parses a name."""
    return str(text).replace("$", r"\$")


def new_figure(rows: int, cols: int, height: float = HEIGHT, **share: bool) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure on an Agg canvas and its (rows, cols) axes grid."""
    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False, **share)


def _finite(values: object) -> np.ndarray:
    """A float array with every non-finite value replaced by NaN."""
    array = np.asarray(values, dtype=float)
    return np.where(np.isfinite(array), array, np.nan)


def spans_decades(values: object, ratio: float = 100.0) -> bool:
    """Whether positive data spans more than ``ratio`` (max/min), so a log scale reads better.
    False when any finite value is negative."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0 or (v < 0).any():
        return False
    v = v[v > 0]
    return v.size >= 2 and v.max() / v.min() > ratio


def _robust_scale(ax: Axes, values: object) -> None:
    """Symmetric log scale when a few huge values (a diverging run) would flatten the rest."""
    v = np.abs(np.asarray(values, dtype=float).ravel())
    v = v[np.isfinite(v)]
    if v.size == 0:
        return
    typical = float(np.median(v))
    if typical > 0 and v.max() > 1e3 * typical:
        ax.set_yscale("symlog", linthresh=typical)


def _empty(ax: Axes, message: str) -> None:
    """Mark a panel as having no data, keeping its axis labels."""
    ax.text(0.5, 0.5, literal(message), ha="center", va="center", transform=ax.transAxes,
            fontsize=9, color="0.35", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _run_legend(fig: Figure, runs: Sequence[str], colors: dict[str, str]) -> None:
    """A figure legend mapping each run's colour to its name."""
    handles = [Line2D([], [], color=colors[r], lw=2.5) for r in runs]
    fig.legend(handles, [f"run {literal(r)}" for r in runs], loc="outside upper right",
               ncol=max(1, len(runs)), frameon=False, fontsize=9)


def _thin(n: int, most: int = MAX_LABELS) -> list[int]:
    """Indices of at most ``most`` of ``n`` evenly spaced labels, always the last one."""
    if n <= 0:
        return []
    k = max(1, math.ceil(n / most))
    return list(range(n - 1, -1, -k))[::-1]


def depth_colors(color: str, n: int) -> list[str]:
    """``n`` colours from pale (first layer) to ``color`` (last layer)."""
    if n <= 1:
        return [color] * n
    rgb = np.array(mcolors.to_rgb(color))
    pale = rgb + (1.0 - rgb) * 0.7
    ramp = [mcolors.to_hex(pale * (1 - t) + rgb * t) for t in np.linspace(0.0, 1.0, n)]
    ramp[-1] = color
    return ramp


def _depth_key(fig: Figure, axes: Sequence[Axes], names: Sequence[str], colors: Sequence[str]) -> None:
    """Which colour is which layer: a legend for a few layers, else a colour bar whose
    (thinned) tick labels name the layers, first layer at the top."""
    if not names:
        return
    if len(names) <= _LEGEND_LAYERS:
        handles = [Line2D([], [], color=c, lw=2) for c in colors]
        axes[0].legend(handles, [literal(n) for n in names], fontsize=7, title="layer", title_fontsize=7,
                       loc="best", framealpha=0.8)
        return
    n = len(names)
    mappable = ScalarMappable(mcolors.BoundaryNorm(np.arange(n + 1) - 0.5, n), mcolors.ListedColormap(colors))
    bar = fig.colorbar(mappable, ax=list(axes), fraction=0.04, pad=0.01)
    shown = _thin(n)
    bar.set_ticks(shown, labels=[literal(names[i]) for i in shown])
    bar.ax.tick_params(labelsize=6, length=2)
    bar.ax.invert_yaxis()
    bar.set_label("layer (forward order)", fontsize=8)


def _ordered_layers(info: pd.DataFrame, run: str, present: object = None) -> list[str]:
    """The run's layers in forward order, optionally only those in ``present``."""
    rows = info[info["run"] == run].sort_values("position")
    names = rows["layer"].tolist()
    if present is not None:
        keep = set(present)
        names = [n for n in names if n in keep] + sorted(keep - set(names))
    return names


def _wide(frame: pd.DataFrame) -> pd.DataFrame:
    """Tidy scalars to one row per (layer, step) and one column per metric."""
    if frame.empty:
        return pd.DataFrame()
    return frame.groupby(["layer", "step", "metric"])["value"].last().unstack("metric")


def _pick_layers(info: pd.DataFrame, run: str, fractions: Sequence[float],
                 present: object = None) -> list[str | None]:
    """The run's layers at relative depths ``fractions`` (0: first, 1: last) among its
    nonlinearity layers, else among all its layers (only those in ``present``). Picking by
    rank pairs the same layers of two runs even when their names differ, as they do when
    ``build_model(batchnorm)`` numbers the layers of each variant itself."""
    names = _candidates(info, run, present)
    if not names:
        return [None] * len(fractions)
    return [names[round(float(f) * (len(names) - 1))] for f in fractions]


def _candidates(info: pd.DataFrame, run: str, present: object = None) -> list[str]:
    rows = info[info["run"] == run].sort_values("position")
    if present is not None:
        rows = rows[rows["layer"].isin(set(present))]
    nonlinear = rows[rows["nonlinearity"].notna()]
    return (nonlinear if len(nonlinear) else rows)["layer"].tolist()


def _layer_type(info: pd.DataFrame, run: str, layer: str) -> str:
    match = info[(info["run"] == run) & (info["layer"] == layer)]
    return "" if match.empty else str(match["type"].iloc[0])


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around sorted step values, for heat maps over possibly uneven steps."""
    steps = np.asarray(steps, dtype=float)
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - mid[0]], mid, [2 * steps[-1] - mid[-1]]])


def _diverged_at(trace: Trace, run: str, steps: np.ndarray, loss: np.ndarray) -> int | None:
    """The step a run diverged at: from its config, else its first non-finite loss."""
    try:
        at = trace.config(run).get("diverged_at")
    except KeyError:
        at = None
    if at is not None:
        return int(at)
    bad = ~np.isfinite(loss)
    return int(steps[bad][0]) if bad.any() else None


# figures ---------------------------------------------------------------------------------
def training_loss(trace: Trace) -> Figure:
    """Training loss per step (light: raw, line: moving average), validation loss and
    validation accuracy, every run in each of three side-by-side panels."""
    runs = trace.runs
    colors = run_colors(runs)
    fig, axes = new_figure(1, 3)
    ax_loss, ax_vloss, ax_vacc = axes[0]
    frame = trace.scalars(layer="", metric=["loss", "val_loss", "val_accuracy"])
    lengths = [int(((frame["run"] == r) & (frame["metric"] == "loss")).sum()) for r in runs]
    window = max(1, max(lengths, default=0) // 40)
    collected: dict[str, list[np.ndarray]] = {"loss": [], "val_loss": [], "val_accuracy": []}
    for run in runs:
        mine = frame[frame["run"] == run]
        loss = mine[mine["metric"] == "loss"].sort_values("step")
        steps, raw = loss["step"].to_numpy(), loss["value"].to_numpy(dtype=float)
        values = _finite(raw)
        collected["loss"].append(values)
        if window > 1:
            ax_loss.plot(steps, values, color=colors[run], alpha=0.25, lw=0.7)
        smooth = pd.Series(values).rolling(window, center=True, min_periods=1).mean().to_numpy(dtype=float)
        smooth = np.where(np.isnan(values), np.nan, smooth)
        ax_loss.plot(steps, smooth, color=colors[run], lw=1.8, label=literal(run))
        at = _diverged_at(trace, run, steps, raw)
        finite = ~np.isnan(values)
        if at is not None and finite.any():
            last = np.flatnonzero(finite)[-1]
            ax_loss.plot(steps[last], values[last], "x", color=colors[run], ms=9, mew=2)
            ax_loss.annotate(f"{literal(run)} diverged at step {at}", (steps[last], values[last]),
                             xytext=(-4, 8), textcoords="offset points", ha="right", fontsize=7,
                             color=colors[run])
        for metric, ax in (("val_loss", ax_vloss), ("val_accuracy", ax_vacc)):
            rows = mine[mine["metric"] == metric].sort_values("step")
            v = _finite(rows["value"].to_numpy(dtype=float))
            collected[metric].append(v)
            if v.size:
                ax.plot(rows["step"], v, "o-", color=colors[run], ms=3.5, lw=1.4, label=literal(run))
    title = "training loss" + (f" (line: mean over {window} steps)" if window > 1 else "")
    panels = ((ax_loss, "loss", title, "training loss"),
              (ax_vloss, "val_loss", "validation loss", "validation loss"),
              (ax_vacc, "val_accuracy", "validation accuracy", "validation accuracy"))
    for ax, metric, text, ylabel in panels:
        ax.set_title(text, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        data = np.concatenate(collected[metric]) if collected[metric] else np.array([])
        if not np.isfinite(data).any():
            hint = "" if metric == "loss" else f" (log it with tracer.log({metric}=...))"
            _empty(ax, f"no {'training loss' if metric == 'loss' else metric} recorded{hint}")
            continue
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if metric != "val_accuracy" and spans_decades(data):
            ax.set_yscale("log")
    acc = np.concatenate(collected["val_accuracy"]) if collected["val_accuracy"] else np.array([])
    if np.isfinite(acc).any() and np.nanmax(acc) <= 1.0 and np.nanmin(acc) >= 0.0:
        ax_vacc.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax_vacc.set_ylabel("validation accuracy (%)")
    fig.suptitle("Training and validation loss per run", fontsize=11)
    _run_legend(fig, runs, colors)
    return fig


def activations(trace: Trace) -> Figure:
    """Mean ± std of each layer's output over training, one panel per run (Glorot & Bengio
    2010, Fig. 2 style). Shows the run's nonlinearity layers when it has any, else every
    layer with statistics; colour encodes depth."""
    runs, info = trace.runs, trace.layer_info()
    colors = run_colors(runs)
    fig, axes = new_figure(1, max(1, len(runs)), sharey=True)
    everything: list[np.ndarray] = []
    for ax, run in zip(axes[0], runs):
        wide = _wide(trace.scalars(run=run, metric=["mean", "std"]).query("layer != ''"))
        present = set(wide.index.get_level_values("layer")) if not wide.empty else set()
        nonlinear = set(info.loc[(info["run"] == run) & info["nonlinearity"].notna(), "layer"])
        kind = "nonlinearity" if present & nonlinear else "layer"
        layers = _ordered_layers(info, run, present & nonlinear or present)
        ax.set_title(f"{literal(run)}: mean ± std of each {kind}'s output", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("activation (output value)")
        if not layers:
            _empty(ax, f"no activation statistics recorded for run {run}")
            continue
        shades = depth_colors(colors[run], len(layers))
        alpha = max(0.04, 0.3 / math.sqrt(len(layers)))
        for layer, color in zip(layers, shades):
            data = wide.loc[layer]
            steps = data.index.to_numpy()
            mean = _finite(data["mean"]) if "mean" in data else np.full(len(steps), np.nan)
            std = _finite(data["std"]) if "std" in data else np.zeros(len(steps))
            ax.plot(steps, mean, color=color, lw=1.2, label=literal(layer))
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=alpha, lw=0)
            everything += [mean - std, mean + std]
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        _depth_key(fig, [ax], layers, shades)
    if everything:
        _robust_scale(axes[0][0], np.concatenate(everything))
    fig.suptitle("Activations over training (line: mean, band: ± one standard deviation)", fontsize=11)
    _run_legend(fig, runs, colors)
    return fig


def percentiles(trace: Trace, layer: str | None = None) -> Figure:
    """15th, 50th and 85th percentiles of one layer's output over training, one panel per
    run (Ioffe & Szegedy 2015, Fig. 1 style). Default: each run's last nonlinearity layer
    (the same layer in paired runs), else its last layer."""
    runs, info = trace.runs, trace.layer_info()
    colors = run_colors(runs)
    if layer is not None and layer not in set(info["layer"]):
        raise ValueError(f"no layer {layer!r} in {trace.path}; layers: {', '.join(trace.layers)}")
    fig, axes = new_figure(1, max(1, len(runs)), sharey=True)
    everything: list[np.ndarray] = []
    for ax, run in zip(axes[0], runs):
        name = layer if layer is not None else _pick_layers(info, run, [1.0])[0]
        kind = _layer_type(info, run, name) if name is not None else ""
        ax.set_title(f"{literal(run)}: layer {literal(name)}" + (f" ({literal(kind)})" if kind else ""), fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("output value")
        metrics = ["p15", "p50", "p85"]
        wide = _wide(trace.scalars(run=run, layer=name, metric=metrics)) if name is not None else pd.DataFrame()
        if wide.empty:
            _empty(ax, f"no percentiles of layer {name} in run {run}")
            continue
        data = wide.loc[name]
        steps = data.index.to_numpy()
        p = {q: _finite(data[q]) if q in data else np.full(len(steps), np.nan) for q in ("p15", "p50", "p85")}
        color = colors[run]
        ax.fill_between(steps, p["p15"], p["p85"], color=color, alpha=0.15, lw=0)
        ax.plot(steps, p["p85"], "--", color=color, lw=1, label="85th percentile")
        ax.plot(steps, p["p50"], "-", color=color, lw=1.8, label="50th (median)")
        ax.plot(steps, p["p15"], ":", color=color, lw=1.2, label="15th percentile")
        everything += list(p.values())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if not everything[:-3]:  # the first panel with data explains the lines
            ax.legend(fontsize=7, loc="best")
    if everything:
        _robust_scale(axes[0][0], np.concatenate(everything))
    fig.suptitle("Distribution of one layer's output over training (15th, 50th, 85th percentiles)", fontsize=11)
    _run_legend(fig, runs, colors)
    return fig


def saturation(trace: Trace) -> Figure:
    """Fraction of saturated outputs (top row) and gain (bottom row) of every nonlinearity
    layer over training, one column per run; shade encodes depth (darkest: last layer)."""
    runs, info = trace.runs, trace.layer_info()
    colors = run_colors(runs)
    fig, axes = new_figure(2, max(1, len(runs)), height=6.0, sharex="col", sharey="row")
    for col, run in enumerate(runs):
        top, bottom = axes[0][col], axes[1][col]
        wide = _wide(trace.scalars(run=run, metric=["saturation", "gain"]).query("layer != ''"))
        layers = _ordered_layers(info, run, set(wide.index.get_level_values("layer"))) if not wide.empty else []
        shades = depth_colors(colors[run], len(layers))
        for ax, metric, ylabel, what in ((top, "saturation", "fraction saturated", "fraction saturated"),
                                         (bottom, "gain", "gain (mean f′ / max f′)", "gain")):
            ax.set_title(f"{literal(run)}: {what} per layer", fontsize=10)
            if ax is bottom:  # the columns share their step axis
                ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            if not layers:
                _empty(ax, f"no saturation recorded for run {run} (no bounded or ReLU-family "
                           "nonlinearity modules)")
                continue
            for name, color in zip(layers, shades):
                data = wide.loc[name]
                if metric in data:
                    ax.plot(data.index.to_numpy(), _finite(data[metric]), color=color, lw=1.3, label=literal(name))
            ax.set_ylim(-0.03, 1.03)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        _depth_key(fig, [top, bottom], layers, shades)
    fig.suptitle("Saturation (share of outputs where f′ < 10% of its maximum) and gain", fontsize=11)
    _run_legend(fig, runs, colors)
    return fig


def covariate_shift(trace: Trace, shift: pd.DataFrame | None) -> Figure:
    """Wasserstein distance between each layer's output distribution at a detail step and
    at the previous one (W2 top row, W1 bottom row when given), one column per run. Shows
    a run's nonlinearity layers when ``shift`` has any, else all its layers in ``shift``."""
    if shift is None or shift.empty:
        fig, axes = new_figure(1, 1)
        ax = axes[0][0]
        ax.set_xlabel("step")
        ax.set_ylabel("W₂ to previous detail step (units of the output)")
        ax.set_title("Internal covariate shift", fontsize=10)
        _empty(ax, "no detail steps recorded: covariate shift needs histograms at two or more "
                   "detail steps (Tracer detail_every)")
        return fig
    missing = [c for c in ("run", "layer", "step", "w2_prev") if c not in shift.columns]
    if missing:
        raise ValueError(f"shift is missing columns {missing}; expected {list(SHIFT_COLUMNS)}")
    runs = trace.runs + [r for r in dict.fromkeys(shift["run"]) if r not in trace.runs]
    colors = run_colors(runs)
    metrics = [("w2_prev", "W₂")]
    if "w1_prev" in shift.columns and np.isfinite(shift["w1_prev"].to_numpy(dtype=float)).any():
        metrics.append(("w1_prev", "W₁"))
    info = trace.layer_info()
    fig, axes = new_figure(len(metrics), len(runs), height=3.2 * len(metrics) + 0.8, sharex="col", sharey="row")
    for col, run in enumerate(runs):
        mine = shift[shift["run"] == run]
        layers = _candidates(info, run, set(mine["layer"]))
        shades = depth_colors(colors[run], len(layers))
        mine_info = info[(info["run"] == run) & info["layer"].isin(layers)]
        kind = "nonlinearity" if mine_info["nonlinearity"].notna().any() else "layer"
        for row, (metric, symbol) in enumerate(metrics):
            ax = axes[row][col]
            ax.set_title(f"{literal(run)}: {symbol} shift per {kind}", fontsize=10)
            if row == len(metrics) - 1:  # the columns share their step axis
                ax.set_xlabel("step")
            ax.set_ylabel(f"{symbol} to previous detail step\n(units of the output)")
            if not layers:
                _empty(ax, f"no detail steps recorded for run {run}")
                continue
            for name, color in zip(layers, shades):
                rows = mine[mine["layer"] == name].sort_values("step")
                ax.plot(rows["step"], _finite(rows[metric].to_numpy(dtype=float)), "o-", color=color,
                        ms=2.5, lw=1.2, label=literal(name))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        _depth_key(fig, [axes[r][col] for r in range(len(metrics))], layers, shades)
    for row, (metric, _) in enumerate(metrics):
        if spans_decades(shift[metric].to_numpy(dtype=float)):
            axes[row][0].set_yscale("log")
    fig.suptitle("Internal covariate shift: how far each layer's output distribution moves "
                 "between detail steps", fontsize=11)
    _run_legend(fig, runs, colors)
    return fig


def gradient_flow(trace: Trace) -> Figure:
    """Heat maps of log10 of the loss gradient's norm at each layer's output (layer x step),
    one per run side by side, on one shared colour scale; input layers at the top."""
    runs, info = trace.runs, trace.layer_info()
    colors = run_colors(runs)
    grids: list[tuple[str, list[str], np.ndarray, np.ndarray]] = []
    for run in runs:
        frame = trace.scalars(run=run, metric="grad_norm").query("layer != ''")
        if frame.empty:
            grids.append((run, [], np.array([]), np.empty((0, 0))))
            continue
        table = frame.groupby(["layer", "step"])["value"].last().unstack("step")
        layers = _ordered_layers(info, run, set(table.index))
        table = table.reindex(layers)
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = _finite(np.log10(table.to_numpy(dtype=float)))
        grids.append((run, layers, table.columns.to_numpy(), logs))
    values = np.concatenate([g[3].ravel() for g in grids]) if grids else np.array([])
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    most = max((len(g[1]) for g in grids), default=0)
    height = HEIGHT + max(0.0, 0.12 * (min(most, MAX_LABELS) - 10))
    fig, axes = new_figure(1, max(1, len(runs)), height=height)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=MASKED)
    mesh = None
    for ax, (run, layers, steps, logs) in zip(axes[0], grids):
        ax.set_title(f"{literal(run)}: gradient norm per layer", fontsize=10, color=colors[run])
        ax.set_xlabel("step")
        ax.set_ylabel("layer (forward order)")
        if not layers:
            _empty(ax, f"no gradients recorded for run {run}")
            continue
        mesh = ax.pcolormesh(_step_edges(steps), np.arange(len(layers) + 1) - 0.5, np.ma.masked_invalid(logs),
                             cmap=cmap, vmin=vmin, vmax=vmax, shading="flat", rasterized=True)
        ax.set_ylim(len(layers) - 0.5, -0.5)
        shown = _thin(len(layers))
        kinds = [_layer_type(info, run, layers[i]) for i in shown]
        ax.set_yticks(shown, labels=[literal(layers[i]) + (f" ({literal(k)})" if k else "") for i, k in zip(shown, kinds)],
                      fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if mesh is not None:
        fig.colorbar(mesh, ax=list(axes[0]), fraction=0.03, pad=0.01).set_label("log10 ‖∂L/∂y‖")
    fig.suptitle("Gradient flow: log10 of the loss gradient's norm at each layer's output "
                 "(grey: zero or not finite)", fontsize=11)
    _run_legend(fig, runs, colors)
    return fig


def histograms(trace: Trace, layer: str | None = None) -> Figure:
    """Output distribution over training as a heat map (x: step, y: output value, colour:
    fraction of the values in the bin), one column per run and one row per layer: ``layer``,
    or up to four of each run's nonlinearity layers spread over depth, the last included
    (paired by rank across runs, like :func:`percentiles`)."""
    runs, info = trace.runs, trace.layer_info()
    colors = run_colors(runs)
    hists = trace.histograms(layer=layer) if layer is not None else trace.histograms()
    if layer is not None and layer not in set(info["layer"]):
        raise ValueError(f"no layer {layer!r} in {trace.path}; layers: {', '.join(trace.layers)}")
    if hists.empty:
        fig, axes = new_figure(1, 1)
        ax = axes[0][0]
        ax.set_title("Output distributions over training", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("output value")
        _empty(ax, "no histograms recorded (they are taken at detail steps: Tracer detail_every)")
        return fig
    have = {r: set(hists.loc[hists["run"] == r, "layer"]) for r in runs}
    if layer is not None:
        picks = {r: [layer] for r in runs}
    else:  # up to four layers spread over depth, the last one included
        count = min((len(_candidates(info, r, have[r])) for r in runs if have[r]), default=1)
        fractions = np.linspace(0.0, 1.0, min(4, count)) if count > 1 else np.array([1.0])
        picks = {r: _pick_layers(info, r, fractions, have[r]) for r in runs}
    rows = len(next(iter(picks.values()), [None]))
    panels: dict[tuple[str, str], tuple[np.ndarray, np.ndarray | None, np.ndarray, float]] = {}
    for (run, name), frame in hists.groupby(["run", "layer"], sort=False):
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
    fig, axes = new_figure(rows, max(1, len(runs)), height=2.6 * rows + 1.0)
    cmap = sns.color_palette("rocket_r", as_cmap=True)
    norm = mcolors.PowerNorm(0.5, vmin=0.0, vmax=vmax)
    for row in range(rows):
        for col, run in enumerate(runs):
            ax, name = axes[row][col], picks[run][row]
            kind = _layer_type(info, run, name) if name is not None else ""
            ax.set_title(f"{literal(run)}: layer {literal(name)}" + (f" ({literal(kind)})" if kind else "") + " output",
                         fontsize=9, color=colors[run])
            ax.set_xlabel("step")
            ax.set_ylabel("output value")
            panel = panels.get((run, name))
            if panel is None or panel[1] is None:
                _empty(ax, f"no histograms of layer {name} in run {run}")
                continue
            steps, edges, frac, outside = panel
            ax.pcolormesh(_step_edges(steps), edges, frac.T, cmap=cmap, norm=norm, shading="flat", rasterized=True)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if outside > 0.005:
                ax.text(0.01, 0.97, f"outside the plotted range: up to {outside:.0%}", transform=ax.transAxes,
                        fontsize=7, va="top", color="0.2")
    fig.colorbar(ScalarMappable(norm, cmap), ax=axes.ravel().tolist(), fraction=0.03, pad=0.01).set_label(
        "fraction of values in bin")
    fig.suptitle("Output distributions over training (detail steps)", fontsize=11)
    _run_legend(fig, runs, colors)
    return fig


def save_all(trace: Trace, shift: pd.DataFrame | None, out_dir: str | os.PathLike[str],
             only: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Write the seven figures (or the ``only`` ones, by key of :data:`FILES`) as PNGs into
    ``out_dir`` (created when missing). Returns file name (e.g. ``"activations.png"``) -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    builders: dict[str, Callable[[], Figure]] = {
        "training_loss": lambda: training_loss(trace),
        "activations": lambda: activations(trace),
        "percentiles": lambda: percentiles(trace),
        "saturation": lambda: saturation(trace),
        "covariate_shift": lambda: covariate_shift(trace, shift),
        "gradient_flow": lambda: gradient_flow(trace),
        "histograms": lambda: histograms(trace),
    }
    written: dict[str, Path] = {}
    for key, build in builders.items():
        if only is not None and key not in only:
            continue
        path = out / FILES[key]
        fig = build()
        fig.savefig(path, dpi=DPI)
        fig.clear()
        written[FILES[key]] = path
    return written
