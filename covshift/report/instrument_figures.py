"""The figures of the gradient-based internal covariate shift and loss-landscape measurements
(Santurkar et al. 2018): ``ics.png`` and ``landscape.png``.

The measurements are taken while training by :mod:`covshift.ics` (``covshift trace
--ics-every N``); :mod:`covshift.analysis.claims` reads them and decides the claim rows they
bear on. :func:`save_figures` draws nothing when a trace has none.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from ..analysis.instruments import ICS_FILES, ICS_LABELS, ICS_RUN_METRICS, measurements
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


def save_figures(trace: Trace, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """``ics.png`` (per layer, ‖G − G′‖ / ‖G‖ and cos over training, one column per run on shared
    axes, each run's first layer left out since its ICS is 0 by definition; Santurkar et al.
    Figure 5 style) and ``landscape.png`` (the three landscape measures over training,
    all runs per panel, their Figure 4 style); nothing when the trace holds no measurement."""
    out = Path(out_dir)
    written: dict[str, Path] = {}
    colors = style.run_colors(trace.runs)
    fig = ics_figure(trace)
    if fig is not None:
        written[ICS_FILES["ics"]] = style.save(fig, out / ICS_FILES["ics"])
    run_rows = measurements(trace, ICS_RUN_METRICS)
    if not run_rows.empty:
        fig, axes = style.new_figure(1, len(ICS_RUN_METRICS))
        for ax, metric in zip(axes[0], ICS_RUN_METRICS):
            for run in trace.runs:
                rows = run_rows[(run_rows["run"] == run) & (run_rows["metric"] == metric)]
                if not rows.empty:
                    ax.plot(rows["step"], rows["value"], marker="o", markersize=3, color=colors[run],
                            label=style.literal(run))
            if style.spans_decades(run_rows.loc[run_rows["metric"] == metric, "value"]):
                ax.set_yscale("log")
            ax.set_title(ICS_LABELS[metric])
            ax.set_xlabel("step")
            ax.set_ylabel(ICS_LABELS[metric])
            ax.grid(alpha=0.3)
        axes[0, 0].legend(title="run")
        fig.suptitle("Loss landscape along the update direction (Santurkar et al. 2018)")
        written[ICS_FILES["landscape"]] = style.save(fig, out / ICS_FILES["landscape"])
    return written
