"""What every figure of a report shares: run colours, the figure canvas and its size, and
helpers for scales, empty panels, legends and layer labels.

Conventions shared by every figure:

- each run has one colour (:func:`run_colors`); a figure legend maps colours to runs;
- layers are in forward order; where a run's layers are drawn as several lines, their
  colour goes from pale (first layer) to the run's colour (last layer);
- at most ``MAX_LABELS`` layer names are written on an axis or colour bar;
- non-finite values are masked (gaps in lines, grey cells in heat maps);
- names are escaped, so a ``$`` in a layer name is printed, not read as mathtext.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import colors as mcolors
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

_COLORBLIND: list[str] = sns.color_palette("colorblind").as_hex()
#: Fixed run colours (seaborn "colorblind": blue and vermillion). Other runs: :func:`run_colors`.
PALETTE: dict[str, str] = {"bn": _COLORBLIND[0], "nobn": _COLORBLIND[3]}
_OTHER_COLORS: list[str] = [c for c in _COLORBLIND if c not in PALETTE.values()]
WIDTH, HEIGHT, DPI = 12.0, 4.0, 100
MAX_LABELS = 20  # most layer names written along one axis
_LEGEND_LAYERS = 10  # up to this many layers get a legend, more get a colour bar
MASKED = "#d9d9d9"  # masked heat-map cells


# helpers ---------------------------------------------------------------------------------
def variant(run: str) -> str | None:
    """"bn" or "nobn" when the run's name is one of them or starts with one and a space, as
    the runs of ``covshift trace --seeds`` (``bn seed=1``) and ``covshift sweep`` are named."""
    first = str(run).split(" ", 1)[0]
    return first if first in PALETTE else None


def run_colors(runs: Sequence[str]) -> dict[str, str]:
    """One colour per run: ``PALETTE`` for the bn and nobn runs (:func:`variant`: every seed of
    a variant shares its colour), other runs take the remaining seaborn "colorblind" colours
    in the order given (the order of ``trace.runs``)."""
    others = [r for r in runs if variant(r) is None]
    colors = {r: _OTHER_COLORS[i % len(_OTHER_COLORS)] for i, r in enumerate(others)}
    return {r: PALETTE[v] if (v := variant(r)) else colors[r] for r in runs}


def literal(text: object) -> str:
    """Text printed literally: every ``$`` escaped, so mathtext never parses a name."""
    return str(text).replace("$", r"\$")


def new_figure(rows: int, cols: int, height: float = HEIGHT, **share: bool | str) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure on an Agg canvas and its (rows, cols) axes grid."""
    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False, **share)


def finite(values: object) -> np.ndarray:
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


def robust_scale(ax: Axes, values: object) -> None:
    """Symmetric log scale when a few huge values (a diverging run) would flatten the rest."""
    v = np.abs(np.asarray(values, dtype=float).ravel())
    v = v[np.isfinite(v)]
    if v.size == 0:
        return
    typical = float(np.median(v))
    if typical > 0 and v.max() > 1e3 * typical:
        ax.set_yscale("symlog", linthresh=typical)


EMPTY = "covshift-empty"  #: the gid of a panel that has no data (see :func:`is_placeholder`)


