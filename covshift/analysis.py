"""Analysis of a trace: convergence, stability, generalization, saturation, gradient flow,
covariate shift and divergence, as DataFrames and plain-English findings.

``analyze(trace_or_path)`` returns an :class:`Analysis`. Every number below is computed per
run from what the trace holds; a quantity the trace cannot give is NaN (or ``None``) and
produces no finding. Steps are the recorded step numbers.

**Loss used.** The training ``loss`` run metric up to, not including, its first non-finite
value (the *finite part*; all of it when the run never diverged). With ``n`` finite steps,
the *smoothed* loss is a centred rolling mean over ``w`` steps, ``w = max(1, round(0.02 n))``
made odd by adding 1 when even; windows at the ends use the steps that exist.

**Convergence** (one row per run).
``final_loss`` = last finite loss; ``min_loss`` = lowest finite loss; ``min_smoothed_loss``
= lowest smoothed loss. ``target_loss`` = max over runs of ``min_smoothed_loss``, the
lowest level every run reaches (a single run: its own minimum). ``steps_to_target`` = first
step whose smoothed loss is ≤ ``target_loss + 1e-12`` (NaN without a finite loss).
``loss_auc`` = ∫ L dt / (t_last − t_first), by the trapezoid rule over the recorded steps:
the time-averaged raw loss (the loss itself for a single step).

**Stability.** ``oscillation_index`` = Σ_t |L_{t+1} − L_t| / max(|L_first − L_last|, 1e-12)
on the raw finite loss: the loss's total variation over its net change. 1 means a monotone
curve, k means the loss travels k times the distance it gained; a constant loss counts
as 1, a single step as NaN. ``val_spikes`` = number of evaluations whose ``val_loss`` rose
by more than 10% over the previous evaluation, ``L_i − L_{i−1} > 0.1 |L_{i−1}|`` (NaN without
``val_loss``).

**Generalization.** ``train_loss`` = mean finite loss over the last ``max(1, ⌈0.1 n⌉)``
steps; ``val_loss``, ``val_accuracy`` = the last logged values (at ``val_step``);
``gap = val_loss − train_loss``.

**Saturation** (each run's layers with a ``saturation`` metric). ``max_saturation`` and its
first step; ``first_step_above_half`` / ``first_step_above_90``: first step with saturation
> 0.5 / > 0.9; ``steps_above_half`` = fraction of recorded steps with saturation > 0.5;
``min_gain`` and its step; ``steps_gain_below_half`` = fraction of recorded steps with
``gain`` < 0.5 (the layer passes less than half the gradient it could).

**Gradient flow.** Per step, among the layers with a finite ``grad_norm`` (norm of the
loss gradient with respect to the layer's output), ``first_layer`` is the earliest in
forward order and ``last_layer`` the latest (at least two layers are needed);
``ratio = first_norm / last_norm``. Verdict: ``vanishing`` when ratio < 1e-2,
``exploding`` when ratio > 1e2, ``healthy`` otherwise (``None`` when the ratio is undefined,
both norms 0). ``gradient_summary`` gives per run the median ratio over steps, its verdict,
``worst_step`` (largest |log10 ratio|, the earliest on ties), ``worst_ratio`` and
``median_update_ratio`` = median of every finite ``weight.update_ratio`` of the run.

**Covariate shift** (per run and layer, at each detail step t after the layer's first,
against a reference step r: the previous detail step for ``*_prev``, the first for
``*_first``).
``w2`` = median over units u of W2(N(m_ut, v_ut), N(m_ur, v_ur)) / √v_ur, where the
2-Wasserstein distance between 1-D Gaussians is √((m_ut − m_ur)² + (√v_ut − √v_ur)²).
Units with v_ur = 0 or non-finite values are skipped; NaN when none is left or the layer has
no per-unit statistics. ``w1`` = the 1-Wasserstein distance between the layer's histograms
at t and r (``scipy.stats.wasserstein_distance``; each bin's count placed at its centre, the
underflow bin at the first finite edge, the overflow bin at the last), divided by the layer's
``std`` at r; NaN when a histogram is empty or that std is missing, 0 or non-finite. Both
measure the shift in units of the reference standard deviation; ``w2`` takes the median so
that a few units with a tiny reference variance (nearly dead or saturated) do not dominate it. ``shift_summary`` averages
each layer's values over its steps (``mean_w2_prev``, ``mean_w1_prev``, ``mean_w2_first``,
``mean_w1_first``); its rows with ``layer == ""`` average those over the run's layers.

**Divergence.** ``diverged_at`` and ``first_nonfinite_layer`` from the run's config when
set; otherwise ``diverged_at`` = the first step with a non-finite loss or a layer with
``nonfinite`` > 0, and ``first_nonfinite_layer`` = the earliest layer in forward order with
``nonfinite`` > 0 at the first step any has.

**Findings** compare two runs where the trace holds a BN pair (runs whose config
``variant`` or name is ``bn`` and ``nobn``), or else exactly two runs. Layer names appear
in backticks; text is not escaped for HTML or Markdown.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import wasserstein_distance

from .store import Trace, load

SECTIONS = ("convergence", "stability", "generalization", "saturation", "gradient_flow",
            "covariate_shift", "divergence")
SMOOTH_FRACTION = 0.02     #: smoothing window, as a fraction of a run's steps
TARGET_TOLERANCE = 1e-12   #: slack when comparing the smoothed loss with the target
TAIL_FRACTION = 0.10       #: the final train loss averages this fraction of the steps
VAL_SPIKE = 0.10           #: a relative rise of val_loss above this is a spike
SATURATED = 0.5            #: saturation above this counts as saturated
HEAVILY_SATURATED = 0.9
LOW_GAIN = 0.5             #: gain below this: less than half the gradient passes
VANISHING = 1e-2           #: first/last gradient norm ratio below this: vanishing
EXPLODING = 1e2            #: ... above this: exploding
NET_CHANGE_FLOOR = 1e-12


@dataclass
class Finding:
    """One sentence computed from the numbers, with what it is about."""
    section: str
    text: str
    run: str | None = None
    layer: str | None = None
    step: int | None = None
    value: float | None = None
    runs: tuple[str, ...] = ()  # the runs a comparison names, e.g. a sweep's (bn run, nobn run)


@dataclass
class Analysis:
    """All tables of an analysis and its findings (see the module docstring)."""
    runs: list[str]
    convergence: pd.DataFrame
    stability: pd.DataFrame
    generalization: pd.DataFrame
    saturation: pd.DataFrame
    gradient_flow: pd.DataFrame
    gradient_summary: pd.DataFrame
    covariate_shift: pd.DataFrame
    shift_summary: pd.DataFrame
    divergence: pd.DataFrame
    findings: list[Finding] = field(default_factory=list)

    def findings_for(self, section: str) -> list[Finding]:
        """The findings of one section, in order."""
        return [f for f in self.findings if f.section == section]


def analyze(trace: Trace | str | os.PathLike[str]) -> Analysis:
    """Analyse every run of a trace (a :class:`Trace` or a path to one)."""
    if isinstance(trace, Trace):
        return _analyze(trace)
    with load(trace) as opened:
        return _analyze(opened)


# ---------------------------------------------------------------------------- helpers

def _num(x: float) -> str:
    return f"{x:.3g}"


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def _step(x: Any) -> int | None:
    return None if x is None or pd.isna(x) else int(x)


def _name(x: Any) -> str | None:
    """A text cell as str, or None where pandas holds a missing value."""
    return None if x is None or (not isinstance(x, str) and pd.isna(x)) else str(x)


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _series(frame: pd.DataFrame, run: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of one run metric, sorted, one value per step (the last logged)."""
    rows = frame[(frame["run"] == run) & (frame["metric"] == metric)]
    rows = rows.drop_duplicates("step", keep="last").sort_values("step")
    return rows["step"].to_numpy(dtype=np.int64), rows["value"].to_numpy(dtype=float)


