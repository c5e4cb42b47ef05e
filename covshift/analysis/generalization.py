"""Generalization of each run: its final train and validation numbers, as a table and findings.

**Generalization.** ``train_loss`` = the last ``train_eval_loss`` (the model in eval mode on
a fixed part of the training set, logged by ``covshift trace`` with each validation;
``train_source`` "eval"); without it (a Tracer in your own loop), the mean finite mini-batch
loss over the last ``max(1, ⌈0.1 n⌉)`` steps (``train_source`` "batches"); ``val_loss``, ``val_accuracy`` = the last logged values (at ``val_step``);
``gap = val_loss − train_loss``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import common
from .common import Finding

TAIL_FRACTION = 0.10       #: the final train loss averages this fraction of the steps


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
