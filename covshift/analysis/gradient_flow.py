"""Gradient flow of each run: how much of the loss gradient at the last Linear/Conv layer reaches
the first, per step and per run, with a verdict and findings.

**Gradient flow** compares like with like: the *weighted layers* of a run, its Linear/Conv
layers in forward order (:func:`covshift.analysis.pairing.layers`, kind ``weighted``) that
have a finite ``grad_rms`` at some step. With L ≥ 2 of them, ``first_layer`` is the first and
``last_layer`` the last; a run with fewer has no gradient flow. Per step where both have a
finite ``grad_rms`` (root mean square of the loss gradient with respect to the layer's
output):

- ``ratio = first_rms / last_rms``. ``grad_rms`` rather than ``grad_norm``: the norm grows with
  the square root of the number of output elements, so a 784-wide first layer against a
  10-wide head would differ by about 9× from width alone; the rms is the per-element size
  whose variance Glorot & Bengio (2010) follow from layer to layer.
- ``per_layer = ratio ** (1 / (L − 1))``: the factor per weighted layer, so that depth is
  accounted for (a ratio of 0.1 over 10 layers is 0.77 per layer).
- ``verdict``: ``vanishing`` when ratio < :data:`VANISHING` (the first layer gets less than a
  tenth of the last layer's gradient), ``exploding`` when ratio > :data:`EXPLODING`, else
  ``healthy``; ``None`` when the ratio is undefined (both 0). Glorot & Bengio (2010) saw the
  back-propagated gradient's variance shrink layer by layer towards the input under standard
  initialization, and normalized initialization keeps it about constant; a factor of ten
  between the ends of the network is well outside "about constant".

``gradient_summary`` gives per run the median ratio over steps, its ``per_layer`` factor and
verdict, ``layers`` (L), ``worst_step`` (largest |log10 ratio|, the earliest on ties),
``worst_ratio`` and ``median_update_ratio`` = median of every finite ``weight.update_ratio``.

The bn-vs-nobn finding compares the runs' medians on matched roles (``Analysis.pairs``): the
first and the last weighted role must be each run's first and last weighted layer, else the
flows are not compared. A difference is stated only beyond a factor :data:`DIFFERENCE`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from . import common, pairing
from .common import Finding

METRIC = "grad_rms"        #: the layer metric the ratio divides
VANISHING = 0.1            #: first/last gradient rms ratio below this: vanishing
EXPLODING = 10.0           #: ... above this: exploding
DIFFERENCE = 2.0           #: bn and nobn ratios further apart than this factor are called different
COLUMNS = ["run", "step", "first_layer", "last_layer", "layers", "first_rms", "last_rms", "ratio", "per_layer",
           "verdict"]


def verdict(ratio: float) -> str | None:
    """``vanishing``, ``exploding`` or ``healthy`` (see the module docstring); None for NaN."""
    if not ratio == ratio:  # NaN
        return None
    return "vanishing" if ratio < VANISHING else "exploding" if ratio > EXPLODING else "healthy"


def _times(x: float) -> str:
    """A factor ≥ 1 as ``45×`` or ``1,000×`` (no exponent notation)."""
    return f"{common.num(x)}×" if x < 999.5 else f"{x:,.0f}×"


def describe(ratio: float) -> str:
    """A first/last ratio in plain words: ``attenuates 45×``, ``grows 3×``, ..."""
    if not ratio == ratio:
        return "is undefined"
    if ratio == 0 or math.isinf(ratio):
        return "is zero at the " + ("first" if ratio == 0 else "last") + " layer"
    if ratio == 1:
        return "keeps its size"
    return f"attenuates {_times(1 / ratio)}" if ratio < 1 else f"grows {_times(ratio)}"


def per_layer(ratio: float, layers: float) -> float:
    """``ratio ** (1 / (layers − 1))``, NaN with fewer than two layers."""
    return float(ratio ** (1.0 / (layers - 1))) if layers >= 2 else math.nan


def table(layer_frame: pd.DataFrame, info: pd.DataFrame) -> pd.DataFrame:
    """One row per run and step (columns :data:`COLUMNS`, see the module docstring)."""
    g = layer_frame[(layer_frame["metric"] == METRIC) & (layer_frame["layer"] != "")]
    g = g[np.isfinite(g["value"].to_numpy(dtype=float))]
    frames = []
    for run in info["run"].drop_duplicates():
        r = g[g["run"] == run]
        weighted = [layer for layer in pairing.layers(info, run, "weighted") if layer in set(r["layer"])]
        if len(weighted) < 2:
            continue
        first, last = weighted[0], weighted[-1]
        wide = r[r["layer"].isin([first, last])].groupby(["step", "layer"], observed=True)["value"].last().unstack("layer")
        wide = wide.reindex(columns=[first, last]).dropna()
        if wide.empty:
            continue
        f, l_ = wide[first].to_numpy(dtype=float), wide[last].to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = f / l_
            factor = ratio ** (1.0 / (len(weighted) - 1))
        frames.append(pd.DataFrame({"run": run, "step": wide.index.to_numpy(dtype=np.int64), "first_layer": first,
                                    "last_layer": last, "layers": len(weighted), "first_rms": f, "last_rms": l_,
                                    "ratio": ratio, "per_layer": factor}))
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    frame = pd.concat(frames, ignore_index=True)
    frame["verdict"] = [verdict(r) for r in frame["ratio"]]
    return frame[COLUMNS]


def summary(runs: list[str], flow: pd.DataFrame, layer_frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run: the median ratio and its verdict (see the module docstring)."""
    upd = layer_frame[layer_frame["metric"] == "weight.update_ratio"]
    rows = []
    for run in runs:
        f = flow[flow["run"] == run]
        ratios = f["ratio"].to_numpy(dtype=float)
        ok = ~np.isnan(ratios)
        row: dict[str, Any] = {"run": run, "first_layer": None, "last_layer": None, "layers": 0,
                               "median_ratio": math.nan, "per_layer": math.nan, "verdict": None,
                               "worst_step": math.nan, "worst_ratio": math.nan, "steps": int(ok.sum())}
        if ok.any():
            f, ratios = f[ok], ratios[ok]
            with np.errstate(divide="ignore"):
                extreme = np.abs(np.log10(ratios))
            worst = int(np.argmax(extreme))
            median = float(np.median(ratios))
            row.update(first_layer=f["first_layer"].iloc[0], last_layer=f["last_layer"].iloc[0],
                       layers=int(f["layers"].iloc[0]), median_ratio=median,
                       per_layer=per_layer(median, int(f["layers"].iloc[0])), verdict=verdict(median),
                       worst_step=float(f["step"].iloc[worst]), worst_ratio=float(ratios[worst]))
        u = common.finite(upd.loc[upd["run"] == run, "value"].to_numpy(dtype=float))
        row["median_update_ratio"] = float(np.median(u)) if u.size else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["run", "median_ratio", "per_layer", "verdict", "worst_step", "worst_ratio",
                                       "median_update_ratio", "first_layer", "last_layer", "layers", "steps"])


