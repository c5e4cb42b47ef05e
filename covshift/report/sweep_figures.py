"""The figures of a sweep: ``lr_sensitivity.png`` and ``init_sensitivity.png`` (final loss, final
validation accuracy and steps to threshold against the learning rate and the init scale) and
``sweep_grid.png`` (the mean final loss over the whole grid). The quantities are those of
:mod:`covshift.analysis.sweep_tables`.

Markers: × above a panel, a setting where some seed diverged; a hollow circle, a setting
where some seed did not train (run outcomes); △ in the steps panel, a setting where some
non-diverged seed never reached the threshold. ``lr_sensitivity.png`` also draws, in the
panel of the sweep's final metric, each variant's tolerance limit per seed (dashed: the
value a run must reach to be usable) and its usable learning rate per seed (▼).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import colors as mcolors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import PercentFormatter
from matplotlib.transforms import blended_transform_factory

from ..analysis import sweep_tables
from ..analysis.sweep_tables import ACCURACY_TOLERANCE, FILES, LOSS_TOLERANCE, SweepAnalysis, fmt_g
from . import style


def _log_ticks(ax: Any, values: list[float]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(values, labels=[fmt_g(v) for v in values])
    ax.minorticks_off()


Marks = Callable[[dict[str, Any], dict[str, Any]], list[tuple[Line2D, str]]]
FINAL_LOSS = "final training loss\n(mean of the last 10% of mini-batch losses)"


def _sensitivity(table: pd.DataFrame, x: str, xlabel: str, title: str, threshold: float,
                 marks: Marks | None = None) -> Figure:
    """Three panels against ``x`` (log scale): final loss, final validation accuracy, steps to threshold.
    ``marks(axes by metric, colors)`` draws more and returns its legend entries."""
    fig, axes = style.new_figure(1, 3)
    variants = sweep_tables.variants(table)
    colors = style.run_colors(variants)
    panels = (("final_loss", FINAL_LOSS), ("final_accuracy", "final validation accuracy"),
              ("steps_to_threshold", f"steps until smoothed loss ≤ {threshold:.3g}"))
    grid = sorted(set(table[x]))
    legend = [(Line2D([], [], color=colors[v], lw=2, marker="o", ms=4), v) for v in variants]
    for ax, (metric, label) in zip(axes[0], panels):
        drawn = False
        mark = blended_transform_factory(ax.transData, ax.transAxes)
        for k, v in enumerate(variants):
            rows = table[table["variant"] == v].sort_values(x)
            xs, ys = rows[x].to_numpy(dtype=float), rows[metric].to_numpy(dtype=float)
            alive = (rows["runs"] - rows["diverged"]).to_numpy()
            if np.isfinite(ys).any():
                several = int(alive.max()) > 1
                err = np.vstack([ys - rows[f"{metric}_min"].to_numpy(dtype=float),
                                 rows[f"{metric}_max"].to_numpy(dtype=float) - ys]) if several else None
                xs = xs * 10 ** (0.012 * (k - (len(variants) - 1) / 2))  # side by side where they coincide
                ax.errorbar(xs, ys, yerr=None if err is None else np.maximum(err, 0), color=colors[v], marker="o",
                            ms=4, lw=1.6, capsize=3)
                failed = (rows["trains"].to_numpy() < alive) & np.isfinite(ys)
                if failed.any():
                    ax.plot(xs[failed], ys[failed], ls="", marker="o", ms=8, mfc="white", mec=colors[v], mew=1.5)
                drawn = True
            div = rows[rows["diverged"] > 0]
            if len(div):
                ax.plot(div[x], [0.95 - 0.07 * k] * len(div), "x", color=colors[v], ms=8, mew=2,
                        transform=mark, clip_on=False)
            never = rows[rows["reached"] < rows["runs"] - rows["diverged"]]
            if metric == "steps_to_threshold" and len(never):
                ax.plot(never[x], [0.81 - 0.07 * k] * len(never), "^", color=colors[v], mfc="white", ms=7,
                        transform=mark, clip_on=False)
        _log_ticks(ax, grid)
        ax.set_xlabel(xlabel)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "no value: every run diverged or none logged it", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="0.35")
        elif metric == "final_loss" and style.spans_decades(table[metric]):
            ax.set_yscale("log")
        elif metric == "final_accuracy":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    for shown, label, marker in ((table["diverged"] > 0, "diverged (any seed)", dict(marker="x", mew=2)),
                                 (table["trains"] < table["runs"] - table["diverged"],
                                  "did not train (any seed; run outcomes)", dict(marker="o", mfc="white")),
                                 (table["reached"] < table["runs"] - table["diverged"],
                                  f"never reached loss {threshold:.3g} (any seed)", dict(marker="^", mfc="white"))):
        if shown.any():
            legend.append((Line2D([], [], color="0.3", ls="", ms=8, **marker), label))
    if marks is not None:
        legend += marks(dict(zip((p[0] for p in panels), axes[0])), colors)
    fig.legend(*zip(*legend), loc="outside lower center", ncol=min(4, len(legend)), frameon=False, fontsize=9)
    fig.suptitle(title, fontsize=11)
    return fig


def _usable_marks(sa: SweepAnalysis) -> Marks:
    """Each variant's tolerance limits and usable learning rates per seed, in the final-metric panel."""
    def draw(axes: dict[str, Any], colors: dict[str, Any]) -> list[tuple[Line2D, str]]:
        t = sa.by_seed
        if t is None or t.empty:
            return []
        ax = axes[sa.metric]
        mark = blended_transform_factory(ax.transData, ax.transAxes)
        for k, (v, rows) in enumerate(t.groupby("variant", sort=True, observed=True)):
            for value in sorted(set(rows["limit"].dropna())):
                ax.axhline(value, color=colors.get(v, "0.3"), ls="--", lw=1, alpha=0.8)
            lrs = rows["usable_lr"].dropna()
            if len(lrs):  # an empty unclipped line would sit at the figure's origin and wreck the layout
                ax.plot(lrs, [0.05 + 0.07 * k] * len(lrs), "v", color=colors.get(v, "0.3"), ms=9,
                        transform=mark, clip_on=False)
        rule = (f"best − {100 * ACCURACY_TOLERANCE:g} points" if sa.metric == "final_accuracy"
                else f"best × {1 + LOSS_TOLERANCE:g}")
        return [(Line2D([], [], color="0.3", ls="--", lw=1), f"usable limit: {rule} (per variant and seed)"),
                (Line2D([], [], color="0.3", ls="", marker="v", ms=9), "usable learning rate (per seed)")]
    return draw