def empty(ax: Axes, message: str) -> None:
    """Mark a panel as having no data, keeping its axis labels."""
    ax.set_gid(EMPTY)
    ax.text(0.5, 0.5, literal(message), ha="center", va="center", transform=ax.transAxes,
            fontsize=9, color="0.35", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def is_placeholder(fig: Figure) -> bool:
    """Whether every panel of ``fig`` (colour bars aside) says it has no data: such a figure is
    not written into a report."""
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    return bool(panels) and all(ax.get_gid() == EMPTY for ax in panels)


def run_legend(fig: Figure, runs: Sequence[str], colors: dict[str, str]) -> None:
    """A figure legend mapping each run's colour to its name."""
    handles = [Line2D([], [], color=colors[r], lw=2.5) for r in runs]
    fig.legend(handles, [f"run {literal(r)}" for r in runs], loc="outside lower center",
               ncol=max(1, len(runs)), frameon=False, fontsize=9)


def thin(n: int, most: int = MAX_LABELS) -> list[int]:
    """Indices of at most ``most`` of ``n`` evenly spaced labels, always the last one."""
    if n <= 0:
        return []
    k = max(1, math.ceil(n / most))
    return list(range(n - 1, -1, -k))[::-1]


def depth_colors(color: str, n: int) -> list[str]:
    """``n`` colours from pale (first layer) to ``color`` (last layer); from
    ``_LEGEND_LAYERS`` layers on, from pale through ``color`` to a dark shade of it, so that
    neighbouring layers stay apart."""
    if n <= 1:
        return [color] * n
    rgb = np.array(mcolors.to_rgb(color))
    pale = rgb + (1.0 - rgb) * (0.8 if n >= _LEGEND_LAYERS else 0.7)
    stops = [pale, rgb, rgb * 0.45] if n >= _LEGEND_LAYERS else [pale, rgb]
    cmap = mcolors.LinearSegmentedColormap.from_list("depth", stops)
    ramp = [mcolors.to_hex(cmap(t)) for t in np.linspace(0.0, 1.0, n)]
    ramp[(n - 1) // 2 if len(stops) == 3 else -1] = color
    return ramp


def depth_key(fig: Figure, axes: Sequence[Axes], names: Sequence[str], colors: Sequence[str]) -> None:
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
    shown = thin(n)
    bar.set_ticks(shown, labels=[literal(names[i]) for i in shown])
    bar.ax.tick_params(labelsize=6, length=2)
    bar.ax.invert_yaxis()
    bar.set_label("layer (forward order)", fontsize=8)
    for ax in axes:  # name the first and the last layer on their lines
        lines = {line.get_label(): line for line in ax.get_lines()}
        for name in (names[0], names[-1]):
            line = lines.get(literal(name))
            y = np.asarray(line.get_ydata(), dtype=float) if line is not None else np.array([])
            ok = np.flatnonzero(np.isfinite(y))
            if ok.size:
                x = np.asarray(line.get_xdata(), dtype=float)[ok[-1]]
                ax.annotate(literal(name), (x, y[ok[-1]]), xytext=(3, 0), textcoords="offset points", fontsize=7,
                            color=line.get_color(), va="center")


def ordered_layers(info: pd.DataFrame, run: str, present: object = None) -> list[str]:
    """The run's layers in forward order, optionally only those in ``present``."""
    rows = info[info["run"] == run].sort_values("position")
    names = rows["layer"].tolist()
    if present is not None:
        keep = set(present)
        names = [n for n in names if n in keep] + sorted(keep - set(names))
    return names


def pick_layers(info: pd.DataFrame, run: str, fractions: Sequence[float],
                present: object = None) -> list[str | None]:
    """The run's layers at relative depths ``fractions`` (0: first, 1: last) among its
    nonlinearity layers, else among all its layers (only those in ``present``). Picking by
    rank pairs the same layers of two runs even when their names differ, as they do when
    ``build_model(batchnorm)`` numbers the layers of each variant itself."""
    names = candidates(info, run, present)
    if not names:
        return [None] * len(fractions)
    return [names[round(float(f) * (len(names) - 1))] for f in fractions]


def candidates(info: pd.DataFrame, run: str, present: object = None) -> list[str]:
    rows = info[info["run"] == run].sort_values("position")
    if present is not None:
        rows = rows[rows["layer"].isin(set(present))]
    nonlinear = rows[rows["nonlinearity"].notna()]
    return (nonlinear if len(nonlinear) else rows)["layer"].tolist()


def layer_type(info: pd.DataFrame, run: str, layer: str) -> str:
    match = info[(info["run"] == run) & (info["layer"] == layer)]
    return "" if match.empty else str(match["type"].iloc[0])


def step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around sorted step values, for heat maps over possibly uneven steps."""
    steps = np.asarray(steps, dtype=float)
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - mid[0]], mid, [2 * steps[-1] - mid[-1]]])


def save(fig: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)  # type: ignore[attr-defined]
    return path
