"""Gradient flow of each run: how the loss gradient's norm changes from the last layer to the
first, per step and per run, with a verdict and findings.

**Gradient flow.** Per step, among the layers with a finite ``grad_norm`` (norm of the
loss gradient with respect to the layer's output), ``first_layer`` is the earliest in
forward order and ``last_layer`` the latest (at least two layers are needed);
``ratio = first_norm / last_norm``. Verdict: ``vanishing`` when ratio < 1e-2,
``exploding`` when ratio > 1e2, ``healthy`` otherwise (``None`` when the ratio is undefined,
both norms 0). ``gradient_summary`` gives per run the median ratio over steps, its verdict,
``worst_step`` (largest |log10 ratio|, the earliest on ties), ``worst_ratio`` and
``median_update_ratio`` = median of every finite ``weight.update_ratio`` of the run.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from . import common
from .common import Finding

VANISHING = 1e-2           #: first/last gradient norm ratio below this: vanishing
EXPLODING = 1e2            #: ... above this: exploding


def verdict(ratio: float) -> str | None:
    if not ratio == ratio:  # NaN
        return None
    return "vanishing" if ratio < VANISHING else "exploding" if ratio > EXPLODING else "healthy"


def table(layer_frame: pd.DataFrame, info: pd.DataFrame) -> pd.DataFrame:
    columns = ["run", "step", "first_layer", "last_layer", "first_norm", "last_norm", "ratio", "verdict"]
    g = layer_frame[(layer_frame["metric"] == "grad_norm") & (layer_frame["layer"] != "")]
    g = g[np.isfinite(g["value"].to_numpy(dtype=float))]
    g = g.merge(info[["run", "layer", "position"]], on=["run", "layer"])
    if g.empty:
        return pd.DataFrame(columns=columns)
    order = {run: i for i, run in enumerate(info["run"].drop_duplicates())}
    g = g.assign(_order=g["run"].map(order)).sort_values(["_order", "step", "position"], kind="stable")
    grouped = g.groupby(["_order", "run", "step"], sort=True)
    first, last = grouped.first(), grouped.last()
    n = grouped["layer"].nunique()
    frame = pd.DataFrame({"first_layer": first["layer"], "last_layer": last["layer"],
                          "first_norm": first["value"], "last_norm": last["value"]})[n >= 2]
    frame = frame.reset_index().drop(columns="_order")
    with np.errstate(divide="ignore", invalid="ignore"):
        frame["ratio"] = frame["first_norm"].to_numpy(dtype=float) / frame["last_norm"].to_numpy(dtype=float)
    frame["verdict"] = [verdict(r) for r in frame["ratio"]]
    return frame[columns].astype({"step": np.int64})


def summary(runs: list[str], flow: pd.DataFrame, layer_frame: pd.DataFrame) -> pd.DataFrame:
    upd = layer_frame[layer_frame["metric"] == "weight.update_ratio"]
    rows = []
    for run in runs:
        f = flow[flow["run"] == run]
        ratios = f["ratio"].to_numpy(dtype=float)
        ok = ~np.isnan(ratios)
        row: dict[str, Any] = {"run": run, "first_layer": None, "last_layer": None, "median_ratio": math.nan,
                               "verdict": None, "worst_step": math.nan, "worst_ratio": math.nan,
                               "steps": int(ok.sum())}
        if ok.any():
            f, ratios = f[ok], ratios[ok]
            with np.errstate(divide="ignore"):
                extreme = np.abs(np.log10(ratios))
            worst = int(np.argmax(extreme))
            row.update(first_layer=f["first_layer"].mode().iloc[0], last_layer=f["last_layer"].mode().iloc[0],
                       median_ratio=float(np.median(ratios)), worst_step=float(f["step"].iloc[worst]),
                       worst_ratio=float(ratios[worst]))
            row["verdict"] = verdict(row["median_ratio"])
        u = common.finite(upd.loc[upd["run"] == run, "value"].to_numpy(dtype=float))
        row["median_update_ratio"] = float(np.median(u)) if u.size else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["run", "median_ratio", "verdict", "worst_step", "worst_ratio",
                                       "median_update_ratio", "first_layer", "last_layer", "steps"])


_VERDICT_RANGE = {"vanishing": "below 1e-2", "exploding": "above 1e2", "healthy": "between 1e-2 and 1e2"}


def findings(summary: pd.DataFrame, pair: tuple[str, str] | None) -> list[Finding]:
    out = []
    for _, r in summary.iterrows():
        if common.name(r["verdict"]) is not None:
            text = (f"In the {r['run']} run the output-gradient norm at the first layer `{r['first_layer']}` is "
                    f"{common.num(r['median_ratio'])} times that at the last layer `{r['last_layer']}` (median over "
                    f"{r['steps']} steps): {r['verdict']} ({_VERDICT_RANGE[r['verdict']]}); the most extreme "
                    f"ratio is {common.num(r['worst_ratio'])} at step {common.step(r['worst_step'])}.")
            out.append(Finding("gradient_flow", text, r["run"], None, common.step(r["worst_step"]),
                               float(r["median_ratio"])))
        if np.isfinite(r["median_update_ratio"]):
            out.append(Finding("gradient_flow", f"The median weight update ratio of the {r['run']} run is "
                               f"{common.num(r['median_update_ratio'])}.", r["run"],
                               value=float(r["median_update_ratio"])))
    if pair:
        s = summary.set_index("run")
        if all(common.name(s.loc[p, "verdict"]) is not None for p in pair):
            text = "Gradient flow: " + ", ".join(
                f"{p} {s.loc[p, 'verdict']} (median ratio {common.num(s.loc[p, 'median_ratio'])})" for p in pair) + "."
            out.append(Finding("gradient_flow", text))
    return out
