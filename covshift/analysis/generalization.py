"""Generalization of each run: its final train and validation numbers, and the bn and nobn
runs compared at the same training loss, as tables and findings.

**Final values.** ``train_loss`` = the last ``train_eval_loss`` (the model in eval mode on
a fixed part of the training set, logged by ``covshift trace`` with each validation;
``train_source`` "eval"); without it (a Tracer in your own loop), the mean finite mini-batch
loss over the last ``max(1, ⌈0.1 n⌉)`` steps (``train_source`` "batches"); ``val_loss``, ``val_accuracy`` = the last logged values (at ``val_step``);
``gap = val_loss − train_loss``.

**Matched training loss** (:func:`matched`). Two runs that end at different training losses
are not compared at their ends but where both have fitted the training set equally well.
The *matched level* is the higher of the two runs' lowest ``train_eval_loss``: the lowest
training loss both runs reach. Each run is read at the point where its ``train_eval_loss``
first comes down to that level: its first evaluation at or below the level, linearly
interpolated (in ``train_eval_loss``) with the evaluation before it, so that both runs sit at
exactly the level; ``step``, ``val_loss`` and ``val_accuracy`` are interpolated with the
same weight. A run whose first evaluation is already at or below the level has no evaluation
before it: it is read at that first evaluation, whose ``train_loss`` is then below the level.
Interpolation, rather than the first evaluation at or below the level, keeps the run that
crosses the level between two sparse evaluations from being read after extra training. There
``gap = val_loss − train_loss`` and ``n`` = the run's ``val_examples``. Without
``train_eval_loss`` in either run (a Tracer in your own loop) nothing can be matched: each run
is read at its last evaluation and ``matched`` is False.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from . import common
from .common import Finding
from .intervals import Z, accuracy_se

TAIL_FRACTION = 0.10       #: the final train loss averages this fraction of the steps
EVALUATION_COLUMNS = ["run", "step", "train_eval_loss", "val_loss", "val_accuracy", "val_examples"]


def table(runs: list[str], losses: dict, run_frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run in runs:
        values = losses[run][1]
        tail = max(1, math.ceil(TAIL_FRACTION * len(values)))
        train = float(values[-tail:].mean()) if len(values) else math.nan
        _, evals = common.series(run_frame, run, "train_eval_loss")
        source = "eval" if len(evals) else "batches"
        train = float(evals[-1]) if len(evals) else train
        val_steps, val = common.series(run_frame, run, "val_loss")
        _, acc = common.series(run_frame, run, "val_accuracy")
        val_loss = float(val[-1]) if len(val) else math.nan
        rows.append({"run": run, "train_loss": train, "val_loss": val_loss,
                     "val_accuracy": float(acc[-1]) if len(acc) else math.nan, "gap": val_loss - train,
                     "val_step": float(val_steps[-1]) if len(val) else math.nan,
                     "tail_steps": tail if len(values) else 0, "train_source": source})
    return pd.DataFrame(rows, columns=["run", "train_loss", "train_source", "val_loss", "val_accuracy", "gap",
                                       "val_step", "tail_steps"])


def evaluations(runs: list[str], run_frame: pd.DataFrame, configs: Mapping[str, dict]) -> pd.DataFrame:
    """One row per run and evaluation step: ``train_eval_loss``, ``val_loss``, ``val_accuracy``
    (NaN where not logged) and the run's ``val_examples`` (config; NaN without it)."""
    metrics = EVALUATION_COLUMNS[2:5]
    rows = run_frame[run_frame["run"].isin(runs) & run_frame["metric"].isin(metrics)]
    wide = rows.pivot_table(index=["run", "step"], columns="metric", values="value", aggfunc="last", observed=True)
    wide = wide.reindex(columns=metrics).reset_index()
    wide["val_examples"] = [float(configs.get(run, {}).get("val_examples") or math.nan) for run in wide["run"]]
    return wide.reindex(columns=EVALUATION_COLUMNS).sort_values(["run", "step"], ignore_index=True)


def _read(ev: pd.DataFrame, level: float) -> dict:
    """One run's values where its train_eval_loss first comes down to ``level`` (interpolated
    with the evaluation before), or at its last evaluation when ``level`` is NaN."""
    if math.isnan(level):
        at, before, weight = len(ev) - 1, len(ev) - 1, 1.0
    else:
        at = int(np.flatnonzero(ev["train_eval_loss"].to_numpy() <= level)[0])
        before = max(at - 1, 0)
        prev, cur = ev["train_eval_loss"].iloc[before], ev["train_eval_loss"].iloc[at]
        weight = 1.0 if at == 0 else (prev - level) / (prev - cur)
    out = {key: float(ev[column].iloc[before] + weight * (ev[column].iloc[at] - ev[column].iloc[before]))
           for key, column in (("step", "step"), ("train_loss", "train_eval_loss"), ("val_loss", "val_loss"),
                               ("val_accuracy", "val_accuracy"))}
    if at > 0:
        out["train_loss"] = level  # exactly, not up to rounding
    out["gap"] = out["val_loss"] - out["train_loss"]
    out["n"] = float(ev["val_examples"].iloc[at])
    return out