def lr_sensitivity(sa: SweepAnalysis) -> Figure:
    """Final loss, final validation accuracy and steps to threshold against the learning rate,
    with the usable-lr limits and the usable learning rates."""
    seeds = len(sweep_tables.seeds(sa))
    return _sensitivity(sa.lr, "lr", "learning rate", f"Learning-rate sensitivity at init scale {fmt_g(sa.init_scale)}"
                        + (f" (mean and min..max over {seeds} seeds)" if seeds > 1 else ""), sa.threshold,
                        _usable_marks(sa))


def init_sensitivity(sa: SweepAnalysis) -> Figure:
    """The same three panels against the init scale, at the reference learning rate."""
    seeds = len(sweep_tables.seeds(sa))
    return _sensitivity(sa.init, "init_scale", "init scale",
                        f"Init-scale sensitivity at learning rate {fmt_g(sa.ref_lr)}"
                        + (f" (mean and min..max over {seeds} seeds)" if seeds > 1 else ""), sa.threshold)


def sweep_grid(sa: SweepAnalysis) -> Figure:
    """Heat map of the mean final loss over learning rate × init scale, one panel per variant."""
    runs = sa.runs
    variants = sweep_tables.variants(runs)
    lrs, scales = sorted(set(runs["lr"])), sorted(set(runs["init_scale"]))
    cells = sweep_tables.aggregate(runs, ["variant", "init_scale", "lr"])
    fig, axes = style.new_figure(1, max(1, len(variants)), height=max(3.0, 0.45 * len(scales) + 2.0))
    values = cells["final_loss"].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size and style.spans_decades(finite) and finite.min() > 0:
        norm: mcolors.Normalize = mcolors.LogNorm(finite.min(), finite.max())
    else:
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm = mcolors.Normalize(lo, hi if hi > lo else lo + 1.0)
    cmap = sns.color_palette("rocket_r", as_cmap=True).with_extremes(bad=style.MASKED)
    for ax, v in zip(axes[0], variants):
        mine = cells[cells["variant"] == v].set_index(["init_scale", "lr"])
        grid = np.full((len(scales), len(lrs)), np.nan)
        for i, s in enumerate(scales):
            for j, lr in enumerate(lrs):
                if (s, lr) not in mine.index:
                    ax.text(j, i, "–", ha="center", va="center", fontsize=8, color="0.3")
                    continue
                c = mine.loc[(s, lr)]
                n, d, mean = int(c["runs"]), int(c["diverged"]), float(c["final_loss"])
                flat = n - d - int(c["trains"])
                grid[i, j] = mean
                text = "div" if d == n else f"{mean:.3g}" + (f"\ndiv {d}/{n}" if d else "") + (
                    f"\nuntrained {flat}/{n}" if flat else "")
                dark = math.isfinite(mean) and sum(cmap(norm(mean))[:3]) < 1.5
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", origin="lower")
        ax.set_xticks(range(len(lrs)), labels=[fmt_g(x) for x in lrs])
        ax.set_yticks(range(len(scales)), labels=[fmt_g(x) for x in scales])
        ax.set_xlabel("learning rate")
        ax.set_ylabel("init scale")
        ax.set_title(f"{style.literal(v)}: final training loss, mean over seeds", fontsize=10,
                     color=style.run_colors([v])[v])
    fig.colorbar(ScalarMappable(norm, cmap), ax=axes.ravel().tolist(), fraction=0.03, pad=0.01).set_label(
        "final training loss (mean of the last\n10% of mini-batch losses, training mode)")
    fig.suptitle("The sweep grid (grey \"div\": every seed diverged; \"untrained\": seeds that did not train)",
                 fontsize=11)
    return fig


def save_sweep_figures(sa: SweepAnalysis, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write lr_sensitivity.png, init_sensitivity.png and sweep_grid.png; file name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for key, build in (("lr", lr_sensitivity), ("init", init_sensitivity), ("grid", sweep_grid)):
        path = out / FILES[key]
        fig = build(sa)
        fig.savefig(path, dpi=style.DPI)
        fig.clear()
        written[FILES[key]] = path
    return written
