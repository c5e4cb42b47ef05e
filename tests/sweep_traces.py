"""Synthetic sweep traces with known answers, written the way `covshift sweep` records a sweep.

One run per variant, learning rate, init scale and seed, with ``sweep: True`` and the grid in
its config. A run's loss falls linearly from ``start`` with slope ``slope`` to ``floor``; a
diverging run records finite losses until the step it diverges at, then an infinite one. Its
validation accuracy is logged twice and ends at ``acc`` (None: never logged); ``chance`` (when given) is recorded
as the config's ``chance_accuracy``.
"""

from __future__ import annotations

import math

import numpy as np

from covshift.store import TraceWriter

STEPS = 100
START = 2.0
LRS = [0.003, 0.03, 0.3, 3.0]
LAYERS = [("fc1", "Linear", None), ("act1", "Tanh", "tanh"), ("fc2", "Linear", None)]


def outcome(diverge: int | None = None, slope: float = 0.03, floor: float = 0.2, sat: float = 0.1,
            g1: float = 1.0, g2: float = 2.0, acc: float | None = 0.9, start: float = START,
            chance: float | None = None) -> dict:
    return {"diverge": diverge, "slope": slope, "floor": floor, "sat": sat, "g1": g1, "g2": g2, "acc": acc,
            "start": start, "chance": chance}


def curve(o: dict) -> np.ndarray:
    """The losses a run records: linear fall to the floor, cut by an infinite loss at divergence."""
    t = np.arange(STEPS if o["diverge"] is None else o["diverge"] + 1, dtype=float)
    loss = np.maximum(o["start"] - o["slope"] * t, o["floor"])
    if o["diverge"] is not None:
        loss[-1] = math.inf
    return loss


def name(variant: str, lr: float, scale: float, seed: int) -> str:
    return f"{variant} lr={lr:g} init={scale:g} seed={seed}"


def write_sweep(path, settings, plain: dict | None = None) -> str:
    """Write ``settings`` {(variant, lr, init_scale, seed): outcome} as sweep runs, and
    ``plain`` {run name: outcome} as runs of a plain `covshift trace` pair."""
    writer = TraceWriter(path)
    try:
        runs = [(name(*key), key, o) for key, o in settings.items()]
        runs += [(run, (run, 0.1, 1.0, 0), o) for run, o in (plain or {}).items()]
        for run, (variant, lr, scale, seed), o in runs:
            loss = curve(o)
            config = {"variant": variant, "lr": lr, "seed": seed, "chance_accuracy": o["chance"]}
            if run != variant:
                config.update(sweep=True, init_scale=scale, planned_steps=STEPS)
            rid = writer.add_run(run, config)
            for pos, (layer, kind, nl) in enumerate(LAYERS):
                writer.add_layer(rid, layer, kind, nl, pos, None)
            rows = []
            for t, value in enumerate(loss):
                rows += [(t, "", "loss", float(value)), (t, "act1", "saturation", o["sat"]),
                         (t, "fc1", "grad_rms", o["g1"]), (t, "act1", "grad_rms", 1.5),
                         (t, "fc2", "grad_rms", o["g2"])]
                if t % 50 == 49:  # two evaluations; the last gives the final accuracy
                    rows.append((t, "", "val_loss", float(value) * 1.1))
                    if o["acc"] is not None:
                        rows.append((t, "", "val_accuracy", o["acc"] * (t + 1) / STEPS))
            writer.write(rid, rows, [], [])
            final = None if o["diverge"] is not None else float(loss[-10:].mean())
            writer.update_config(rid, steps=len(loss), diverged_at=o["diverge"],
                                 first_nonfinite_layer=None if o["diverge"] is None else "fc2",
                                 train_loss=final, val_loss=None, val_accuracy=None)
    finally:
        writer.close()
    return str(path)


def grid(rule, lrs=LRS, scales=(0.5, 1.0, 2.0), seeds=(0,)) -> dict:
    """Every setting of the grid, ``rule(variant, lr, scale, seed)`` giving its outcome."""
    return {(v, lr, s, seed): rule(v, lr, s, seed) for v in ("bn", "nobn") for lr in lrs for s in scales
            for seed in seeds}


def diverging_at(bn_limit: float, nobn_limit: float):
    """bn diverges at lr >= bn_limit, nobn at lr >= nobn_limit."""
    def rule(v, lr, s, seed):
        return outcome(diverge=10) if lr >= (bn_limit if v == "bn" else nobn_limit) else outcome()
    return rule
