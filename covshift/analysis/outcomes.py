"""Run outcomes: did each run train, fail to train, or diverge? Every comparison of the
runs' dynamics rests on this, so the report opens with it.

Per run (one row of :func:`table`): ``initial_loss`` = the first finite training loss;
``final_loss`` = the smoothed loss (:func:`covshift.analysis.common.smooth`) at the last finite
step; ``loss_removed`` = 1 − final / initial; ``chance`` = the config's ``chance_accuracy``
(the validation set's majority-class frequency, recorded by ``covshift trace``);
``final_accuracy`` = the last ``val_accuracy``; ``diverged_at`` from the divergence table.

**The rule** (:func:`classify`, with the runs of the same seed pair as the comparison group;
all runs of a trace without pairs):

- ``diverged``: the run recorded a non-finite loss or layer output;
- ``did not train``: it removed less than ``MIN_REMOVED`` (10%) of its initial loss;
- ``trained``: it removed at least ``TRAINED_REMOVED`` (50%);
- in between, the run is judged against the best run of its group, because tasks whose
  achievable loss is high (language models) rarely remove half of it: with accuracy and a
  known chance level, it trained when its accuracy gain over chance is at least ``RELATIVE``
  (half) of the best gain in its group; without accuracy, when it removed at least half the
  fraction the best run removed.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..store import Trace
from . import common
from .common import Finding

TRAINED_REMOVED = 0.5  #: removing at least this fraction of the initial loss always counts as trained
MIN_REMOVED = 0.1      #: removing less than this never does
RELATIVE = 0.5         #: in between: at least this share of the best improvement in the run's group
COLUMNS = ["run", "variant", "seed", "outcome", "initial_loss", "final_loss", "loss_removed", "chance",
           "final_accuracy", "diverged_at"]


def classify(diverged: bool, loss_removed: float, accuracy: float = math.nan, chance: float = math.nan,
             best_removed: float = math.nan, best_accuracy: float = math.nan) -> str:
    """``'diverged'``, ``'trained'`` or ``'did not train'`` (the rule of the module docstring).

    >>> classify(False, 0.27, accuracy=0.30, chance=0.1, best_removed=0.97, best_accuracy=0.95)
    'did not train'
    >>> classify(False, 0.30, best_removed=0.40)   # a language model: no accuracy
    'trained'
    """
    if diverged:
        return "diverged"
    if not math.isfinite(loss_removed) or loss_removed < MIN_REMOVED:
        return "did not train"
    if loss_removed >= TRAINED_REMOVED:
        return "trained"
    if math.isfinite(accuracy) and math.isfinite(chance) and math.isfinite(best_accuracy):
        best_gain = best_accuracy - chance
        return "trained" if best_gain > 0 and accuracy - chance >= RELATIVE * best_gain else "did not train"
    best = best_removed if math.isfinite(best_removed) else loss_removed
    return "trained" if loss_removed >= RELATIVE * best else "did not train"


def _groups(runs: list[str], pairs: pd.DataFrame) -> dict[str, list[str]]:
    """Each run's comparison group: its seed pair, else every run outside the pairs."""
    group = {run: [b, n] for b, n in zip(pairs["bn"], pairs["nobn"]) for run in (b, n)}
    rest = [run for run in runs if run not in group]
    return {run: group.get(run, rest) for run in runs}


def table(trace: Trace, runs: list[str], losses: dict[str, tuple[np.ndarray, np.ndarray]],
          run_frame: pd.DataFrame, divergence: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its outcome and the numbers that decide it."""
    rows = {}
    for run in runs:
        config = trace.config(run)
        values = losses[run][1]
        initial = float(values[0]) if len(values) else math.nan
        final = float(common.smooth(values)[-1]) if len(values) else math.nan
        _, acc = common.series(run_frame, run, "val_accuracy")
        at = divergence.loc[divergence["run"] == run, "diverged_at"]
        rows[run] = {"run": run, "variant": config.get("variant"), "seed": config.get("seed"),
                     "initial_loss": initial, "final_loss": final,
                     "loss_removed": 1 - final / initial if initial else math.nan,
                     "chance": float(config.get("chance_accuracy") or math.nan),
                     "final_accuracy": float(acc[-1]) if len(acc) else math.nan,
                     "diverged_at": float(at.iloc[0]) if len(at) else math.nan}
    for run, group in _groups(runs, pairs).items():
        r = rows[run]
        best_removed = max((rows[g]["loss_removed"] for g in group if math.isfinite(rows[g]["loss_removed"])),
                           default=math.nan)
        best_acc = max((rows[g]["final_accuracy"] for g in group if math.isfinite(rows[g]["final_accuracy"])),
                       default=math.nan)
        r["outcome"] = classify(math.isfinite(r["diverged_at"]), r["loss_removed"], r["final_accuracy"], r["chance"],
                                best_removed, best_acc)
    return pd.DataFrame([rows[run] for run in runs], columns=COLUMNS)


def _describe(r: pd.Series) -> str:
    text = f"The {r['run']} run "
    if r["outcome"] == "diverged":
        text += f"diverged at step {int(r['diverged_at'])}"
    else:
        text += "trained" if r["outcome"] == "trained" else "did not train"
        if math.isfinite(r["loss_removed"]):
            text += (f": it removed {common.pct(r['loss_removed'])} of its initial loss "
                     f"({common.num(r['initial_loss'])} → {common.num(r['final_loss'])})")
    if math.isfinite(r["final_accuracy"]):
        text += f" and ends at {common.pct(r['final_accuracy'])} validation accuracy"
        if math.isfinite(r["chance"]):
            text += f" (chance {common.pct(r['chance'])})"
    return text + "."


def findings(outcomes: pd.DataFrame, pairs: pd.DataFrame) -> list[Finding]:
    """One sentence per run, and one per seed pair in which only one variant trained."""
    out = [Finding("outcomes", _describe(r), r["run"], value=float(r["loss_removed"])) for _, r in outcomes.iterrows()]
    result = dict(zip(outcomes["run"], outcomes["outcome"]))
    for b, n in zip(pairs["bn"], pairs["nobn"]):
        if (result.get(b) == "trained") != (result.get(n) == "trained"):
            good, bad = (b, n) if result.get(b) == "trained" else (n, b)
            what = "BatchNorm made training possible" if good == b else "BatchNorm prevented training"
            out.append(Finding("outcomes", f"{what}: the {good} run trained and the {bad} run "
                               f"{'diverged' if result.get(bad) == 'diverged' else 'did not'}.", runs=(good, bad)))
    return out
