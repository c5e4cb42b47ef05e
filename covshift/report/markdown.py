"""The report as Markdown: the summary, one section per part of the analysis with its findings
and figures, a sweep's two sections, and the table of BatchNorm claims.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..analysis import Analysis, common, sweep_tables
from ..analysis.claims import MARGIN, claims, disagreement
from ..analysis.sweep_tables import FILES, SweepAnalysis, fmt_g
from ..store import Trace

SECTIONS = [
    ("Convergence and stability", ("convergence", "stability", "divergence")),
    ("Generalization", ("generalization",)),
    ("Saturation", ("saturation",)),
    ("Gradient flow", ("gradient_flow",)),
    ("Covariate shift", ("covariate_shift",)),
]
FIGURES = {
    "Convergence and stability": ["batchnorm_training_loss.png", "landscape.png"],
    "Saturation": ["saturation.png", "activations.png", "percentiles.png"],
    "Gradient flow": ["gradient_flow.png"],
    "Covariate shift": ["covariate_shift.png", "histograms.png", "ics.png"],
}
#: The sweep's sections: title, findings section and figure.
SWEEP_SECTIONS = [("Effect on learning rate", "learning_rate", FILES["lr"]),
                  ("Interaction with initialization", "initialization", FILES["init"])]


def _md_code(name: str) -> str:
    """A name as inline Markdown code, safe whatever backticks it holds."""
    fence = "`" * (max((len(m) for m in re.findall(r"`+", name)), default=0) + 1)
    return f"{fence} {name} {fence}" if "`" in name else f"`{name}`"


def _cell(text: str) -> str:
    return text.replace("|", "/")


def _outcomes(a: Analysis, trace: Trace) -> list[str]:
    """The run-outcome panel: one row per run, then its sentences."""
    lines = ["| run | outcome | steps | loss removed | initial → final loss | final accuracy (chance) |",
             "|---|---|---|---|---|---|"]
    for _, r in a.outcomes.iterrows():
        acc = f"{r['final_accuracy']:.1%}" if common.all_finite(r["final_accuracy"]) else "-"
        if common.all_finite(r["chance"]):
            acc += f" ({r['chance']:.1%})"
        removed = f"{r['loss_removed']:.1%}" if common.all_finite(r["loss_removed"]) else "-"
        lines.append(f"| {_cell(_md_code(r['run']))} | **{r['outcome']}** | {trace.config(r['run']).get('steps', '?')} "
                     f"| {removed} | {common.num(r['initial_loss'])} → {common.num(r['final_loss'])} | {acc} |")
    return lines + [""] + [f"- {f.text}" for f in a.findings_for("outcomes")]


def _pairs(a: Analysis) -> list[str]:
    """The role table every bn-vs-nobn number uses."""
    if a.pairs.empty:
        return []
    lines = ["## How the layers are compared", "",
             "Layers are matched by type and forward order, not by name (covshift.analysis.pairing).", "",
             "| role | bn | nobn |", "|---|---|---|"]
    lines += [f"| {_cell(r['role'])} | {_cell(_md_code(str(r['bn'])))} | {_cell(_md_code(str(r['nobn'])))} |"
              for _, r in a.pairs.iterrows()]
    return lines + [""]


def summary_lines(sa: SweepAnalysis, names: dict[str, str]) -> list[str]:
    """Summary lines: the sweep's grid, and which runs the per-run sections describe."""
    r = sa.runs
    lrs, scales = ", ".join(map(fmt_g, sorted(set(r["lr"])))), ", ".join(map(fmt_g, sorted(set(r["init_scale"]))))
    lines = [(f"Sweep: {len(r)} runs ({', '.join(sweep_tables.variants(r))}) over learning rates {lrs}, init scales "
              f"{scales} and seeds {', '.join(map(str, sorted(set(r['seed']))))}; "
              f"{int(r['diverged'].sum())} diverged."), ""]
    if all(shown == stored for shown, stored in names.items()):
        lines.append("The per-run sections after the sweep sections describe the runs "
                     + " and ".join(f"`{n}`" for n in names) + ".")
    else:
        lines.append(f"The per-run sections after the sweep sections describe one pair of the sweep (init scale "
                     f"{fmt_g(sa.init_scale)}, learning rate {fmt_g(sa.ref_lr)}, the smallest seed), called "
                     + " and ".join(f"`{shown}` (run `{stored}`)" for shown, stored in names.items()) + " there.")
    return lines


def markdown_sections(sa: SweepAnalysis, figures: dict[str, Path]) -> list[str]:
    """The report's two sweep sections, as Markdown lines."""
    out: list[str] = []
    for title, section, figure in SWEEP_SECTIONS:
        out += [f"## {title}", ""]
        out += [f"- {f.text}" for f in sa.findings if f.section == section] or ["The sweep says nothing on this."]
        out.append("")
        out += [f"![{name}]({name})" for name in (figure, FILES["grid"] if section == "learning_rate" else "")
                if name in figures]
        out.append("")
    return out


def markdown(a: Analysis, trace: Trace, figures: dict[str, Path], command: str | None = None,
             sweep: SweepAnalysis | None = None, names: dict[str, str] | None = None) -> str:
    """The report as Markdown; figures are referenced by file name. With a ``sweep``, ``a`` and
    ``trace`` describe one pair of its runs, ``names`` maps their names there to the trace's."""
    out = ["# covshift report", ""]
    if command:
        out += [f"Regenerate with: `{command}`", ""]
    if sweep is not None:
        out += ["## Summary", "", *summary_lines(sweep, names or {}), ""]
    out += ["## Run outcomes", "", *_outcomes(a, trace), ""]
    if sweep is None and len(a.seeds) > 1:
        first = a.seeds.iloc[0]
        out += [f"The training-loss figure shows all {len(a.seeds)} seeds (line: mean, band: lowest to highest). "
                f"The other figures, and the sentences that compare bn with nobn in each section, describe seed "
                f"{first['seed']}: runs {_md_code(str(first['bn']))} and {_md_code(str(first['nobn']))}. The claims "
                "use every seed.", ""]
    out += _pairs(a)
    if sweep is not None:
        out += markdown_sections(sweep, figures)
    for title, sections in SECTIONS:
        out += [f"## {title}", ""]
        found = [f for f in a.findings if f.section in sections]
        out += [f"- {f.text}" for f in found] or ["Nothing in this trace bears on this section."]
        out.append("")
        out += [f"![{name}]({name})" for name in FIGURES.get(title, []) if name in figures]
        out.append("")
    out += ["## BatchNorm claims, checked against this trace", ""]
    if sweep is not None and names:
        out += ["The learning-rate and initialization claims are decided from the whole sweep, the others from "
                "the runs " + " and ".join(_md_code(r) for r in names.values()) + ".", ""]
    seeds = len(a.seeds)
    out += [f"Each claim compares the bn and nobn runs of {seeds} seed{'s' * (seeds != 1)}; dynamics claims use "
            f"only seeds whose two runs both trained. A ratio claim needs bn ≤ {1 - MARGIN:g} × nobn over the whole "
            "95% interval (covshift.analysis.claims).", ""]
    out += ["| claim | verdict | evidence | figure |", "|---|---|---|---|"]
    found = claims(a, sweep=sweep)
    for c in found:
        out.append(f"| {c.claim} | **{c.label}** | {_cell(c.evidence)} | {c.figure} |")
    out.append("")
    note = disagreement(found)
    if note:
        out += [note, ""]
    return "\n".join(out)
