"""The gradient-based internal covariate shift and loss-landscape measurements in a report:
their two figures and the claim rows they decide (Santurkar et al. 2018).

The measurements themselves are taken while training by :mod:`covshift.ics`
(``covshift trace --ics-every N``) and stored as layer metrics ``ics_l2``, ``ics_rel``,
``ics_cos`` and run metrics ``loss_variation``, ``grad_predictiveness``,
``beta_smoothness``. Both functions here return nothing when a trace has none.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from . import plots
from .store import Trace

LAYER = ("ics_l2", "ics_cos")
RUN = ("loss_variation", "grad_predictiveness", "beta_smoothness")
FILES = {"ics": "ics.png", "landscape": "landscape.png"}
LABELS = {"ics_l2": "‖G − G′‖₂", "ics_cos": "cos(G, G′)", "loss_variation": "loss variation (max − min)",
          "grad_predictiveness": "max ‖∇L(θ) − ∇L(θ − ηg)‖₂", "beta_smoothness": "effective β-smoothness"}


def _frame(trace: Trace, metrics: tuple[str, ...]) -> pd.DataFrame:
    frame = trace.scalars(metric=list(metrics))
    return frame[np.isfinite(frame["value"].to_numpy(dtype=float))]


def save_figures(trace: Trace, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """``ics.png`` (per layer, ‖G − G′‖ and cos over training, one column per run, Santurkar
    et al. Figure 5 style) and ``landscape.png`` (the three landscape measures over training,
    all runs per panel, their Figure 4 style); nothing when the trace holds no measurement."""
    out = Path(out_dir)
    written: dict[str, Path] = {}
    colors = plots.run_colors(trace.runs)
    layers = _frame(trace, LAYER)
    if not layers.empty:
        runs = [r for r in trace.runs if r in set(layers["run"])]
        fig, axes = plots.new_figure(len(LAYER), len(runs), sharex=True)
        order = trace.layer_info()
        for col, run in enumerate(runs):
            names = [n for n in order.loc[order["run"] == run, "layer"] if n in set(layers["layer"])]
            shades = plots.depth_colors(colors[run], len(names))
            for row, metric in enumerate(LAYER):
                ax = axes[row, col]
                for name, shade in zip(names, shades):
                    rows = layers[(layers["run"] == run) & (layers["layer"] == name) & (layers["metric"] == metric)]
                    ax.plot(rows["step"], rows["value"], marker="o", markersize=3, color=shade, label=plots.literal(name))
                if metric == "ics_l2" and plots.spans_decades(layers.loc[layers["metric"] == metric, "value"]):
                    ax.set_yscale("log")
                ax.set_title(f"{plots.literal(run)}: {LABELS[metric]} per layer")
                ax.set_ylabel(LABELS[metric])
                ax.set_xlabel("step")
                ax.grid(alpha=0.3)
            axes[0, col].legend(title="layer", fontsize="x-small", ncol=2)
        fig.suptitle("Internal covariate shift (Santurkar et al. 2018): gradient of a layer before (G) and after "
                     "(G′) the layers below it take their step")
        written[FILES["ics"]] = _save(fig, out / FILES["ics"])
    run_rows = _frame(trace, RUN)
    if not run_rows.empty:
        fig, axes = plots.new_figure(1, len(RUN))
        for ax, metric in zip(axes[0], RUN):
            for run in trace.runs:
                rows = run_rows[(run_rows["run"] == run) & (run_rows["metric"] == metric)]
                if not rows.empty:
                    ax.plot(rows["step"], rows["value"], marker="o", markersize=3, color=colors[run],
                            label=plots.literal(run))
            if plots.spans_decades(run_rows.loc[run_rows["metric"] == metric, "value"]):
                ax.set_yscale("log")
            ax.set_title(LABELS[metric])
            ax.set_xlabel("step")
            ax.set_ylabel(LABELS[metric])
            ax.grid(alpha=0.3)
        axes[0, 0].legend(title="run")
        fig.suptitle("Loss landscape along the update direction (Santurkar et al. 2018)")
        written[FILES["landscape"]] = _save(fig, out / FILES["landscape"])
    return written


def _save(fig: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=plots.DPI)  # type: ignore[attr-defined]
    return path


def _median(frame: pd.DataFrame, run: str, metric: str, layers: set[str] | None = None) -> float:
    rows = frame[(frame["run"] == run) & (frame["metric"] == metric)]
    if layers is not None:
        rows = rows[rows["layer"].isin(layers)]
    return float(rows["value"].median()) if not rows.empty else float("nan")


def claim_rows(trace: Trace, bn: str, nobn: str, margin: float) -> dict[str, tuple[str, str, str]]:
    """Claim -> (verdict, evidence, figure) for "reduced internal covariate shift" (when ICS
    was measured in both runs) and "smoother loss landscape" (when the landscape was)."""
    out: dict[str, tuple[str, str, str]] = {}
    layers = _frame(trace, ("ics_rel",))
    shared = set(layers.loc[layers["run"] == bn, "layer"]) & set(layers.loc[layers["run"] == nobn, "layer"])
    if shared:
        b, n = _median(layers, bn, "ics_rel", shared), _median(layers, nobn, "ics_rel", shared)
        less = b <= (1 - margin) * n
        evidence = (f"median ‖G − G′‖ / ‖G‖ over the {len(shared)} layers both runs share and the measured steps: "
                    f"bn {b:.3g}, nobn {n:.3g} (gradient-based ICS, Santurkar et al. 2018)")
        if not less:
            evidence += "; BatchNorm did not reduce it here, as Santurkar et al. also found"
        out["reduced internal covariate shift"] = ("supported" if less else "not supported", evidence, FILES["ics"])
    runs = _frame(trace, RUN)
    if {bn, nobn} <= set(runs["run"]):
        pairs = {m: (_median(runs, bn, m), _median(runs, nobn, m)) for m in ("beta_smoothness", "grad_predictiveness")}
        smoother = all(b <= (1 - margin) * n for b, n in pairs.values())
        evidence = "; ".join(f"median {LABELS[m]}: bn {b:.3g}, nobn {n:.3g}" for m, (b, n) in pairs.items())
        out["smoother loss landscape"] = ("supported" if smoother else "not supported", evidence, FILES["landscape"])
    return out