def _finite_part(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bad = np.flatnonzero(~np.isfinite(values))
    end = bad[0] if bad.size else len(values)
    return steps[:end], values[:end]


def _window(n: int) -> int:
    w = max(1, int(round(SMOOTH_FRACTION * n)))
    return w if w % 2 else w + 1


def _smooth(values: np.ndarray) -> np.ndarray:
    w = _window(len(values))
    return pd.Series(values).rolling(w, center=True, min_periods=1).mean().to_numpy()


def _first_step(steps: np.ndarray, mask: np.ndarray) -> float:
    hit = np.flatnonzero(mask)
    return float(steps[hit[0]]) if hit.size else math.nan


def _pair(trace: Trace, runs: list[str]) -> tuple[str, str] | None:
    """(bn, nobn) by config variant, else by run name; else the two runs of a two-run trace."""
    by_variant: dict[str, str] = {}
    for run in runs:
        variant = trace.config(run).get("variant")
        if isinstance(variant, str):
            by_variant.setdefault(variant, run)
    for found in (by_variant, {run: run for run in runs}):
        if "bn" in found and "nobn" in found:
            return found["bn"], found["nobn"]
    return (runs[0], runs[1]) if len(runs) == 2 else None


# ------------------------------------------------------------------------- run tables

def _convergence(runs: list[str], losses: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    rows = []
    for run in runs:
        steps, values = losses[run]
        row: dict[str, Any] = {"run": run, "final_loss": math.nan, "min_loss": math.nan,
                               "min_smoothed_loss": math.nan, "smoothing_window": _window(len(values)),
                               "loss_auc": math.nan}
        if len(values):
            row.update(final_loss=values[-1], min_loss=values.min(), min_smoothed_loss=_smooth(values).min())
            span = steps[-1] - steps[0]
            row["loss_auc"] = float(np.trapezoid(values, steps) / span) if span > 0 else float(values.mean())
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["run", "final_loss", "min_loss", "min_smoothed_loss",
                                        "smoothing_window", "loss_auc"])
    mins = _finite(frame["min_smoothed_loss"].to_numpy(dtype=float))
    target = float(mins.max()) if mins.size else math.nan
    frame["target_loss"] = target
    reach = []
    for run in runs:
        steps, values = losses[run]
        reach.append(_first_step(steps, _smooth(values) <= target + TARGET_TOLERANCE) if len(values) else math.nan)
    frame["steps_to_target"] = reach
    return frame[["run", "final_loss", "min_loss", "target_loss", "steps_to_target", "loss_auc",
                  "min_smoothed_loss", "smoothing_window"]]


def _oscillation(values: np.ndarray) -> float:
    if len(values) < 2:
        return math.nan
    travel = float(np.abs(np.diff(values)).sum())
    if travel == 0:
        return 1.0
    return travel / max(abs(values[0] - values[-1]), NET_CHANGE_FLOOR)


def _spikes(values: np.ndarray) -> tuple[float, list[int]]:
    """Number of spikes and their indices in ``values`` (NaN without two finite neighbours)."""
    if len(values) == 0:
        return math.nan, []
    prev, cur = values[:-1], values[1:]
    ok = np.isfinite(prev) & np.isfinite(cur)
    hits = np.flatnonzero(ok & (cur - prev > VAL_SPIKE * np.abs(prev))) + 1
    return float(len(hits)), hits.tolist()


def _stability(runs: list[str], losses: dict, run_frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run in runs:
        val_steps, val = _series(run_frame, run, "val_loss")
        count, hits = _spikes(val)
        rows.append({"run": run, "oscillation_index": _oscillation(losses[run][1]), "val_spikes": count,
                     "val_evaluations": len(val), "spike_steps": [int(val_steps[i]) for i in hits]})
    return pd.DataFrame(rows, columns=["run", "oscillation_index", "val_spikes", "val_evaluations", "spike_steps"])


def _generalization(runs: list[str], losses: dict, run_frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run in runs:
        values = losses[run][1]
        tail = max(1, math.ceil(TAIL_FRACTION * len(values)))
        train = float(values[-tail:].mean()) if len(values) else math.nan
        val_steps, val = _series(run_frame, run, "val_loss")
        _, acc = _series(run_frame, run, "val_accuracy")
        val_loss = float(val[-1]) if len(val) else math.nan
        rows.append({"run": run, "train_loss": train, "val_loss": val_loss,
                     "val_accuracy": float(acc[-1]) if len(acc) else math.nan, "gap": val_loss - train,
                     "val_step": float(val_steps[-1]) if len(val) else math.nan,
                     "tail_steps": tail if len(values) else 0})
    return pd.DataFrame(rows, columns=["run", "train_loss", "val_loss", "val_accuracy", "gap", "val_step",
                                       "tail_steps"])


# ----------------------------------------------------------------------- layer tables

def _saturation(layer_frame: pd.DataFrame, info: pd.DataFrame) -> pd.DataFrame:
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
            "first_step_above_half": _first_step(ss, sv > SATURATED),
            "first_step_above_90": _first_step(ss, sv > HEAVILY_SATURATED),
            "steps_above_half": float((sv > SATURATED).mean()) if sv.size else math.nan,
            "min_gain": gv.min() if gv.size else math.nan,
            "min_gain_step": float(gs[gv.argmin()]) if gv.size else math.nan,
            "steps_gain_below_half": float((gv < LOW_GAIN).mean()) if gv.size else math.nan,
        })
    return pd.DataFrame(rows, columns=[
        "run", "layer", "nonlinearity", "max_saturation", "max_saturation_step", "first_step_above_half",
        "first_step_above_90", "steps_above_half", "min_gain", "min_gain_step", "steps_gain_below_half"])


def _verdict(ratio: float) -> str | None:
    if not ratio == ratio:  # NaN
        return None
    return "vanishing" if ratio < VANISHING else "exploding" if ratio > EXPLODING else "healthy"


def _gradient_flow(layer_frame: pd.DataFrame, info: pd.DataFrame) -> pd.DataFrame:
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
    frame["verdict"] = [_verdict(r) for r in frame["ratio"]]
    return frame[columns].astype({"step": np.int64})


def _gradient_summary(runs: list[str], flow: pd.DataFrame, layer_frame: pd.DataFrame) -> pd.DataFrame:
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
            row["verdict"] = _verdict(row["median_ratio"])
        u = _finite(upd.loc[upd["run"] == run, "value"].to_numpy(dtype=float))
        row["median_update_ratio"] = float(np.median(u)) if u.size else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["run", "median_ratio", "verdict", "worst_step", "worst_ratio",
                                       "median_update_ratio", "first_layer", "last_layer", "steps"])


