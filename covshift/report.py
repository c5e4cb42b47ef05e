"""The written report: Markdown and self-contained HTML, every sentence computed from a trace.

:func:`report` analyses a trace (:mod:`covshift.analysis`), draws the figures
(:mod:`covshift.plots`) and writes ``report.md`` and ``report.html`` beside them. The
table of classic BatchNorm claims marks each claim supported, not supported, or not
measured in this trace, with the numbers and the figure that decide it.

A trace that holds a sweep (runs with ``sweep: True`` in their config, see
:mod:`covshift.sweeps`) gets two more sections, "Effect on learning rate" and "Interaction with
initialization", with their figures; the sweep decides the learning-rate and initialization
claims. The per-run sections and the other claims then describe one pair: the trace's runs
named "bn" and "nobn" when it has them, else the sweep's pair at init scale 1 (or the closest),
the learning rate closest to the sweep's median on a log scale and the smallest seed, shown
under the names bn and nobn (:class:`covshift.sweeps.RunView`).

>>> covshift.report("reports/mlp_sigmoid/trace.covshift", "reports/mlp_sigmoid")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import ics_report, plots, sweeps
from .analysis import Analysis, analyze
from .store import Trace, load
from .sweeps import SweepAnalysis, analyze_sweep

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
#: A claim is supported only when BN beats no-BN by this relative margin.
MARGIN = 0.10


@dataclass
class Claim:
    claim: str
    verdict: str  # "supported", "not supported", "not measured in this trace"
    evidence: str
    figure: str


def _row(frame: pd.DataFrame, run: str) -> pd.Series | None:
    rows = frame[frame["run"] == run] if "run" in frame else frame.iloc[0:0]
    return None if rows.empty else rows.iloc[0]


def _finite(*values: object) -> bool:
    """Whether every value is a finite number (numpy scalars included; None is not)."""
    try:
        return all(math.isfinite(float(v)) for v in values)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


CLAIMS = ("faster convergence", "smoother, stabler training", "higher usable learning rate",
          "lower sensitivity to initialization", "reduced internal covariate shift", "smoother loss landscape",
          "better generalization")
NOT_MEASURED = "not measured in this trace"
#: The claims a sweep decides: claim -> (the sweep option it needs, its figure, its verdict and evidence).
SWEEP_CLAIMS = {
    "higher usable learning rate": ("--lr", sweeps.FILES["lr"], sweeps.lr_verdict),
    "lower sensitivity to initialization": ("--init-scale", sweeps.FILES["init"],
                                            lambda s: sweeps.init_verdict(s, MARGIN)),
}


def claims(a: Analysis, pair: tuple[str, str] = ("bn", "nobn"), sweep: SweepAnalysis | None = None,
           measured: dict[str, tuple[str, str, str]] | None = None) -> list[Claim]:
    """The classic BatchNorm claims: the learning-rate and initialization claims from ``sweep``,
    the others from the runs ``pair`` = (bn run, nobn run) of ``a``; ``measured`` (claim ->
    verdict, evidence, figure) overrides rows with the gradient-based measurements."""
    has_pair = set(pair) <= set(a.runs)
    why = "needs a bn and a nobn run (covshift trace records both)"
    found = {c.claim: c for c in _pair_claims(a, *pair)} if has_pair else {}
    if has_pair:
        found["smoother loss landscape"] = Claim("smoother loss landscape", NOT_MEASURED,
                                                 "measured only with covshift trace --ics-every N", "")
    for claim, (option, figure, decide) in SWEEP_CLAIMS.items():
        if sweep is not None:
            found[claim] = Claim(claim, *decide(sweep), figure)
        else:
            found[claim] = Claim(claim, NOT_MEASURED, f"one pair of runs cannot show it: it needs a sweep over "
                                 f"{option}" if has_pair else why, "")
    if has_pair:
        found.update({c: Claim(c, *row) for c, row in (measured or {}).items()})
    return [found.get(c, Claim(c, NOT_MEASURED, why, "")) for c in CLAIMS]


def _pair_claims(a: Analysis, b_run: str, n_run: str) -> list[Claim]:
    """The claims one pair of runs decides."""
    out = []
    bn, nobn = _row(a.convergence, b_run), _row(a.convergence, n_run)
    b, n = bn["steps_to_target"], nobn["steps_to_target"]
    target = bn["target_loss"]
    if _finite(b, n):
        verdict = "supported" if b <= (1 - MARGIN) * n else "not supported"
        evidence = f"steps to reach training loss {target:.4g}: bn {int(b)}, nobn {int(n)}"
    elif _finite(b):
        verdict, evidence = "supported", f"bn reaches training loss {target:.4g} at step {int(b)}; nobn never does"
    elif _finite(n):
        verdict, evidence = "not supported", f"nobn reaches training loss {target:.4g} at step {int(n)}; bn never does"
    else:
        verdict, evidence = "not measured in this trace", "neither run reaches a common loss level"
    out.append(Claim("faster convergence", verdict, evidence, "batchnorm_training_loss.png"))

    bs, ns = _row(a.stability, b_run), _row(a.stability, n_run)
    bo, no = bs["oscillation_index"], ns["oscillation_index"]
    if _finite(bo, no):
        calmer = bo <= (1 - MARGIN) * no
        evidence = f"oscillation index of the training loss: bn {bo:.3g}, nobn {no:.3g}"
        if _finite(bs["val_spikes"], ns["val_spikes"]):
            calmer = calmer and bs["val_spikes"] <= ns["val_spikes"]
            evidence += f"; validation-loss spikes: bn {int(bs['val_spikes'])}, nobn {int(ns['val_spikes'])}"
        out.append(Claim("smoother, stabler training", "supported" if calmer else "not supported", evidence,
                         "batchnorm_training_loss.png"))
    else:
        out.append(Claim("smoother, stabler training", "not measured in this trace",
                         "a run has too few finite losses", "batchnorm_training_loss.png"))

    layers = a.shift_summary[a.shift_summary["layer"] != ""]  # "" rows are the per-run means
    shared = layers[layers["layer"].isin(set(layers.loc[layers["run"] == b_run, "layer"])
                                         & set(layers.loc[layers["run"] == n_run, "layer"]))]
    means = shared.groupby("run")["mean_w2_prev"].mean() if not shared.empty else pd.Series(dtype=float)
    means = means.rename({b_run: "bn", n_run: "nobn"})
    if _finite(means.get("bn"), means.get("nobn")):
        less = means["bn"] <= (1 - MARGIN) * means["nobn"]
        out.append(Claim("reduced internal covariate shift", "supported" if less else "not supported",
                         f"mean drift between detail steps (W2 / std) over the {shared['layer'].nunique()} layers "
                         f"both runs share: bn {means['bn']:.3g}, nobn {means['nobn']:.3g} (distributional "
                         "shift, as Ioffe & Szegedy 2015 describe it)", "covariate_shift.png"))
    else:
        out.append(Claim("reduced internal covariate shift", "not measured in this trace",
                         "no per-unit statistics at two or more detail steps in both runs", "covariate_shift.png"))

    bg, ng = _row(a.generalization, b_run), _row(a.generalization, n_run)
    if _finite(bg["val_accuracy"], ng["val_accuracy"]):
        better = bg["val_accuracy"] >= ng["val_accuracy"] + 0.01
        evidence = f"final validation accuracy: bn {bg['val_accuracy']:.1%}, nobn {ng['val_accuracy']:.1%}"
    elif _finite(bg["val_loss"], ng["val_loss"]):
        better = bg["val_loss"] <= (1 - MARGIN) * ng["val_loss"]
        evidence = f"final validation loss: bn {bg['val_loss']:.4g}, nobn {ng['val_loss']:.4g}"
    else:
        better, evidence = None, "no validation metrics in the trace"
    verdict = "not measured in this trace" if better is None else ("supported" if better else "not supported")
    out.append(Claim("better generalization", verdict, evidence, "batchnorm_training_loss.png"))
    return out


def _md_code(name: str) -> str:
    """A name as inline Markdown code, safe whatever backticks it holds."""
    fence = "`" * (max((len(m) for m in re.findall(r"`+", name)), default=0) + 1)
    return f"{fence} {name} {fence}" if "`" in name else f"`{name}`"


def _summary(a: Analysis, trace: Trace) -> list[str]:
    lines = [f"Runs: {', '.join(_md_code(r) for r in a.runs)}."]
    for run in a.runs:
        config = trace.config(run)
        conv = _row(a.convergence, run)
        gen = _row(a.generalization, run)
        parts = [f"{config.get('steps', '?')} steps"]
        if conv is not None and _finite(conv["final_loss"]):
            parts.append(f"final training loss {conv['final_loss']:.4g}")
        if gen is not None and _finite(gen["val_accuracy"]):
            parts.append(f"validation accuracy {gen['val_accuracy']:.1%}")
        if config.get("diverged_at") is not None:
            parts.append(f"diverged at step {config['diverged_at']}")
        lines.append(f"- {_md_code(run)}: " + ", ".join(parts) + ".")
    return lines


def markdown(a: Analysis, trace: Trace, figures: dict[str, Path], command: str | None = None,
             sweep: SweepAnalysis | None = None, names: dict[str, str] | None = None) -> str:
    """The report as Markdown; figures are referenced by file name. With a ``sweep``, ``a`` and
    ``trace`` describe one pair of its runs, ``names`` maps their names there to the trace's."""
    out = ["# covshift report", ""]
    if command:
        out += [f"Regenerate with: `{command}`", ""]
    out += ["## Summary", ""]
    if sweep is not None:
        out += [*sweeps.summary_lines(sweep, names or {}), ""]
    out += [*_summary(a, trace), ""]
    if sweep is not None:
        out += sweeps.markdown_sections(sweep, figures)
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
    out += ["| claim | verdict | evidence | figure |", "|---|---|---|---|"]
    for c in claims(a, sweep=sweep, measured=ics_report.claim_rows(trace, "bn", "nobn", MARGIN)):
        out.append(f"| {c.claim} | **{c.verdict}** | {c.evidence.replace('|', '/')} | {c.figure} |")
    out.append("")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escaped HTML of one Markdown line, with `code`, **bold** and [links](url) rendered."""
    parts = re.split(r"(`+ ?.+? ?`+|\*\*.+?\*\*|\[[^\]`]+\]\([^)\s]+\))", text)
    rendered = []
    for part in parts:
        link = re.fullmatch(r"\[([^\]`]+)\]\(([^)\s]+)\)", part)
        if link:
            rendered.append(f'<a href="{html.escape(link.group(2))}">{html.escape(link.group(1))}</a>')
        elif part.startswith("`"):
            rendered.append(f"<code>{html.escape(part.strip('`').strip())}</code>")
        elif part.startswith("**") and part.endswith("**") and len(part) > 4:
            rendered.append(f"<strong>{html.escape(part[2:-2])}</strong>")
        else:
            rendered.append(html.escape(part))
    return "".join(rendered)


def to_html(md: str, figures: dict[str, Path]) -> str:
    """A self-contained HTML page from :func:`markdown`'s output, figures embedded."""
    body: list[str] = []
    open_block = ""  # "ul" or "table" while one is open
    for line in md.splitlines():
        block = "ul" if line.startswith("- ") else "table" if line.startswith("|") else ""
        if open_block and block != open_block:
            body.append(f"</{open_block}>")
            open_block = ""
        if block and not open_block:
            body.append(f"<{block}>")
            open_block = block
        image = re.fullmatch(r"!\[(.+)\]\((.+)\)", line)
        if line.startswith("# "):
            body.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{_inline(line[3:])}</h2>")
        elif block == "ul":
            body.append(f"<li>{_inline(line[2:])}</li>")
        elif block == "table" and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            tag = "th" if cells[0] == "claim" else "td"
            body.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
        elif image and image.group(2) in figures:
            data = base64.b64encode(figures[image.group(2)].read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(image.group(1))}</figcaption></figure>")
        elif line and not block:
            body.append(f"<p>{_inline(line)}</p>")
    if open_block:
        body.append(f"</{open_block}>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "img{max-width:100%}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left;vertical-align:top}code{background:#f3f3f3;padding:0 3px}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>covshift report</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


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
        names = sweeps.default_pair(t, sweep) if sweep is not None else None
        view = sweeps.RunView(t, names) if names is not None else t  # a sweep: its pair under bn/nobn
        a = analyze(view)
        figures = plots.save_all(view, a.covariate_shift, folder)
        figures.update(ics_report.save_figures(view, folder))
        if sweep is not None:
            figures.update(sweeps.save_sweep_figures(sweep, folder))
            for finding in sweep.findings:  # the pairs that fail one way: their own diagnostics
                if len(finding.runs) == 2:
                    pair = sweeps.RunView(t, dict(zip(("bn", "nobn"), finding.runs)))
                    subfolder = folder / sweeps.pair_folder(finding.runs[0])
                    plots.save_all(pair, None, subfolder, only=("saturation", "gradient_flow"))
        md = markdown(a, view, figures, command, sweep, names)
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
