"""Saturation of each run's nonlinearity layers and the gain they pass, as a table and findings.

**Saturation** (each run's layers with a ``saturation`` metric). ``max_saturation`` and its
first step; ``first_step_above_half`` / ``first_step_above_90``: first step with saturation
> 0.5 / > 0.9; ``steps_above_half`` = fraction of recorded steps with saturation > 0.5;
``min_gain`` and its step; ``steps_gain_below_half`` = fraction of recorded steps with
``gain`` < 0.5 (the layer passes less than half the gradient it could).

The findings rank only bounded nonlinearities (sigmoid, tanh, ...). ReLU-family layers
(:data:`RELU_FAMILY`) are in the table but not ranked: their "saturation" is the inactive
fraction, about half of the outputs by design behind BatchNorm, which is not the loss of
gradient that saturation means for a bounded unit.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import common
from .common import Finding

SATURATED = 0.5            #: saturation above this counts as saturated
HEAVILY_SATURATED = 0.9
LOW_GAIN = 0.5             #: gain below this: less than half the gradient passes
RELU_FAMILY = ("relu", "relu6", "leaky_relu")  #: nonlinearity kinds left out of the ranking


def table(layer_frame: pd.DataFrame, info: pd.DataFrame) -> pd.DataFrame:
    sat = {k: g for k, g in layer_frame[layer_frame["metric"] == "saturation"].groupby(["run", "layer"])}
    gain = {k: g for k, g in layer_frame[layer_frame["metric"] == "gain"].groupby(["run", "layer"])}
    empty = layer_frame.iloc[:0]
    rows = []
    for _, meta in info.iterrows():
        run, layer = meta["run"], meta["layer"]
        if (run, layer) not in sat:
            continue
        s = sat[(run, layer)].sort_values("step")
        g = gain.get((run, layer), empty).sort_values("step")
        s = s[np.isfinite(s["value"].to_numpy(dtype=float))]
        g = g[np.isfinite(g["value"].to_numpy(dtype=float))]
        ss, sv = s["step"].to_numpy(), s["value"].to_numpy(dtype=float)
        gs, gv = g["step"].to_numpy(), g["value"].to_numpy(dtype=float)
        nl = meta["nonlinearity"]
        rows.append({
            "run": run, "layer": layer, "nonlinearity": None if pd.isna(nl) else str(nl),
            "max_saturation": sv.max() if sv.size else math.nan,
            "max_saturation_step": float(ss[sv.argmax()]) if sv.size else math.nan,
            "first_step_above_half": common.first_step(ss, sv > SATURATED),
            "first_step_above_90": common.first_step(ss, sv > HEAVILY_SATURATED),
            "steps_above_half": float((sv > SATURATED).mean()) if sv.size else math.nan,
            "min_gain": gv.min() if gv.size else math.nan,
            "min_gain_step": float(gs[gv.argmin()]) if gv.size else math.nan,
            "steps_gain_below_half": float((gv < LOW_GAIN).mean()) if gv.size else math.nan,
        })
    return pd.DataFrame(rows, columns=[
        "run", "layer", "nonlinearity", "max_saturation", "max_saturation_step", "first_step_above_half",
        "first_step_above_90", "steps_above_half", "min_gain", "min_gain_step", "steps_gain_below_half"])


def _describe_layer(r: pd.Series) -> str:
    nl = f" ({common.name(r['nonlinearity'])})" if common.name(r["nonlinearity"]) else ""
    return f"`{r['layer']}`{nl}"


def findings(sat: pd.DataFrame, runs: list[str], pair: tuple[str, str] | None) -> list[Finding]:
    out = []
    sat = sat[np.isfinite(sat["max_saturation"].to_numpy(dtype=float)) & ~sat["nonlinearity"].isin(RELU_FAMILY)]
    for run in runs:
        s = sat[sat["run"] == run]
        if s.empty:
            continue
        w = s.loc[s["max_saturation"].idxmax()]
        peak, peak_step = float(w["max_saturation"]), common.step(w["max_saturation_step"])
        if peak > SATURATED:
            text = (f"{_describe_layer(w)} is the most saturated layer of the {run} run: first over 50% saturated "
                    f"at step {common.step(w['first_step_above_half'])}")
            if not pd.isna(w["first_step_above_90"]):
                text += f", over 90% at step {common.step(w['first_step_above_90'])}"
            text += (f"; peak {common.pct(peak)} at step {peak_step}; over 50% at "
                     f"{common.pct(w['steps_above_half'])} of its recorded steps.")
            out.append(Finding("saturation", text, run, w["layer"], common.step(w["first_step_above_half"]), peak))
        else:
            out.append(Finding("saturation", f"No layer of the {run} run is ever more than 50% saturated; the most "
                               f"saturated is {_describe_layer(w)} at {common.pct(peak)} (step {peak_step}).",
                               run, w["layer"], peak_step, peak))
        g = s[np.isfinite(s["min_gain"].to_numpy(dtype=float))]
        if not g.empty:
            lo = g.loc[g["min_gain"].idxmin()]
            gain, step = float(lo["min_gain"]), common.step(lo["min_gain_step"])
            if gain < LOW_GAIN:
                text = (f"{_describe_layer(lo)} passes as little as {common.pct(gain)} of the gradient in the "
                        f"{run} run (gain {common.num(gain)} at step {step}); its gain is below 0.5 at "
                        f"{common.pct(lo['steps_gain_below_half'])} of its recorded steps.")
            else:
                text = (f"Every layer of the {run} run with a gain keeps it at or above 0.5 (lowest "
                        f"{common.num(gain)}, {_describe_layer(lo)} at step {step}).")
            out.append(Finding("saturation", text, run, lo["layer"], step, gain))
    if pair:
        both = sat[sat["run"].isin(pair)]
        if not both.empty:
            w = both.loc[both["max_saturation"].idxmax()]
            other = pair[1] if w["run"] == pair[0] else pair[0]
            o = both[(both["run"] == other) & (both["layer"] == w["layer"])]
            if not o.empty:
                o = o.iloc[0]
                text = f"In the {other} run {_describe_layer(o)} "
                text += (f"is first over 50% saturated at step {common.step(o['first_step_above_half'])}"
                         if not pd.isna(o["first_step_above_half"]) else "is never over 50% saturated")
                text += (f": it peaks at {common.pct(o['max_saturation'])} "
                         f"(step {common.step(o['max_saturation_step'])}), "
                         f"against {common.pct(w['max_saturation'])} in the {w['run']} run.")
                out.append(Finding("saturation", text, other, o["layer"], common.step(o["max_saturation_step"]),
                                   float(o["max_saturation"])))
    return out
