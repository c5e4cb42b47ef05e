"""Figures of a covshift trace, one function per figure, each returning a matplotlib Figure.

Figures are built with :class:`matplotlib.figure.Figure` on an Agg canvas: no pyplot
state, no window, nothing to close. :func:`save_all` writes the seven PNGs of a report: the
figures here, and the two of :mod:`covshift.report.distribution_figures`. Every figure follows
the conventions of :mod:`covshift.report.style`.

>>> import covshift
>>> from covshift.report import figures
>>> figures.save_all(covshift.load("trace.covshift"), shift, "report/")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from ..analysis import common, pairing
from ..store import Trace
from . import style
from .distribution_figures import covariate_shift, histograms

__all__ = ["FILES", "activations", "gradient_flow", "percentiles", "saturation", "save_all", "training_loss"]


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


def _wide(frame: pd.DataFrame) -> pd.DataFrame:
    """Tidy scalars to one row per (layer, step) and one column per metric."""
    if frame.empty:
        return pd.DataFrame()
    return frame.groupby(["layer", "step", "metric"], observed=True)["value"].last().unstack("metric")


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


def _groups(trace: Trace) -> dict[str, list[str]]:
    """What the loss figure draws as one curve: with two or more seed pairs
    (:func:`covshift.analysis.common.seed_pairs`) each variant's runs, labelled e.g.
    "bn (3 seeds)"; every other run alone."""
    seeds = common.seed_pairs(trace)
    if len(seeds) < 2:
        return {run: [run] for run in trace.runs}
    groups = {f"{v} ({len(seeds)} seeds)": [str(r) for r in seeds[v]] for v in ("bn", "nobn")}
    paired = {r for runs in groups.values() for r in runs}
    groups.update({run: [run] for run in trace.runs if run not in paired})
    return groups


def _band(ax: Any, curves: list[tuple[np.ndarray, np.ndarray]], color: str, label: str, style_: str) -> None:
    """One curve per group: the line alone, or the mean over its runs with a min–max band."""
    if len(curves) == 1:
        ax.plot(*curves[0], style_, color=color, lw=1.8 if style_ == "-" else 1.4, ms=3.5, label=label)
        return
    table = pd.concat([pd.Series(v, index=s) for s, v in curves if len(s)], axis=1).sort_index()
    if table.empty:
        return
    steps = table.index.to_numpy()
    ax.fill_between(steps, table.min(axis=1), table.max(axis=1), color=color, alpha=0.2, lw=0)
    ax.plot(steps, table.mean(axis=1), style_, color=color, lw=1.8 if style_ == "-" else 1.4, ms=3.5, label=label)


# figures ---------------------------------------------------------------------------------
def training_loss(trace: Trace) -> Figure:
    """Training loss per step (light: raw, line: the analysis's trailing mean), validation loss
    and validation accuracy, in three side-by-side panels. With several seed pairs each variant
    is one line, the mean over its seeds, in a band from the lowest to the highest seed."""
    groups = _groups(trace)
    colors = style.run_colors(list(groups))
    fig, axes = style.new_figure(1, 3)
    ax_loss, ax_vloss, ax_vacc = axes[0]
    frame = trace.scalars(layer="", metric=["loss", "val_loss", "val_accuracy"])
    windows = []
    collected: dict[str, list[np.ndarray]] = {"loss": [], "val_loss": [], "val_accuracy": []}
    for label, runs in groups.items():
        color = colors[label]
        curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"loss": [], "val_loss": [], "val_accuracy": []}
        for run in runs:
            mine = frame[frame["run"] == run]
            loss = mine[mine["metric"] == "loss"].sort_values("step")
            steps, raw = loss["step"].to_numpy(), loss["value"].to_numpy(dtype=float)
            values = style.finite(raw)
            collected["loss"].append(values)
            kept_steps, kept = common.finite_part(steps, raw)  # what the analysis smooths, the same way
            windows.append(common.window(len(kept)))
            if windows[-1] > 1 and len(runs) == 1:
                ax_loss.plot(steps, values, color=color, alpha=0.25, lw=0.7)
            curves["loss"].append((kept_steps, common.smooth(kept)))
            at = _diverged_at(trace, run, steps, raw)
            finite = ~np.isnan(values)
            if at is not None and finite.any():
                last = np.flatnonzero(finite)[-1]
                ax_loss.plot(steps[last], values[last], "x", color=color, ms=9, mew=2)
                ax_loss.annotate(f"{style.literal(run)} diverged at step {at}", (steps[last], values[last]),
                                 xytext=(-4, 8), textcoords="offset points", ha="right", fontsize=7, color=color)
            for metric in ("val_loss", "val_accuracy"):
                rows = mine[mine["metric"] == metric].sort_values("step")
                v = style.finite(rows["value"].to_numpy(dtype=float))
                collected[metric].append(v)
                if v.size:
                    curves[metric].append((rows["step"].to_numpy(), v))
        for metric, ax, line in (("loss", ax_loss, "-"), ("val_loss", ax_vloss, "o-"), ("val_accuracy", ax_vacc, "o-")):
            if curves[metric]:
                _band(ax, curves[metric], color, style.literal(label), line)
    window = max(windows, default=1)
    title = "training loss" + (f" (line: trailing mean over {window} steps, as the analysis)" if window > 1 else "")
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
            style.empty(ax, f"no {'training loss' if metric == 'loss' else metric} recorded{hint}")
            continue
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if metric != "val_accuracy" and style.spans_decades(data):
            ax.set_yscale("log")
    acc = np.concatenate(collected["val_accuracy"]) if collected["val_accuracy"] else np.array([])
    if np.isfinite(acc).any() and np.nanmax(acc) <= 1.0 and np.nanmin(acc) >= 0.0:
        ax_vacc.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax_vacc.set_ylabel("validation accuracy (%)")
    several = any(len(r) > 1 for r in groups.values())
    fig.suptitle("Training and validation loss per run" + (" (line: mean over seeds; band: lowest to highest seed)"
                                                          if several else ""), fontsize=11)
    style.run_legend(fig, list(groups), colors)
    return fig


def activations(trace: Trace) -> Figure:
    """Mean ± std of each layer's output over training, one panel per run (Glorot & Bengio
    2010, Fig. 2 style). Shows the run's nonlinearity layers when it has any, else every
    layer with statistics; colour encodes depth."""
    runs, info = trace.runs, trace.layer_info()
    colors = style.run_colors(runs)
    fig, axes = style.new_figure(1, max(1, len(runs)), sharey=True)
    everything: list[np.ndarray] = []
    for ax, run in zip(axes[0], runs):
        wide = _wide(trace.scalars(run=run, metric=["mean", "std"]).query("layer != ''"))
        present = set(wide.index.get_level_values("layer")) if not wide.empty else set()
        nonlinear = set(info.loc[(info["run"] == run) & info["nonlinearity"].notna(), "layer"])
        kind = "nonlinearity" if present & nonlinear else "layer"
        layers = style.ordered_layers(info, run, present & nonlinear or present)
        ax.set_title(f"{style.literal(run)}: mean ± std of each {kind}'s output", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("activation (output value)")
        if not layers:
            style.empty(ax, f"no activation statistics recorded for run {run}")
            continue
        shades = style.depth_colors(colors[run], len(layers))
        alpha = max(0.04, 0.3 / math.sqrt(len(layers)))
        for layer, color in zip(layers, shades):
            data = wide.loc[layer]
            steps = data.index.to_numpy()
            mean = style.finite(data["mean"]) if "mean" in data else np.full(len(steps), np.nan)
            std = style.finite(data["std"]) if "std" in data else np.zeros(len(steps))
            ax.plot(steps, mean, color=color, lw=1.2, label=style.literal(layer))
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=alpha, lw=0)
            everything += [mean - std, mean + std]
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        style.depth_key(fig, [ax], layers, shades)
    if everything:
        style.robust_scale(axes[0][0], np.concatenate(everything))
    fig.suptitle("Activations over training (line: mean, band: ± one standard deviation)", fontsize=11)
    style.run_legend(fig, runs, colors)
    return fig


DEPTHS = (0.0, 0.5, 1.0)  #: the nonlinearities whose input percentiles.png shows: first, middle, last


def _inputs(trace: Trace, runs: list[str]) -> list[tuple[str, dict[str, str]]]:
    """Rows of percentiles.png: (role, {run: layer}) for the inputs of the first, middle and
    last nonlinearity (:mod:`covshift.analysis.pairing`; a bn and a nobn run matched by role,
    any other run by its own order); [] when a run has no recorded nonlinearity input."""
    info = trace.layer_info()
    seeds = common.seed_pairs(trace)
    mates = {r: r for r in runs}
    if len(seeds) and {str(seeds["bn"].iloc[0]), str(seeds["nobn"].iloc[0])} <= set(runs):
        mates[str(seeds["nobn"].iloc[0])] = str(seeds["bn"].iloc[0])
    per_run = {}
    for run in runs:
        table = pairing.pairs(info, mates[run], run)
        per_run[run] = table.loc[table["kind"] == "input", "nobn"].astype(str).tolist()
    count = min((len(v) for v in per_run.values()), default=0)
    if count == 0:
        return []
    picks = list(dict.fromkeys(round(f * (count - 1)) for f in DEPTHS))
    return [(f"input to nonlinearity {k + 1}", {run: per_run[run][k] for run in runs}) for k in picks]


def percentiles(trace: Trace, layer: str | None = None) -> Figure:
    """15th, 50th and 85th percentiles over training, one column per run on a shared y axis per
    row (Ioffe & Szegedy 2015, Fig. 1): by default of the *inputs* of the first, middle and last
    nonlinearity (one row each; the BatchNorm output in bn, the Linear/Conv output in nobn),
    else of ``layer``; a run without a recorded nonlinearity input shows its last layer."""
    runs, info = trace.runs, trace.layer_info()
    colors = style.run_colors(runs)
    if layer is not None and layer not in set(info["layer"]):
        raise ValueError(f"no layer {layer!r} in {trace.path}; layers: {', '.join(trace.layers)}")
    rows = [("layer", {run: layer for run in runs})] if layer is not None else _inputs(trace, runs)
    if not rows:
        rows = [("last layer", {run: style.pick_layers(info, run, [1.0])[0] for run in runs})]
    fig, axes = style.new_figure(len(rows), max(1, len(runs)), height=max(style.HEIGHT, 2.8 * len(rows) + 0.8),
                                 sharex="col", sharey="row")
    explained = False
    for i, (role, names) in enumerate(rows):
        everything: list[np.ndarray] = []
        for ax, run in zip(axes[i], runs):
            name = names[run]
            kind = style.layer_type(info, run, name) if name is not None else ""
            if role.startswith("input"):
                what = f"{role} ({style.literal(name)}" + (f", {style.literal(kind)})" if kind else ")")
            else:
                what = f"layer {style.literal(name)}" + (f" ({style.literal(kind)})" if kind else "")
            ax.set_title(f"{style.literal(run)}: {what}", fontsize=9)
            if i == len(rows) - 1:
                ax.set_xlabel("step")
            ax.set_ylabel("value")
            wide = _wide(trace.scalars(run=run, layer=name, metric=["p15", "p50", "p85"])) if name else pd.DataFrame()
            if wide.empty:
                style.empty(ax, f"no percentiles of layer {name} in run {run}")
                continue
            data = wide.loc[name]
            steps = data.index.to_numpy()
            p = {q: style.finite(data[q]) if q in data else np.full(len(steps), np.nan) for q in ("p15", "p50", "p85")}
            color = colors[run]
            ax.fill_between(steps, p["p15"], p["p85"], color=color, alpha=0.15, lw=0)
            ax.plot(steps, p["p85"], "--", color=color, lw=1, label="85th percentile")
            ax.plot(steps, p["p50"], "-", color=color, lw=1.8, label="50th (median)")
            ax.plot(steps, p["p15"], ":", color=color, lw=1.2, label="15th percentile")
            everything += list(p.values())
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if not explained:  # the first panel with data explains the lines
                ax.legend(fontsize=7, loc="best")
                explained = True
        if everything:
            style.robust_scale(axes[i][0], np.concatenate(everything))
    fig.suptitle("15th, 50th and 85th percentiles over training"
                 + (" of the inputs of the first, middle and last nonlinearity (Ioffe & Szegedy 2015, Fig. 1)"
                    if rows[0][0].startswith("input") else ""), fontsize=11)
    style.run_legend(fig, runs, colors)
    return fig


def saturation(trace: Trace) -> Figure:
    """Fraction of saturated outputs (top row) and gain (bottom row) of every nonlinearity
    layer over training, one column per run; shade encodes depth (darkest: last layer)."""
    runs, info = trace.runs, trace.layer_info()
    colors = style.run_colors(runs)
    fig, axes = style.new_figure(2, max(1, len(runs)), height=6.0, sharex="col", sharey="row")
    for col, run in enumerate(runs):
        top, bottom = axes[0][col], axes[1][col]
        wide = _wide(trace.scalars(run=run, metric=["saturation", "gain"]).query("layer != ''"))
        layers = style.ordered_layers(info, run, set(wide.index.get_level_values("layer"))) if not wide.empty else []
        shades = style.depth_colors(colors[run], len(layers))
        for ax, metric, ylabel, what in ((top, "saturation", "fraction saturated", "fraction saturated"),
                                         (bottom, "gain", "gain (mean f′ / max f′)", "gain")):
            ax.set_title(f"{style.literal(run)}: {what} per layer", fontsize=10)
            if ax is bottom:  # the columns share their step axis
                ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            if not layers:
                style.empty(ax, f"no saturation recorded for run {run} (no bounded or ReLU-family "
                            "nonlinearity modules)")
                continue
            for name, color in zip(layers, shades):
                data = wide.loc[name]
                if metric in data:
                    ax.plot(data.index.to_numpy(), style.finite(data[metric]), color=color, lw=1.3,
                            label=style.literal(name))
            ax.set_ylim(-0.03, 1.03)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        style.depth_key(fig, [top, bottom], layers, shades)
    fig.suptitle("Saturation (share of outputs where f′ < 10% of its maximum) and gain", fontsize=11)
    style.run_legend(fig, runs, colors)
    return fig


def gradient_flow(trace: Trace) -> Figure:
    """Heat maps of log10 of the loss gradient's rms at each layer's output (layer x step; the
    quantity the gradient-flow ratio divides), one per run side by side, on one shared colour
    scale; input layers at the top."""
    runs, info = trace.runs, trace.layer_info()
    colors = style.run_colors(runs)
    grids: list[tuple[str, list[str], np.ndarray, np.ndarray]] = []
    for run in runs:
        frame = trace.scalars(run=run, metric="grad_rms").query("layer != ''")
        if frame.empty:
            grids.append((run, [], np.array([]), np.empty((0, 0))))
            continue
        table = frame.groupby(["layer", "step"], observed=True)["value"].last().unstack("step")
        layers = style.ordered_layers(info, run, set(table.index))
        table = table.reindex(layers)
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = style.finite(np.log10(table.to_numpy(dtype=float)))
        grids.append((run, layers, table.columns.to_numpy(), logs))
    values = np.concatenate([g[3].ravel() for g in grids]) if grids else np.array([])
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    most = max((len(g[1]) for g in grids), default=0)
    height = style.HEIGHT + max(0.0, 0.12 * (min(most, style.MAX_LABELS) - 10))
    fig, axes = style.new_figure(1, max(1, len(runs)), height=height)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=style.MASKED)
    mesh = None
    for ax, (run, layers, steps, logs) in zip(axes[0], grids):
        ax.set_title(f"{style.literal(run)}: gradient rms per layer", fontsize=10, color=colors[run])
        ax.set_xlabel("step")
        ax.set_ylabel("layer (forward order)")
        if not layers:
            style.empty(ax, f"no gradients recorded for run {run}")
            continue
        mesh = ax.pcolormesh(style.step_edges(steps), np.arange(len(layers) + 1) - 0.5, np.ma.masked_invalid(logs),
                             cmap=cmap, vmin=vmin, vmax=vmax, shading="flat", rasterized=True)
        ax.set_ylim(len(layers) - 0.5, -0.5)
        shown = style.thin(len(layers))
        kinds = [style.layer_type(info, run, layers[i]) for i in shown]
        ax.set_yticks(shown, labels=[style.literal(layers[i]) + (f" ({style.literal(k)})" if k else "")
                                     for i, k in zip(shown, kinds)], fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if mesh is not None:
        fig.colorbar(mesh, ax=list(axes[0]), fraction=0.03, pad=0.01).set_label("log10 rms(∂L/∂y)")
    fig.suptitle("Gradient flow: log10 of the loss gradient's rms at each layer's output "
                 "(grey: zero or not finite)", fontsize=11)
    style.run_legend(fig, runs, colors)
    return fig


def save_all(trace: Trace, shift: pd.DataFrame | None, out_dir: str | os.PathLike[str],
             only: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Write the seven figures (or the ``only`` ones, by key of :data:`FILES`) as PNGs into
    ``out_dir`` (created when missing), leaving out a figure with no data in any panel. Returns
    file name (e.g. ``"activations.png"``) -> path of each written."""
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
        fig = build()
        if style.is_placeholder(fig):  # nothing to show: the report says so in words instead
            fig.clear()
            continue
        path = out / FILES[key]
        fig.savefig(path, dpi=style.DPI)
        fig.clear()
        written[FILES[key]] = path
    return written
