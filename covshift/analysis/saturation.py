"""Saturation of each run's nonlinearity layers and the gain they pass, as a table and findings.

**Saturation** (each run's layers with a ``saturation`` metric). ``max_saturation`` and its
first step; ``first_step_above_half`` / ``first_step_above_90``: first step with saturation
> 0.5 / > 0.9; ``steps_above_half`` = fraction of recorded steps with saturation > 0.5;
``min_gain`` and its step; ``steps_gain_below_half`` = fraction of recorded steps with
``gain`` < 0.5 (the layer passes less than half the gradient it could).

**Dead units** (ReLU family, from the layer metric ``dead``: the number of units whose output
is ≤ 0 on every element of the step). ``units`` = the number of distinct units of the layer in
``trace.units()`` (NaN without per-unit rows); per step ``dead_fraction = dead / units``;
``dead_fraction_mean`` and ``dead_fraction_max`` (and its first step) over the recorded steps.
A layer whose ``dead_fraction_max`` exceeds :data:`DEAD` gets a finding.

The findings rank only bounded nonlinearities (sigmoid, tanh, ...). ReLU-family layers
(:data:`RELU_FAMILY`) are in the table but not ranked: their "saturation" is the inactive
fraction, about half of the outputs by design behind BatchNorm, which is not the loss of
gradient that saturation means for a bounded unit; their dead units are reported instead.

**bn against nobn** compares layers of the same role (``Analysis.pairs``, kind
``nonlinearity``): the most saturated bounded nonlinearity of either run with the other run's
nonlinearity of the same index, and, when a ReLU-family layer of either run has more than
:data:`DEAD` dead units, its dead fraction with that of the other run's layer of the same role.
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
DEAD = 0.1                 #: a ReLU layer with more than this fraction of dead units gets a finding
COLUMNS = ["run", "layer", "nonlinearity", "max_saturation", "max_saturation_step", "first_step_above_half",
           "first_step_above_90", "steps_above_half", "min_gain", "min_gain_step", "steps_gain_below_half", "units",
           "dead_fraction_mean", "dead_fraction_max", "dead_fraction_max_step"]


def _finite_series(groups: dict, key: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Steps and finite values of one (run, layer) group, in step order."""
    g = groups.get(key)
    if g is None:
        return np.array([]), np.array([])
    g = g.sort_values("step")
    g = g[np.isfinite(g["value"].to_numpy(dtype=float))]
    return g["step"].to_numpy(), g["value"].to_numpy(dtype=float)


