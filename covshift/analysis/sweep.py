"""Analysis of a sweep: BN/no-BN pairs trained over learning rate × init scale × seed.

A *sweep run* is a run whose config has ``sweep: True``. Its config places it in the grid:
``variant`` ("bn" or "nobn"), ``lr``, ``init_scale`` and ``seed`` (run names are never
parsed). A trace without sweep runs has no sweep, and :func:`analyze_sweep` returns None.

:func:`analyze_sweep` returns a :class:`~covshift.analysis.sweep_tables.SweepAnalysis`: the
per-run and grid tables of :mod:`covshift.analysis.sweep_tables` (which defines every
quantity) with the findings of :mod:`covshift.analysis.sweep_findings`; the two claims' verdicts
are :mod:`covshift.analysis.sweep_verdicts`. A report
describes one pair of the sweep run by run through :class:`RunView` and :func:`default_pair`;
:mod:`covshift.report.sweep_figures` draws the sweep's figures.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pandas as pd

from ..store import Trace, load
from . import sweep_findings
from .sweep_tables import (
    THRESHOLD_FRACTION,
    VARIANTS,
    SweepAnalysis,
    aggregate,
    init_spreads,
    median_initial,
    metric_of,
    reference,
    summaries,
    sweep_runs,
    usable,
)


def analyze_sweep(trace: Trace | str | os.PathLike[str]) -> SweepAnalysis | None:
    """Analyse the sweep runs of a trace (or a path to one); None when it has no sweep."""
    if not isinstance(trace, Trace):
        with load(trace) as opened:
            return analyze_sweep(opened)
    runs = sweep_runs(trace)
    if runs.empty:
        return None
    m = median_initial(runs)
    scale = reference(runs["init_scale"], None)
    logs = [math.log(v) for v in set(runs["lr"]) if v > 0]
    ref_lr = reference(runs["lr"], float(np.median(logs)) if logs else 0.0)
    lr_table = aggregate(runs[runs["init_scale"] == scale], ["variant", "lr"])
    lr_table.insert(2, "init_scale", scale)
    init_table = aggregate(runs[runs["lr"] == ref_lr], ["variant", "init_scale"])
    init_table.insert(2, "lr", ref_lr)
    metric = metric_of(runs)
    by_seed = usable(runs, scale, metric)
    sa = SweepAnalysis(runs, lr_table, init_table, [], m, THRESHOLD_FRACTION * m, scale, ref_lr, summaries(by_seed),
                       by_seed, init_spreads(runs, ref_lr, metric), metric)
    sa.findings = sweep_findings.lr_findings(sa) + sweep_findings.init_findings(sa) + sweep_findings.failing(sa)
    return sa


class RunView(Trace):
    """Some runs of an open trace, under names of your choosing (``names``: shown -> stored).
    Reads go to the underlying trace; closing the view leaves that trace open."""

    def __init__(self, trace: Trace, names: dict[str, str]) -> None:  # no super().__init__: no own file
        self._trace, self.path = trace, trace.path
        self._names = dict(names)
        self._back = {stored: shown for shown, stored in self._names.items()}

    def close(self) -> None:
        pass

    def _stored(self, run: Any) -> list[str]:
        shown = self.runs if run is None else [run] if isinstance(run, str) else list(run)
        return [self._names[r] for r in shown if r in self._names]

    def _shown(self, frame: pd.DataFrame) -> pd.DataFrame:
        return frame.assign(run=frame["run"].map(self._back))

    @property
    def runs(self) -> list[str]:
        return list(self._names)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(self.layer_info()["layer"]))

    def layer_info(self) -> pd.DataFrame:
        info = self._trace.layer_info()
        return self._shown(info[info["run"].isin(self._back)]).reset_index(drop=True)

    def config(self, run: str) -> dict[str, Any]:
        if run not in self._names:
            raise KeyError(f"no run {run!r} in this view; runs: {', '.join(self.runs) or 'none'}")
        return self._trace.config(self._names[run])

    def scalars(self, run: Any = None, layer: Any = None, metric: Any = None) -> pd.DataFrame:
        return self._shown(self._trace.scalars(self._stored(run), layer, metric))

    def units(self, run: Any = None, layer: Any = None) -> pd.DataFrame:
        return self._shown(self._trace.units(self._stored(run), layer))

    def histograms(self, run: Any = None, layer: Any = None) -> pd.DataFrame:
        return self._shown(self._trace.histograms(self._stored(run), layer))


def default_pair(trace: Trace, sa: SweepAnalysis) -> dict[str, str]:
    """The runs a sweep report describes one by one, as {"bn": run, "nobn": run}: the trace's
    own runs named "bn" and "nobn" when it has both, else the sweep runs at the reference init
    scale and learning rate with the smallest seed (both variants' when they share one)."""
    if {"bn", "nobn"} <= set(trace.runs):
        return {"bn": "bn", "nobn": "nobn"}
    r = sa.runs
    here = r[(r["init_scale"] == sa.init_scale) & (r["lr"] == sa.ref_lr)]
    shared = set.intersection(*(set(here.loc[here["variant"] == v, "seed"]) for v in VARIANTS))
    names = {}
    for v in VARIANTS:
        mine = here[here["variant"] == v].sort_values("seed")
        if shared:
            mine = mine[mine["seed"] == min(shared)]
        if len(mine):
            names[v] = str(mine["run"].iloc[0])
    return names or {str(r["run"].iloc[0]): str(r["run"].iloc[0])}
