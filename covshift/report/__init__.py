"""The written report: Markdown and self-contained HTML, every sentence computed from a trace.

:func:`report` analyses a trace (:mod:`covshift.analysis`), draws the figures
(:mod:`covshift.report.figures`) and writes ``report.md`` and ``report.html`` beside them. The
table of classic BatchNorm claims (:mod:`covshift.analysis.claims`) marks each claim supported,
not supported, or not measured in this trace, with the numbers and the figure that decide it.

A trace that holds a sweep (runs with ``sweep: True`` in their config, see
:mod:`covshift.analysis.sweep`) gets two more sections, "Effect on learning rate" and "Interaction with
initialization", with their figures; the sweep decides the learning-rate and initialization
claims. The per-run sections and the other claims then describe one pair: the trace's runs
named "bn" and "nobn" when it has them, else the sweep's pair at init scale 1 (or the closest),
the learning rate closest to the sweep's median on a log scale and the smallest seed, shown
under the names bn and nobn (:class:`covshift.analysis.sweep.RunView`).

The Markdown is written by :mod:`covshift.report.markdown`, the HTML by :mod:`covshift.report.html`.

>>> covshift.report("reports/mlp_sigmoid/trace.covshift", "reports/mlp_sigmoid")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

from ..analysis import analyze
from ..analysis.sweep import RunView, analyze_sweep, default_pair
from ..analysis.sweep_findings import pair_folder
from ..store import Trace, load
from . import instrument_figures, markdown, sweep_figures
from .figures import FILES, save_all
from .html import to_html


def report(trace: Trace | str | os.PathLike[str], out_dir: str | os.PathLike[str],
           formats: tuple[str, ...] = ("md", "html"), command: str | None = None) -> dict[str, Path]:
    """Analyse ``trace``, write its figures and ``report.md`` / ``report.html`` into
    ``out_dir``; returns every written file by name."""
    opened = not isinstance(trace, Trace)
    t = load(trace) if opened else trace
    try:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        sweep = analyze_sweep(t)
        names = default_pair(t, sweep) if sweep is not None else None
        view = RunView(t, names) if names is not None else t  # a sweep: its pair under bn/nobn
        a = analyze(view)
        if sweep is None and len(a.seeds) > 1:  # the loss curves show every seed, the rest the first pair
            first = [str(a.seeds[v].iloc[0]) for v in ("bn", "nobn")]
            figures = save_all(view, None, folder, only=("training_loss",))
            shown: Trace = RunView(t, {run: run for run in first})
            shift = a.covariate_shift[a.covariate_shift["run"].isin(first)]
            figures.update(save_all(shown, shift, folder, only=tuple(k for k in FILES if k != "training_loss")))
        else:
            shown = view
            figures = save_all(view, a.covariate_shift, folder)
        figures.update(instrument_figures.save_figures(shown, folder))
        if sweep is not None:
            figures.update(sweep_figures.save_sweep_figures(sweep, folder))
            for finding in sweep.findings:  # the pairs that fail one way: their own diagnostics
                if len(finding.runs) == 2:
                    pair = RunView(t, dict(zip(("bn", "nobn"), finding.runs)))
                    subfolder = folder / pair_folder(finding.runs[0])
                    save_all(pair, None, subfolder, only=("saturation", "gradient_flow"))
        md = markdown.markdown(a, view, figures, command, sweep, names)
        written = dict(figures)
        if "md" in formats:
            written["report.md"] = folder / "report.md"
            written["report.md"].write_text(md, encoding="utf-8")
        if "html" in formats:
            written["report.html"] = folder / "report.html"
            written["report.html"].write_text(to_html(md, figures), encoding="utf-8")
        return written
    finally:
        if opened:
            t.close()


class _CallablePackage(types.ModuleType):
    """``covshift.report`` names both this package and its :func:`report`. covshift imports it
    on first use (fast start-up), and importing a submodule first (``covshift.report.figures``)
    binds the package there: calling the package calls :func:`report`, so both spellings work."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Path]:
        return report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