def table(layer_frame: pd.DataFrame, info: pd.DataFrame, units: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per run and layer with a ``saturation`` or ``dead`` metric (columns :data:`COLUMNS`)."""
    groups = {m: {k: g for k, g in layer_frame[layer_frame["metric"] == m].groupby(["run", "layer"], observed=True)}
              for m in ("saturation", "gain", "dead")}
    counts = units.groupby(["run", "layer"], observed=True)["unit"].nunique() if units is not None and len(units) else {}
    rows = []
    for _, meta in info.iterrows():
        key = (meta["run"], meta["layer"])
        if key not in groups["saturation"] and key not in groups["dead"]:
            continue
        ss, sv = _finite_series(groups["saturation"], key)
        gs, gv = _finite_series(groups["gain"], key)
        ds, dv = _finite_series(groups["dead"], key)
        n = float(counts.get(key, math.nan))
        dead = dv / n if dv.size and n > 0 else np.array([])
        nl = meta["nonlinearity"]
        rows.append({
            "run": key[0], "layer": key[1], "nonlinearity": None if pd.isna(nl) else str(nl),
            "max_saturation": sv.max() if sv.size else math.nan,
            "max_saturation_step": float(ss[sv.argmax()]) if sv.size else math.nan,
            "first_step_above_half": common.first_step(ss, sv > SATURATED),
            "first_step_above_90": common.first_step(ss, sv > HEAVILY_SATURATED),
            "steps_above_half": float((sv > SATURATED).mean()) if sv.size else math.nan,
            "min_gain": gv.min() if gv.size else math.nan,
            "min_gain_step": float(gs[gv.argmin()]) if gv.size else math.nan,
            "steps_gain_below_half": float((gv < LOW_GAIN).mean()) if gv.size else math.nan,
            "units": n,
            "dead_fraction_mean": float(dead.mean()) if dead.size else math.nan,
            "dead_fraction_max": float(dead.max()) if dead.size else math.nan,
            "dead_fraction_max_step": float(ds[dead.argmax()]) if dead.size else math.nan,
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def _describe_layer(r: pd.Series) -> str:
    nl = f" ({common.name(r['nonlinearity'])})" if common.name(r["nonlinearity"]) else ""
    return f"`{r['layer']}`{nl}"


def _ranking(s: pd.DataFrame, run: str) -> list[Finding]:
    """The most saturated bounded layer of one run and its lowest gain."""
    out = []
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
    return out


def _dead(r: pd.Series) -> str:
    """``up to 25% of its 64 units dead (step 40), 12% on average``."""
    return (f"up to {common.pct(r['dead_fraction_max'])} of its {int(r['units'])} units dead (step "
            f"{common.step(r['dead_fraction_max_step'])}), {common.pct(r['dead_fraction_mean'])} on average")


def _dead_units(d: pd.DataFrame, run: str) -> Finding:
    """The ReLU-family layer of one run with the largest dead fraction."""
    w = d.loc[d["dead_fraction_max"].idxmax()]
    if w["dead_fraction_max"] > DEAD:
        text = (f"{_describe_layer(w)} of the {run} run has dead units (output ≤ 0 on every element of a step): "
                f"{_dead(w)} over its recorded steps.")
    else:
        text = (f"No ReLU-family layer of the {run} run ever has more than {common.pct(DEAD)} dead units (the most: "
                f"{_describe_layer(w)}, {common.pct(w['dead_fraction_max'])}).")
    return Finding("saturation", text, run, w["layer"], common.step(w["dead_fraction_max_step"]),
                   float(w["dead_fraction_max"]))


def _by_role(table: pd.DataFrame, column: str, pairs: pd.DataFrame,
             pair: tuple[str, str]) -> tuple[pd.Series, pd.Series, str] | None:
    """The row of either run with the largest ``column`` and the other run's row of the same
    nonlinearity role, with the role's name; None when that role has no row in the other run."""
    w = table.loc[table[column].idxmax()]
    side, other, other_run = ("bn", "nobn", pair[1]) if w["run"] == pair[0] else ("nobn", "bn", pair[0])
    roles = pairs[(pairs["kind"] == "nonlinearity") & (pairs[side].astype(str) == w["layer"])]
    if roles.empty:
        return None
    role = roles.iloc[0]
    o = table[(table["run"] == other_run) & (table["layer"] == str(role[other]))]
    return (w, o.iloc[0], str(role["role"])) if not o.empty else None


def _compare(sat: pd.DataFrame, dead: pd.DataFrame, pairs: pd.DataFrame, pair: tuple[str, str]) -> list[Finding]:
    """bn against nobn on matched nonlinearity roles (see the module docstring)."""
    out = []
    both = sat[sat["run"].isin(pair)]
    matched = _by_role(both, "max_saturation", pairs, pair) if not both.empty else None
    if matched:
        w, o, role = matched
        text = f"{role[0].upper()}{role[1:]}: in the {o['run']} run {_describe_layer(o)} "
        text += (f"is first over 50% saturated at step {common.step(o['first_step_above_half'])}"
                 if not pd.isna(o["first_step_above_half"]) else "is never over 50% saturated")
        text += (f": it peaks at {common.pct(o['max_saturation'])} (step {common.step(o['max_saturation_step'])}), "
                 f"against {common.pct(w['max_saturation'])} for {_describe_layer(w)} in the {w['run']} run.")
        out.append(Finding("saturation", text, o["run"], o["layer"], common.step(o["max_saturation_step"]),
                           float(o["max_saturation"])))
    both = dead[dead["run"].isin(pair)]
    matched = _by_role(both, "dead_fraction_max", pairs, pair) if not both.empty else None
    if matched and matched[0]["dead_fraction_max"] > DEAD:
        w, o, role = matched
        text = (f"{role[0].upper()}{role[1:]}: in the {o['run']} run {_describe_layer(o)} has {_dead(o)}, against "
                f"{_dead(w)} for {_describe_layer(w)} in the {w['run']} run.")
        out.append(Finding("saturation", text, o["run"], o["layer"], common.step(o["dead_fraction_max_step"]),
                           float(o["dead_fraction_max"])))
    return out


def findings(sat: pd.DataFrame, runs: list[str], pair: tuple[str, str] | None,
             pairs: pd.DataFrame) -> list[Finding]:
    """Per run: the saturation ranking of bounded layers, their lowest gain and the dead units of
    ReLU-family layers; with a ``pair``, bn against nobn on the roles of ``pairs``."""
    relu = sat["nonlinearity"].isin(RELU_FAMILY)
    dead = sat[relu & np.isfinite(sat["dead_fraction_max"].to_numpy(dtype=float))]
    sat = sat[np.isfinite(sat["max_saturation"].to_numpy(dtype=float)) & ~relu]
    out = []
    for run in runs:
        if (sat["run"] == run).any():
            out += _ranking(sat[sat["run"] == run], run)
        if (dead["run"] == run).any():
            out.append(_dead_units(dead[dead["run"] == run], run))
    if pair:
        out += _compare(sat, dead, pairs, pair)
    return out
