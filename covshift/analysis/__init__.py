"""Analysis of a trace: convergence, stability, generalization, saturation, gradient flow,
covariate shift and divergence, as DataFrames and plain-English findings.

``analyze(trace_or_path)`` returns an :class:`Analysis`. Every number is computed per
run from what the trace holds; a quantity the trace cannot give is NaN (or ``None``) and
produces no finding. Steps are the recorded step numbers.

Each section has its module, which defines its quantities and writes its findings:
:mod:`.outcomes` (did each run train? read first), :mod:`.pairing` (which bn layer plays
the role of which nobn layer), :mod:`.convergence`, :mod:`.stability`, :mod:`.generalization`, :mod:`.saturation`,
:mod:`.gradient_flow`, :mod:`.covariate_shift` and :mod:`.divergence`. :mod:`.common` defines
the loss they read and the seed pairs of bn and nobn runs (:func:`.common.seed_pairs`). :mod:`.claims` checks the classic
BatchNorm claims against an analysis; :mod:`.sweep` analyses a sweep.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..store import Trace, load
from . import (common, convergence, covariate_shift, divergence, generalization, gradient_flow, instruments, outcomes,
               pairing, saturation, stability)
from .common import Finding

__all__ = ["SECTIONS", "Analysis", "Finding", "analyze"]


SECTIONS = ("outcomes", "convergence", "stability", "generalization", "saturation", "gradient_flow",
            "covariate_shift", "divergence")


@dataclass
class Analysis:
    """All tables of an analysis and its findings (see the module docstring)."""
    runs: list[str]
    seeds: pd.DataFrame      #: the BN pairs: seed, bn, nobn (:func:`.common.seed_pairs`)
    outcomes: pd.DataFrame   #: per run: trained, did not train or diverged (:mod:`.outcomes`)
    pairs: pd.DataFrame      #: role-matched layers of the first pair: role, kind, index, bn, nobn
    convergence: pd.DataFrame
    stability: pd.DataFrame
    generalization: pd.DataFrame
    saturation: pd.DataFrame
    gradient_flow: pd.DataFrame
    gradient_summary: pd.DataFrame
    covariate_shift: pd.DataFrame
    shift_summary: pd.DataFrame
    divergence: pd.DataFrame
    instruments: pd.DataFrame  #: the gradient-based ICS and landscape measurements (:mod:`.instruments`)
    evaluations: pd.DataFrame  #: per run and evaluation: train_eval_loss, val_loss, ... (:mod:`.generalization`)
    losses: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  #: finite loss per run
    configs: dict[str, dict] = field(default_factory=dict)  #: each run's config
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


def _analyze(trace: Trace) -> Analysis:
    runs = trace.runs
    info = trace.layer_info()
    run_frame = trace.scalars(layer="", metric=["loss", "val_loss", "val_accuracy", "train_eval_loss", "val_loss_se"])
    layer_frame = trace.scalars(metric=["saturation", "gain", "dead", "grad_norm", "grad_rms", "std", "nonfinite",
                                        "weight.update_ratio", "unit_count"])
    layer_frame = layer_frame[layer_frame["layer"] != ""]
    raw = {run: common.series(run_frame, run, "loss") for run in runs}
    losses = {run: common.finite_part(*raw[run]) for run in runs}
    seeds = common.seed_pairs(trace)
    pair = (str(seeds['bn'].iloc[0]), str(seeds['nobn'].iloc[0])) if len(seeds) else None  # what findings compare
    pairs = pairing.pairs(info, *pair) if pair else pd.DataFrame(columns=pairing.COLUMNS)

    conv = convergence.table(runs, losses)
    stab = stability.table(runs, losses, run_frame)
    gen = generalization.table(runs, losses, run_frame)
    configs = {run: trace.config(run) for run in runs}
    evaluations = generalization.evaluations(runs, run_frame, configs)
    units = trace.units()
    sat = saturation.table(layer_frame, info, units)
    flow = gradient_flow.table(layer_frame, info)
    gradient_summary = gradient_flow.summary(runs, flow, layer_frame)
    shift = covariate_shift.table(units, trace.histograms(), layer_frame, info)
    shift_summary = covariate_shift.summary(runs, shift, info)
    div = divergence.table(trace, runs, raw, layer_frame, info)
    result = outcomes.table(trace, runs, losses, run_frame, div, seeds)

    findings = (outcomes.findings(result, seeds) + convergence.findings(conv, pair) + stability.findings(stab)
                + generalization.findings(gen) + generalization.pair_finding(evaluations, pair)
                + saturation.findings(sat, runs, pair, pairs) + gradient_flow.findings(gradient_summary, pair, pairs)
                + covariate_shift.findings(shift_summary, info, pairs, runs, pair)
                + divergence.findings(div))
    return Analysis(runs, seeds, result, pairs, conv, stab, gen, sat, flow, gradient_summary, shift, shift_summary,
                    div, instruments.measurements(trace), evaluations, losses, configs, findings)