def matched(frame: pd.DataFrame, bn: str, nobn: str) -> dict:
    """The two runs at the lowest eval-mode training loss both reach (module docstring).

    ``frame`` is :func:`evaluations`. Returns ``{"level", "matched", "bn": side, "nobn": side}``
    where each side has ``step``, ``train_loss``, ``val_loss``, ``val_accuracy``, ``gap`` and ``n``
    (NaN where missing; every value NaN for a run without evaluations)."""
    evals = {run: frame[frame["run"] == run].sort_values("step") for run in (bn, nobn)}
    fitted = {run: ev[np.isfinite(ev["train_eval_loss"].to_numpy(dtype=float))] for run, ev in evals.items()}
    both = all(len(ev) for ev in fitted.values())
    level = max(float(ev["train_eval_loss"].min()) for ev in fitted.values()) if both else math.nan
    sides = {}
    for side, run in (("bn", bn), ("nobn", nobn)):
        ev = fitted[run] if both else evals[run]
        sides[side] = _read(ev.reset_index(drop=True), level) if len(ev) else dict.fromkeys(
            ("step", "train_loss", "val_loss", "val_accuracy", "gap", "n"), math.nan)
    return {"level": level, "matched": both, **sides}


def accuracy_difference_se(m: dict) -> float:
    """Binomial standard error of bn − nobn validation accuracy at the points of :func:`matched`."""
    return math.hypot(accuracy_se(m["bn"]["val_accuracy"], m["bn"]["n"]),
                      accuracy_se(m["nobn"]["val_accuracy"], m["nobn"]["n"]))


def points(m: dict, bn: str = "bn", nobn: str = "nobn") -> str:
    """Where :func:`matched` read the two runs, e.g. "bn at step 40, nobn at step 900"."""
    def at(name: str, side: dict) -> str:
        if not math.isfinite(side["step"]):
            return f"{name} without evaluations"
        text = f"{name} at step {round(side['step'])}"
        if m["matched"] and side["train_loss"] < m["level"]:
            text += f" (its first evaluation, already at {common.num(side['train_loss'])})"
        return text
    return f"{at(bn, m['bn'])}, {at(nobn, m['nobn'])}"


def where(m: dict) -> str:
    """The matched training loss and the two points, or why there is none."""
    if m["matched"]:
        return f"at training loss {common.num(m['level'])}: {points(m)}"
    return f"not matched (no eval-mode training loss): the last evaluations, {points(m)}"


def pair_finding(frame: pd.DataFrame, pair: tuple[str, str] | None) -> list[Finding]:
    """The matched comparison of ``pair`` in plain words (none without validation values)."""
    if pair is None:
        return []
    m = matched(frame, *pair)
    b, n = m["bn"], m["nobn"]
    if math.isfinite(b["val_accuracy"]) and math.isfinite(n["val_accuracy"]):
        what = f"validation accuracy is {common.pct(b['val_accuracy'])} vs {common.pct(n['val_accuracy'])}"
        se = accuracy_difference_se(m)
        diff = 100 * (b["val_accuracy"] - n["val_accuracy"])
        what += f" (difference {diff:+.1f} points" + (f" ± {100 * Z * se:.1f} at 95%)" if math.isfinite(se) else ")")
    elif math.isfinite(b["val_loss"]) and math.isfinite(n["val_loss"]):
        what = f"validation loss is {common.num(b['val_loss'])} vs {common.num(n['val_loss'])}"
    else:
        return []
    if math.isfinite(b["gap"]) and math.isfinite(n["gap"]):
        what += f"; the gap (validation − training loss) is {common.num(b['gap'])} vs {common.num(n['gap'])}"
    if m["matched"]:
        text = f"At the same training loss {common.num(m['level'])} ({points(m, *pair)}), {what}."
    else:
        text = (f"No eval-mode training loss was recorded, so the runs are not compared at a matched training "
                f"loss: at their last evaluations ({points(m, *pair)}), {what}.")
    value = b["val_accuracy"] - n["val_accuracy"] if math.isfinite(b["val_accuracy"]) else b["val_loss"] - n["val_loss"]
    return [Finding("generalization", text, value=float(value), runs=tuple(pair))]


def findings(gen: pd.DataFrame) -> list[Finding]:
    out = []
    for _, r in gen.iterrows():
        if not np.isfinite(r["train_loss"]):
            continue
        how = ("in eval mode on the training set" if r["train_source"] == "eval"
               else f"mean of its last {r['tail_steps']} mini-batches")
        parts = [f"a train loss of {common.num(r['train_loss'])} ({how})"]
        if np.isfinite(r["val_loss"]):
            parts.append(f"a validation loss of {common.num(r['val_loss'])} (gap {common.num(r['gap'])})")
        if np.isfinite(r["val_accuracy"]):
            parts.append(f"a validation accuracy of {common.pct(r['val_accuracy'])}")
        text = f"The {r['run']} run ends with " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1
                                                    else parts[0])
        if np.isfinite(r["val_step"]):
            text += f" (validation at step {int(r['val_step'])})"
        value = r["gap"] if np.isfinite(r["gap"]) else r["train_loss"]
        out.append(Finding("generalization", text + ".", r["run"], None, common.step(r["val_step"]), float(value)))
    return out
