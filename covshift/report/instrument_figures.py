"""The figures of the gradient-based internal covariate shift and loss-landscape measurements
(Santurkar et al. 2018): ``ics.png`` and ``landscape.png``.

The measurements are taken while training by :mod:`covshift.ics` (``covshift trace
--ics-every N``); :mod:`covshift.analysis.claims` reads them and decides the claim rows they
bear on. :func:`save_figures` draws nothing when a trace has none.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..analysis.instruments import ICS_FILES, ICS_LABELS, measurements
from ..store import Trace
from . import style


LAYER = ("ics_rel", "ics_cos")  # ics_rel is the quantity the claim uses


def ics_figure(trace: Trace) -> Figure | None:
    """The ``ics.png`` figure (see :func:`save_figures`), or None without ICS measurements."""
    colors = style.run_colors(trace.runs)
    layers = measurements(trace, LAYER)
    if layers.empty:
        return None
    runs = [r for r in trace.runs if r in set(layers["run"])]
    fig, axes = style.new_figure(len(LAYER), len(runs), sharex=True, sharey="row")
    order = trace.layer_info()
    for col, run in enumerate(runs):
        names = [n for n in order.loc[order["run"] == run, "layer"] if n in set(layers["layer"])][1:]
        shades = style.depth_colors(colors[run], len(names))
        for row, metric in enumerate(LAYER):
            ax = axes[row, col]
            for name, shade in zip(names, shades):
                rows = layers[(layers["run"] == run) & (layers["layer"] == name) & (layers["metric"] == metric)]
                ax.plot(rows["step"], rows["value"], marker="o", markersize=3, color=shade,
                        label=style.literal(name))
            if metric == "ics_rel" and style.spans_decades(layers.loc[layers["metric"] == metric, "value"]):
                ax.set_yscale("log")
            ax.set_title(f"{style.literal(run)}: {ICS_LABELS[metric]} per layer")
            ax.set_ylabel(ICS_LABELS[metric])
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0, col].legend(title="layer", fontsize="x-small", ncol=2)
    fig.suptitle("Internal covariate shift (Santurkar et al. 2018): gradient of a layer before (G) and after "
                 "(G′) the layers below it take their step")
    return fig


#: landscape.png's panels: title, y label, the band's (low, high) metrics or None, the line's metric.
PANELS = (("loss along −∇L", "loss L(θ − ηg)", ("landscape_loss_min", "landscape_loss_max"), "loss_variation"),
          ("gradient predictiveness", "‖∇L(θ) − ∇L(θ − ηg)‖₂", ("grad_predictiveness_min", "grad_predictiveness"),
           "grad_predictiveness"),
          ("effective β-smoothness", ICS_LABELS["beta_smoothness"], None, "beta_smoothness"))


def landscape_figure(trace: Trace) -> Figure | None:
    """The ``landscape.png`` figure (see :func:`save_figures`), or None without landscape measurements."""
    rows = measurements(trace)
    rows = rows[rows["layer"] == ""]
    if rows.empty:
        return None
    colors = style.run_colors(trace.runs)
    fig, axes = style.new_figure(1, len(PANELS))
    for ax, (title, ylabel, band, line) in zip(axes[0], PANELS):
        shown = []
        for run in trace.runs:
            mine = rows[rows["run"] == run].pivot_table(index="step", columns="metric", values="value", aggfunc="last", observed=True)
            if band and set(band) <= set(mine.columns):
                low, high = mine[band[0]], mine[band[1]]
                ax.fill_between(low.index, low, high, color=colors[run], alpha=0.3, lw=0, label=style.literal(run))
                shown += [low.to_numpy(), high.to_numpy()]
            elif line in mine.columns:  # traces recorded before the bands' bounds were
                ax.plot(mine.index, mine[line], marker="o", markersize=3, color=colors[run], label=style.literal(run))
                shown.append(mine[line].to_numpy())
        if shown and style.spans_decades(np.concatenate(shown)):
            ax.set_yscale("log")
        ax.set_title(title + (" (band: min to max over the step sizes)" if band else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(title="run")
    fig.suptitle("Loss landscape along the update direction θ − ηg over the measured step sizes η "
                 "(Santurkar et al. 2018, Fig. 4)")
    return fig


def save_figures(trace: Trace, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """``ics.png`` (per layer, ‖G − G′‖ / ‖G‖ and cos over training, one column per run on shared
    axes, each run's first layer left out since its ICS is 0 by definition; Santurkar et al.
    Figure 5 style) and ``landscape.png`` (Santurkar et al. Figure 4 style: the bands from the
    lowest to the highest loss and gradient change along −∇L over the step sizes, and the
    effective β-smoothness, all runs per panel); nothing when the trace holds no measurement."""
    out = Path(out_dir)
    written: dict[str, Path] = {}
    for key, build in (("ics", ics_figure), ("landscape", landscape_figure)):
        fig = build(trace)
        if fig is not None:
            written[ICS_FILES[key]] = style.save(fig, out / ICS_FILES[key])
    return written