_VERDICT_RANGE = {
    "vanishing": f"below {VANISHING:g}: the first layer gets less than a tenth of the last layer's gradient",
    "exploding": f"above {EXPLODING:g}: the first layer gets more than ten times the last layer's gradient",
    "healthy": f"between {VANISHING:g} and {EXPLODING:g}"}


def _flow(r: pd.Series) -> str:
    """``attenuates 45× over 4 Linear/Conv layers (3.56× per layer)`` for one summary row."""
    if not 0 < r["median_ratio"] < math.inf:
        return describe(r["median_ratio"])
    text = f"{describe(r['median_ratio'])} over {r['layers']} Linear/Conv layers"
    p = float(r["per_layer"])
    if p != 1:
        text += f" ({_times(max(p, 1 / p))} per layer)"
    return text


def _compare(summary: pd.DataFrame, pairs: pd.DataFrame, pair: tuple[str, str]) -> list[Finding]:
    """The bn-vs-nobn finding on matched roles (see the module docstring)."""
    s = summary.set_index("run")
    w = pairs[pairs["kind"] == "weighted"]
    if len(w) < 2 or any(p not in s.index or common.name(s.loc[p, "verdict"]) is None for p in pair):
        return []
    first, last = w.iloc[0], w.iloc[-1]
    sides = list(zip(("bn", "nobn"), pair))
    if any((s.loc[run, "first_layer"], s.loc[run, "last_layer"]) != (str(first[side]), str(last[side]))
           for side, run in sides):
        ends = "; ".join(f"{run}: `{s.loc[run, 'first_layer']}` to `{s.loc[run, 'last_layer']}`" for run in pair)
        return [Finding("gradient_flow", f"The gradient flow of the {pair[0]} and {pair[1]} runs is not compared: "
                        f"their first and last Linear/Conv layers with a recorded gradient ({ends}) are not the "
                        f"roles {first['role']} and {last['role']} of both.")]
    text = (f"Gradient flow on matched roles, {first['role']} against {last['role']}: "
            + "; ".join(f"in the {run} run it {_flow(s.loc[run])}, {s.loc[run, 'verdict']}" for _, run in sides) + ".")
    medians = [float(s.loc[run, "median_ratio"]) for run in pair]
    if not all(0 < m < math.inf for m in medians):  # a zero gradient at one end: said in words above
        return [Finding("gradient_flow", text)]
    factor = medians[0] / medians[1]
    if factor > DIFFERENCE or factor < 1 / DIFFERENCE:
        more, less = pair if factor > 1 else pair[::-1]
        text += (f" The first Linear/Conv layer of the {more} run gets {_times(max(factor, 1 / factor))} more "
                 f"of its last layer's gradient than that of the {less} run.")
    else:
        text += f" The two ratios are within a factor {DIFFERENCE:g} of each other."
    return [Finding("gradient_flow", text, value=factor)]


def findings(summary: pd.DataFrame, pair: tuple[str, str] | None, pairs: pd.DataFrame) -> list[Finding]:
    """Per run its flow and median update ratio; with a ``pair``, the comparison on ``pairs``."""
    out = []
    for _, r in summary.iterrows():
        if common.name(r["verdict"]) is not None:
            text = (f"In the {r['run']} run the gradient (rms of ∂L/∂y, median over {r['steps']} steps) {_flow(r)} "
                    f"from the last, `{r['last_layer']}`, to the first, `{r['first_layer']}`: first/last ratio "
                    f"{common.num(r['median_ratio'])}, {r['verdict']} ({_VERDICT_RANGE[r['verdict']]}). The most "
                    f"extreme ratio is {common.num(r['worst_ratio'])} at step {common.step(r['worst_step'])}.")
            out.append(Finding("gradient_flow", text, r["run"], None, common.step(r["worst_step"]),
                               float(r["median_ratio"])))
        if np.isfinite(r["median_update_ratio"]):
            out.append(Finding("gradient_flow", f"The median weight update ratio of the {r['run']} run is "
                               f"{common.num(r['median_update_ratio'])}.", r["run"],
                               value=float(r["median_update_ratio"])))
    return out + (_compare(summary, pairs, pair) if pair else [])