def _w2(mean_t: np.ndarray, var_t: np.ndarray, mean_r: np.ndarray, var_r: np.ndarray) -> float:
    """Median over units of the Gaussian W2 distance in reference standard deviations."""
    ok = np.isfinite(mean_t) & np.isfinite(var_t) & np.isfinite(mean_r) & np.isfinite(var_r) & (var_r > 0)
    if not ok.any():
        return math.nan
    s_t, s_r = np.sqrt(np.maximum(var_t[ok], 0.0)), np.sqrt(var_r[ok])
    return float(np.median(np.hypot(mean_t[ok] - mean_r[ok], s_t - s_r) / s_r))


def _w1(hist_t: tuple[np.ndarray, np.ndarray] | None, hist_r: tuple[np.ndarray, np.ndarray] | None,
        std_r: float) -> float:
    """W1 distance between two histograms (centres, counts) over the reference std."""
    if hist_t is None or hist_r is None or not (np.isfinite(std_r) and std_r > 0):
        return math.nan
    (x_t, c_t), (x_r, c_r) = hist_t, hist_r
    if c_t.sum() <= 0 or c_r.sum() <= 0:
        return math.nan
    return float(wasserstein_distance(x_t, x_r, c_t, c_r) / std_r)


def _centres(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Bin centres; the underflow bin at its right edge, the overflow bin at its left."""
    return np.where(np.isinf(left), right, np.where(np.isinf(right), left, (left + right) / 2))


def _unit_stats(u: pd.DataFrame | None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per detail step: unit means and variances, aligned on the same units."""
    if u is None:
        return {}
    means = u.pivot_table(index="step", columns="unit", values="mean", aggfunc="last", dropna=False)
    variances = u.pivot_table(index="step", columns="unit", values="var", aggfunc="last", dropna=False)
    variances = variances.reindex(index=means.index, columns=means.columns)
    return {int(step): (means.loc[step].to_numpy(dtype=float), variances.loc[step].to_numpy(dtype=float))
            for step in means.index}


def _histograms(h: pd.DataFrame | None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per detail step: bin positions (see :func:`_centres`) and counts."""
    if h is None:
        return {}
    h = h[~(np.isinf(h["left"].to_numpy()) & np.isinf(h["right"].to_numpy()))]
    return {int(step): (_centres(g["left"].to_numpy(dtype=float), g["right"].to_numpy(dtype=float)),
                        g["count"].to_numpy(dtype=float)) for step, g in h.groupby("step")}


def _covariate_shift(units: pd.DataFrame, hists: pd.DataFrame, layer_frame: pd.DataFrame,
                     info: pd.DataFrame) -> pd.DataFrame:
    std = layer_frame[layer_frame["metric"] == "std"]
    std_at = {(r, name, int(s)): float(v) for r, name, s, v in zip(std["run"], std["layer"], std["step"], std["value"])}
    unit_groups = {key: g for key, g in units.groupby(["run", "layer"], sort=False)}
    hist_groups = {key: g for key, g in hists.groupby(["run", "layer"], sort=False)}
    rows = []
    for run, layer in zip(info["run"], info["layer"]):
        stats = _unit_stats(unit_groups.get((run, layer)))
        histos = _histograms(hist_groups.get((run, layer)))
        ordered = sorted(set(stats) | set(histos))
        for prev, step in zip(ordered, ordered[1:]):
            row = {"run": run, "layer": layer, "step": step, "prev_step": prev}
            for suffix, ref in (("prev", prev), ("first", ordered[0])):
                a, b = stats.get(step), stats.get(ref)
                row[f"w2_{suffix}"] = math.nan if a is None or b is None else _w2(a[0], a[1], b[0], b[1])
                row[f"w1_{suffix}"] = _w1(histos.get(step), histos.get(ref), std_at.get((run, layer, ref), math.nan))
            rows.append(row)
    return pd.DataFrame(rows, columns=["run", "layer", "step", "prev_step", "w2_prev", "w2_first",
                                       "w1_prev", "w1_first"])


def _shift_summary(runs: list[str], shift: pd.DataFrame, info: pd.DataFrame) -> pd.DataFrame:
    columns = ["run", "layer", "mean_w2_prev", "mean_w1_prev", "mean_w2_first", "mean_w1_first", "steps"]
    values = ["w2_prev", "w1_prev", "w2_first", "w1_first"]
    rows = []
    for run in runs:
        s = shift[shift["run"] == run]
        if s.empty:
            continue
        per_layer = []
        for layer in info.loc[info["run"] == run, "layer"]:
            g = s[s["layer"] == layer]
            if g.empty:
                continue
            row = {"run": run, "layer": layer, "steps": len(g)}
            row.update({f"mean_{v}": g[v].mean() for v in values})
            per_layer.append(row)
        total = pd.DataFrame(per_layer)
        rows += per_layer
        rows.append({"run": run, "layer": "", "steps": int(total["steps"].max()),
                     **{f"mean_{v}": total[f"mean_{v}"].mean() for v in values}})
    return pd.DataFrame(rows, columns=columns)


def _divergence(trace: Trace, runs: list[str], losses_raw: dict, layer_frame: pd.DataFrame,
                info: pd.DataFrame) -> pd.DataFrame:
    nonfinite = layer_frame[(layer_frame["metric"] == "nonfinite") & (layer_frame["value"] > 0)]
    nonfinite = nonfinite.merge(info[["run", "layer", "position"]], on=["run", "layer"])
    rows = []
    for run in runs:
        config = trace.config(run)
        bad = nonfinite[nonfinite["run"] == run].sort_values(["step", "position"])
        layer_step = float(bad["step"].iloc[0]) if len(bad) else math.nan
        layer = str(bad["layer"].iloc[0]) if len(bad) else None
        steps, values = losses_raw[run]
        loss_step = _first_step(steps, ~np.isfinite(values))
        derived = np.nanmin([layer_step, loss_step]) if not (math.isnan(layer_step) and math.isnan(loss_step)) \
            else math.nan
        at = config.get("diverged_at")
        name = config.get("first_nonfinite_layer")
        source = "config" if at is not None else "trace" if not math.isnan(derived) else None
        rows.append({"run": run, "diverged_at": float(at) if at is not None else float(derived),
                     "first_nonfinite_layer": str(name) if name is not None else layer, "source": source})
    return pd.DataFrame(rows, columns=["run", "diverged_at", "first_nonfinite_layer", "source"])


# --------------------------------------------------------------------------- findings

def _convergence_findings(conv: pd.DataFrame, pair: tuple[str, str] | None) -> list[Finding]:
    ok = conv[conv["steps_to_target"].notna()]
    if ok.empty:
        return []
    out = []
    target = float(ok["target_loss"].iloc[0])
    if len(ok) == 1:
        r = ok.iloc[0]
        step = _step(r["steps_to_target"])
        out.append(Finding("convergence", f"The {r['run']} run's smoothed loss (window {r['smoothing_window']}) "
                           f"reaches its minimum {_num(target)} at step {step}; its final loss is "
                           f"{_num(r['final_loss'])}.", r["run"], None, step, target))
        return out
    setter = ok.loc[ok["min_smoothed_loss"].idxmax(), "run"]
    out.append(Finding("convergence", f"Target loss {_num(target)}: the lowest smoothed loss every run reaches "
                       f"(the minimum of the {setter} run).", setter, None, None, target))
    for _, r in ok.iterrows():
        step = _step(r["steps_to_target"])
        out.append(Finding("convergence", f"The {r['run']} run reaches the target loss at step {step}; its lowest "
                           f"smoothed loss is {_num(r['min_smoothed_loss'])} and its final loss "
                           f"{_num(r['final_loss'])}.", r["run"], None, step, float(step)))
    if pair and set(pair) <= set(ok["run"]):
        a, b = (ok.set_index("run").loc[p, "steps_to_target"] for p in pair)
        if a == b:
            text = f"The {pair[0]} and {pair[1]} runs reach the target loss at the same step ({int(a)})."
        else:
            fast, slow = (pair[0], pair[1]) if a < b else (pair[1], pair[0])
            text = (f"The {fast} run reaches the target loss {int(abs(b - a))} steps before the {slow} run "
                    f"(step {int(min(a, b))} vs {int(max(a, b))}).")
        out.append(Finding("convergence", text, None, None, None, float(abs(b - a))))
    return out


def _stability_findings(stab: pd.DataFrame) -> list[Finding]:
    out = []
    for _, r in stab.iterrows():
        idx = r["oscillation_index"]
        if np.isfinite(idx):
            out.append(Finding("stability", f"The {r['run']} run's loss oscillation index is {_num(idx)}: its "
                               f"loss travels {_num(idx)} times its net change (1 = monotone).", r["run"],
                               value=float(idx)))
        if r["val_evaluations"] >= 2 and not pd.isna(r["val_spikes"]):
            n, steps = int(r["val_spikes"]), r["spike_steps"]
            if n:
                where = ", ".join(str(s) for s in steps)
                text = (f"The {r['run']} run's validation loss rose by more than 10% at {n} of its "
                        f"{r['val_evaluations']} evaluations (step{'s' if n > 1 else ''} {where}).")
            else:
                text = (f"The {r['run']} run's validation loss never rose by more than 10% between "
                        f"consecutive evaluations ({r['val_evaluations']} evaluations).")
            out.append(Finding("stability", text, r["run"], None, steps[0] if steps else None, float(n)))
    return out


def _generalization_findings(gen: pd.DataFrame) -> list[Finding]:
    out = []
    for _, r in gen.iterrows():
        if not np.isfinite(r["train_loss"]):
            continue
        parts = [f"a train loss of {_num(r['train_loss'])} (mean of its last {r['tail_steps']} steps)"]
        if np.isfinite(r["val_loss"]):
            parts.append(f"a validation loss of {_num(r['val_loss'])} (gap {_num(r['gap'])})")
        if np.isfinite(r["val_accuracy"]):
            parts.append(f"a validation accuracy of {_pct(r['val_accuracy'])}")
        text = f"The {r['run']} run ends with " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1
                                                    else parts[0])
        if np.isfinite(r["val_step"]):
            text += f" (validation at step {int(r['val_step'])})"
        value = r["gap"] if np.isfinite(r["gap"]) else r["train_loss"]
        out.append(Finding("generalization", text + ".", r["run"], None, _step(r["val_step"]), float(value)))
    return out


def _describe_layer(r: pd.Series) -> str:
    nl = f" ({_name(r['nonlinearity'])})" if _name(r["nonlinearity"]) else ""
    return f"`{r['layer']}`{nl}"


def _saturation_findings(sat: pd.DataFrame, runs: list[str], pair: tuple[str, str] | None) -> list[Finding]:
    out = []
    sat = sat[np.isfinite(sat["max_saturation"].to_numpy(dtype=float))]
    for run in runs:
        s = sat[sat["run"] == run]
        if s.empty:
            continue
        w = s.loc[s["max_saturation"].idxmax()]
        peak, peak_step = float(w["max_saturation"]), _step(w["max_saturation_step"])
        if peak > SATURATED:
            text = (f"{_describe_layer(w)} is the most saturated layer of the {run} run: first over 50% saturated "
                    f"at step {_step(w['first_step_above_half'])}")
            if not pd.isna(w["first_step_above_90"]):
                text += f", over 90% at step {_step(w['first_step_above_90'])}"
            text += (f"; peak {_pct(peak)} at step {peak_step}; over 50% at {_pct(w['steps_above_half'])} of its "
                     "recorded steps.")
            out.append(Finding("saturation", text, run, w["layer"], _step(w["first_step_above_half"]), peak))
        else:
            out.append(Finding("saturation", f"No layer of the {run} run is ever more than 50% saturated; the most "
                               f"saturated is {_describe_layer(w)} at {_pct(peak)} (step {peak_step}).",
                               run, w["layer"], peak_step, peak))
        g = s[np.isfinite(s["min_gain"].to_numpy(dtype=float))]
        if not g.empty:
            lo = g.loc[g["min_gain"].idxmin()]
            gain, step = float(lo["min_gain"]), _step(lo["min_gain_step"])
            if gain < LOW_GAIN:
                text = (f"{_describe_layer(lo)} passes as little as {_pct(gain)} of the gradient in the {run} run "
                        f"(gain {_num(gain)} at step {step}); its gain is below 0.5 at "
                        f"{_pct(lo['steps_gain_below_half'])} of its recorded steps.")
            else:
                text = (f"Every layer of the {run} run with a gain keeps it at or above 0.5 (lowest "
                        f"{_num(gain)}, {_describe_layer(lo)} at step {step}).")
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
                text += (f"is first over 50% saturated at step {_step(o['first_step_above_half'])}"
                         if not pd.isna(o["first_step_above_half"]) else "is never over 50% saturated")
                text += (f": it peaks at {_pct(o['max_saturation'])} (step {_step(o['max_saturation_step'])}), "
                         f"against {_pct(w['max_saturation'])} in the {w['run']} run.")
                out.append(Finding("saturation", text, other, o["layer"], _step(o["max_saturation_step"]),
                                   float(o["max_saturation"])))
    return out


_VERDICT_RANGE = {"vanishing": "below 1e-2", "exploding": "above 1e2", "healthy": "between 1e-2 and 1e2"}


def _gradient_findings(summary: pd.DataFrame, pair: tuple[str, str] | None) -> list[Finding]:
    out = []
    for _, r in summary.iterrows():
        if _name(r["verdict"]) is not None:
            text = (f"In the {r['run']} run the output-gradient norm at the first layer `{r['first_layer']}` is "
                    f"{_num(r['median_ratio'])} times that at the last layer `{r['last_layer']}` (median over "
                    f"{r['steps']} steps): {r['verdict']} ({_VERDICT_RANGE[r['verdict']]}); the most extreme "
                    f"ratio is {_num(r['worst_ratio'])} at step {_step(r['worst_step'])}.")
            out.append(Finding("gradient_flow", text, r["run"], None, _step(r["worst_step"]),
                               float(r["median_ratio"])))
        if np.isfinite(r["median_update_ratio"]):
            out.append(Finding("gradient_flow", f"The median weight update ratio of the {r['run']} run is "
                               f"{_num(r['median_update_ratio'])}.", r["run"],
                               value=float(r["median_update_ratio"])))
    if pair:
        s = summary.set_index("run")
        if all(_name(s.loc[p, "verdict"]) is not None for p in pair):
            text = "Gradient flow: " + ", ".join(
                f"{p} {s.loc[p, 'verdict']} (median ratio {_num(s.loc[p, 'median_ratio'])})" for p in pair) + "."
            out.append(Finding("gradient_flow", text))
    return out


def _shift_findings(summary: pd.DataFrame, runs: list[str], pair: tuple[str, str] | None) -> list[Finding]:
    out = []
    for run in runs:
        s = summary[summary["run"] == run]
        total, layers = s[s["layer"] == ""], s[s["layer"] != ""]
        if total.empty:
            continue
        t = total.iloc[0]
        parts = [f"{name} {_num(t[col])}" for name, col in (("W2", "mean_w2_prev"), ("W1", "mean_w1_prev"))
                 if np.isfinite(t[col])]
        if not parts:
            continue
        key = "mean_w2_prev" if np.isfinite(t["mean_w2_prev"]) else "mean_w1_prev"
        top = layers.loc[layers[key].idxmax()] if layers[key].notna().any() else None
        text = (f"In the {run} run the mean covariate shift between consecutive detail steps is "
                f"{' and '.join(parts)} (in reference standard deviations, averaged over {len(layers)} layers)")
        if top is not None:
            text += f"; largest in `{top['layer']}` ({key[5:7].upper()} {_num(top[key])})"
        out.append(Finding("covariate_shift", text + ".", run, None if top is None else top["layer"],
                           value=float(t[key])))
    if pair:
        a, b = (summary[(summary["run"] == p) & (summary["layer"] != "")].set_index("layer") for p in pair)
        shared = [layer for layer in a.index if layer in b.index]
        for name, col in (("W2", "mean_w2_prev"), ("W1", "mean_w1_prev")):
            ok = [layer for layer in shared if np.isfinite(a.loc[layer, col]) and np.isfinite(b.loc[layer, col])]
            if not ok:
                continue
            ma, mb = float(a.loc[ok, col].mean()), float(b.loc[ok, col].mean())
            text = (f"Over the {len(ok)} layers both runs share, the mean {name} shift between consecutive detail "
                    f"steps is {_num(ma)} in the {pair[0]} run and {_num(mb)} in the {pair[1]} run")
            lo, hi = sorted([(ma, pair[0]), (mb, pair[1])])
            if lo[0] > 0 and hi[0] != lo[0]:
                text += f" ({_num(hi[0] / lo[0])} times as large in the {hi[1]} run)"
            out.append(Finding("covariate_shift", text + ".", value=mb - ma))
    return out


def _divergence_findings(div: pd.DataFrame) -> list[Finding]:
    diverged = div[div["diverged_at"].notna()]
    if diverged.empty:
        if div.empty:
            return []
        return [Finding("divergence", f"No run diverged: none of the {len(div)} runs recorded a non-finite "
                        "loss or layer output." if len(div) > 1 else
                        f"The {div['run'].iloc[0]} run did not diverge: it recorded no non-finite loss or layer "
                        "output.")]
    out = []
    for _, r in div.iterrows():
        if pd.isna(r["diverged_at"]):
            out.append(Finding("divergence", f"The {r['run']} run did not diverge.", r["run"]))
            continue
        step = _step(r["diverged_at"])
        text = f"The {r['run']} run diverged at step {step}"
        layer = _name(r["first_nonfinite_layer"])
        if layer is not None:
            text += f"; the first non-finite output is in `{layer}`"
        out.append(Finding("divergence", text + ".", r["run"], layer, step, float(step)))
    return out


# ------------------------------------------------------------------------------ entry

def _analyze(trace: Trace) -> Analysis:
    runs = trace.runs
    info = trace.layer_info()
    run_frame = trace.scalars(layer="", metric=["loss", "val_loss", "val_accuracy"])
    layer_frame = trace.scalars(metric=["saturation", "gain", "grad_norm", "std", "nonfinite",
                                        "weight.update_ratio"])
    layer_frame = layer_frame[layer_frame["layer"] != ""]
    raw = {run: _series(run_frame, run, "loss") for run in runs}
    losses = {run: _finite_part(*raw[run]) for run in runs}
    pair = _pair(trace, runs)

    convergence = _convergence(runs, losses)
    stability = _stability(runs, losses, run_frame)
    generalization = _generalization(runs, losses, run_frame)
    saturation = _saturation(layer_frame, info)
    flow = _gradient_flow(layer_frame, info)
    gradient_summary = _gradient_summary(runs, flow, layer_frame)
    shift = _covariate_shift(trace.units(), trace.histograms(), layer_frame, info)
    shift_summary = _shift_summary(runs, shift, info)
    divergence = _divergence(trace, runs, raw, layer_frame, info)

    findings = (_convergence_findings(convergence, pair) + _stability_findings(stability)
                + _generalization_findings(generalization) + _saturation_findings(saturation, runs, pair)
                + _gradient_findings(gradient_summary, pair) + _shift_findings(shift_summary, runs, pair)
                + _divergence_findings(divergence))
    return Analysis(runs, convergence, stability, generalization, saturation, flow, gradient_summary, shift,
                    shift_summary, divergence, findings)
