"""Figures of a trace: structure, labels, colours, scales and awkward traces.

The main fixture records a real trace with covshift.Tracer (a BatchNorm and a no-BatchNorm
run of a tiny tanh network); traces with exact, awkward contents (losses spanning decades,
NaN/inf, a run that diverges, no histograms) are written with TraceWriter directly.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import fit
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from scipy.stats import wasserstein_distance
from torch import nn

import covshift
from covshift.report import distribution_figures, figures, style
from covshift.store import TraceWriter

FIGURES = ["training_loss", "activations", "percentiles", "saturation", "covariate_shift",
           "gradient_flow", "histograms"]


# ---------------------------------------------------------------------------------------
# traces
# ---------------------------------------------------------------------------------------
def record(path, run, model, steps=30, detail_every=5, val_every=10):
    """Train ``model`` on one fixed batch with a Tracer attached, logging val metrics."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))

    def validate(tracer, step):
        if val_every and (step + 1) % val_every == 0:
            with torch.no_grad():
                out = model(x)
            tracer.log(val_loss=nn.functional.cross_entropy(out, y) * 1.1,
                       val_accuracy=(out.argmax(1) == y).float().mean())

    fit(model, path, x, y, steps, lr=0.2, after_step=validate, run=run, detail_every=detail_every, bins=16)


def tiny(batchnorm: bool) -> nn.Module:
    layers = [("fc1", nn.Linear(6, 12))] + ([("fc1_bn", nn.BatchNorm1d(12))] if batchnorm else [])
    return nn.Sequential(OrderedDict(layers + [("act1", nn.Tanh()), ("fc2", nn.Linear(12, 3))]))


def deep(blocks: int, first: str = "fc0") -> nn.Module:
    """``2 * blocks`` layers: Linear + Tanh blocks, the first Linear named ``first``."""
    layers = []
    for i in range(blocks):
        layers += [(first if i == 0 else f"fc{i}", nn.Linear(6 if i == 0 else 4, 4)), (f"act{i}", nn.Tanh())]
    return nn.Sequential(OrderedDict(layers))


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("figures") / "pair.covshift"
    record(path, "bn", tiny(True))
    record(path, "nobn", tiny(False))
    return path


@pytest.fixture
def trace(trace_path):
    with covshift.load(trace_path) as t:
        yield t


def shift_of(trace) -> pd.DataFrame:
    """Covariate shift from the histograms: W1 and W2 (from quantiles) between detail steps."""
    rows = []
    for (run, layer), frame in trace.histograms().groupby(["run", "layer"], sort=False):
        inner = frame[np.isfinite(frame["left"]) & np.isfinite(frame["right"])]
        dists = {s: (((g["left"] + g["right"]) / 2).to_numpy(), g["count"].to_numpy(float))
                 for s, g in inner.groupby("step")}
        steps = sorted(dists)

        def w2(a, b):
            q = np.linspace(0.005, 0.995, 100)
            qa, qb = (np.interp(q, np.cumsum(w) / w.sum(), c) for c, w in (a, b))
            return float(np.sqrt(np.mean((qa - qb) ** 2)))

        for prev, step in itertools.pairwise(steps):
            a, b, f = dists[step], dists[prev], dists[steps[0]]
            rows.append({"run": run, "layer": layer, "step": step, "w2_prev": w2(a, b), "w2_first": w2(a, f),
                         "w1_prev": wasserstein_distance(a[0], b[0], a[1], b[1]),
                         "w1_first": wasserstein_distance(a[0], f[0], a[1], f[1])})
    return pd.DataFrame(rows, columns=list(distribution_figures.SHIFT_COLUMNS))


LAYERS = [("fc", "Linear", None), ("act", "Tanh", "tanh"), ("out", "Linear", None)]


def fake(path, runs=("bn", "nobn"), steps=40, loss=None, val=False, hists=True, layers=LAYERS,
         stop=None, grad=None):
    """A trace with chosen values. ``loss(run, step)`` gives the loss; ``stop[run]`` ends a run
    early; ``grad(run, step, layer)`` overrides layer gradient norms."""
    writer = TraceWriter(path)
    edges = list(np.linspace(-1.0, 1.0, 9))
    rng = np.random.default_rng(0)
    for run in runs:
        rid = writer.add_run(run, {})
        for pos, (name, kind, nonlin) in enumerate(layers):
            writer.add_layer(rid, name, kind, nonlin, pos, edges)
        scalars, histos = [], []
        for step in range((stop or {}).get(run, steps)):
            value = loss(run, step) if loss else 2.0 * 0.98 ** step
            scalars += [(step, "", "loss", value), (step, "", "grad_norm", 1.0)]
            if val and step % 10 == 9:
                scalars += [(step, "", "val_loss", value), (step, "", "val_accuracy", 0.5)]
            for depth, (name, _, nonlin) in enumerate(layers):
                g = grad(run, step, name) if grad else 10.0 ** -depth
                scalars += [(step, name, "mean", 0.1 * depth), (step, name, "std", 0.5),
                            (step, name, "p15", -0.4), (step, name, "p50", 0.0), (step, name, "p85", 0.4),
                            (step, name, "grad_rms", g)]
                if nonlin:
                    scalars += [(step, name, "saturation", 0.1 + step / 100), (step, name, "gain", 0.8)]
                if hists and step % 10 == 0:
                    histos.append((step, name, rng.integers(0, 50, len(edges) + 1)))
        writer.write(rid, scalars, [], histos)
    writer.close()
    return covshift.load(path)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def build(name, trace, shift=None):
    if name == "covariate_shift":
        return distribution_figures.covariate_shift(trace, shift_of(trace) if shift is None else shift)
    return getattr(distribution_figures if name == "histograms" else figures, name)(trace)


def main_axes(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def texts(fig):
    """Every piece of text drawn in the figure (titles, labels, ticks, legends, notes)."""
    fig.canvas.draw()
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text()]


def hex_colors(ax):
    return [mcolors.to_hex(line.get_color()) for line in ax.get_lines()]


def shown_ticks(axis):
    return [t.get_text() for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]


# ---------------------------------------------------------------------------------------
# structure and labels
# ---------------------------------------------------------------------------------------
EXPECTED_AXES = {"training_loss": 3, "activations": 2, "percentiles": 2, "saturation": 4,
                 "covariate_shift": 4, "gradient_flow": 2, "histograms": 2}


@pytest.mark.parametrize("name", FIGURES)
def test_figure_axes_and_labels(trace, name):
    fig = build(name, trace)
    assert isinstance(fig, Figure)
    axes = main_axes(fig)
    assert len(axes) == EXPECTED_AXES[name]
    bottom = max(ax.get_subplotspec().rowspan.start for ax in axes)
    for ax in axes:
        assert ax.get_ylabel(), f"{name}: an axes without a y label"
        assert ax.get_title(), f"{name}: an axes without a title"
        if ax.get_subplotspec().rowspan.start == bottom:
            assert ax.get_xlabel() == "step"
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_texts == ["run bn", "run nobn"]
    if name not in ("training_loss",):  # per-run panels name their run
        titles = [ax.get_title() for ax in axes]
        assert any(t.startswith("bn:") for t in titles) and any(t.startswith("nobn:") for t in titles)
    fig.canvas.draw()


def test_axis_units_and_labels(trace):
    loss = figures.training_loss(trace)
    assert [ax.get_ylabel() for ax in loss.axes] == ["training loss", "validation loss", "validation accuracy (%)"]
    assert main_axes(figures.saturation(trace))[0].get_ylabel() == "fraction saturated"
    grad = figures.gradient_flow(trace)
    assert next(ax for ax in grad.axes if ax.get_label() == "<colorbar>").get_ylabel() == "log10 rms(∂L/∂y)"
    ticks = shown_ticks(main_axes(grad)[0].yaxis)
    assert ticks == ["fc1 (Linear)", "fc1_bn (BatchNorm1d)", "act1 (Tanh)", "fc2 (Linear)"]  # forward order


def test_percentiles_show_the_input_of_each_nonlinearity_by_role(trace):
    fig = figures.percentiles(trace)
    assert [ax.get_title() for ax in fig.axes] == ["bn: input to nonlinearity 1 (fc1_bn, BatchNorm1d)",
                                                   "nobn: input to nonlinearity 1 (fc1, Linear)"]
    fig = figures.percentiles(trace, layer="fc1_bn")  # only in the bn run
    assert "no percentiles of layer fc1_bn in run nobn" in texts(fig)
    with pytest.raises(ValueError, match="no layer 'nope'"):
        figures.percentiles(trace, layer="nope")
    fig = distribution_figures.histograms(trace, layer="fc2")
    titles = [ax.get_title() for ax in main_axes(fig)]
    assert titles == ["bn: layer fc2 (Linear) output", "nobn: layer fc2 (Linear) output"]


def test_save_all_writes_seven_small_pngs(trace, tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    paths = figures.save_all(trace, shift_of(trace), tmp_path / "figs")
    assert plt.get_fignums() == before  # no pyplot figure created, none left open
    assert sorted(paths) == sorted(figures.FILES.values()) == sorted(
        ["batchnorm_training_loss.png", "activations.png", "percentiles.png", "saturation.png",
         "covariate_shift.png", "gradient_flow.png", "histograms.png"])
    for name, path in paths.items():
        assert path == tmp_path / "figs" / name
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert 10_000 < len(data) < 300_000, (name, len(data))


# ---------------------------------------------------------------------------------------
# colours
# ---------------------------------------------------------------------------------------
def test_palette():
    assert set(style.PALETTE) == {"bn", "nobn"} and style.PALETTE["bn"] != style.PALETTE["nobn"]
    colors = style.run_colors(["adam", "bn", "sgd", "nobn"])
    assert colors["bn"] == style.PALETTE["bn"] and colors["nobn"] == style.PALETTE["nobn"]
    assert len(set(colors.values())) == 4
    assert style.run_colors(["adam", "sgd"]) == {"adam": colors["adam"], "sgd": colors["sgd"]}


def test_palette_is_the_same_in_every_figure(trace):
    loss_ax = figures.training_loss(trace).axes[0]
    for run in ("bn", "nobn"):
        (line,) = [ln for ln in loss_ax.get_lines() if ln.get_label() == run]
        assert mcolors.to_hex(line.get_color()) == style.PALETTE[run]
        sat = {ax.get_title(): ax for ax in main_axes(figures.saturation(trace))}
        assert style.PALETTE[run] in hex_colors(sat[f"{run}: fraction saturated per layer"])
        pct = {ax.get_title().split(":")[0]: ax for ax in figures.percentiles(trace).axes}
        assert style.PALETTE[run] in hex_colors(pct[run])


# ---------------------------------------------------------------------------------------
# scales and many layers
# ---------------------------------------------------------------------------------------
def test_spans_decades():
    assert style.spans_decades([1000.0, 0.5])
    assert not style.spans_decades([2.0, 0.5, np.nan, np.inf])
    assert not style.spans_decades([1000.0, 0.5, -1.0])
    assert not style.spans_decades([])


def test_log_scale_when_loss_spans_decades(tmp_path):
    steep = fake(tmp_path / "steep.covshift", loss=lambda run, s: 10.0 * 0.8 ** s)  # 10 -> 2e-3
    flat = fake(tmp_path / "flat.covshift")  # 2 -> 0.9
    assert figures.training_loss(steep).axes[0].get_yscale() == "log"
    assert figures.training_loss(flat).axes[0].get_yscale() == "linear"


def test_forty_layers_show_at_most_twenty_names(tmp_path):
    path = tmp_path / "deep.covshift"
    record(path, "nobn", deep(20), steps=6, val_every=0)  # 40 layers, 20 of them Tanh
    record(path, "wide", deep(40), steps=6, val_every=0)  # 80 layers, 40 of them Tanh
    with covshift.load(path) as trace:
        grad = figures.gradient_flow(trace)
        for ax in main_axes(grad):
            ticks = shown_ticks(ax.yaxis)
            assert 10 <= len(ticks) <= 20
            assert ticks[-1].startswith("act")  # the last layer is always named
        act = figures.activations(trace)
        bars = [ax for ax in act.axes if ax.get_label() == "<colorbar>"]
        assert len(bars) == 2  # 20 and 40 layers: a depth colour bar, not a 40-entry legend
        assert all(ax.get_legend() is None for ax in main_axes(act))
        for bar in bars:
            assert 10 <= len(shown_ticks(bar.yaxis)) <= 20
        for fig in (figures.saturation(trace), distribution_figures.covariate_shift(trace, shift_of(trace))):
            for ax in fig.axes:
                assert len(shown_ticks(ax.yaxis)) <= 20


# ---------------------------------------------------------------------------------------
# awkward traces
# ---------------------------------------------------------------------------------------
def test_layer_names_with_markup_and_dollars(tmp_path):
    path = tmp_path / "odd.covshift"
    model = nn.Sequential(OrderedDict([("<script>$x$", nn.Linear(6, 8)), ("$\\frac{$", nn.Tanh()),
                                       ("out", nn.Linear(8, 3))]))
    record(path, "nobn", model, steps=12)
    with covshift.load(path) as trace:
        assert trace.layers == ["<script>$x$", "$\\frac{$", "out"]
        for name in FIGURES:
            drawn = texts(build(name, trace))
            assert not any("frac{" in t and "\\$" not in t for t in drawn), name
        assert "<script>\\$x\\$ (Linear)" in texts(figures.gradient_flow(trace))  # printed literally


def test_single_run(tmp_path):
    path = tmp_path / "one.covshift"
    record(path, "nobn", tiny(False))
    with covshift.load(path) as trace:
        for name in FIGURES:
            fig = build(name, trace)
            assert [t.get_text() for t in fig.legends[0].get_texts()] == ["run nobn"]
            columns = {ax.get_subplotspec().colspan.start for ax in main_axes(fig)}
            assert columns == ({0, 1, 2} if name == "training_loss" else {0})
            fig.canvas.draw()


def test_without_val_metrics(tmp_path):
    trace = fake(tmp_path / "noval.covshift", val=False)
    fig = figures.training_loss(trace)
    assert len(fig.axes) == 3
    drawn = texts(fig)
    assert any(t.startswith("no val_loss recorded") for t in drawn)
    assert any(t.startswith("no val_accuracy recorded") for t in drawn)
    assert len(fig.axes[0].get_lines()) == 2


def test_validation_accuracy_as_percent(tmp_path):
    fig = figures.training_loss(fake(tmp_path / "val.covshift", val=True))
    assert fig.axes[2].get_ylabel() == "validation accuracy (%)"
    assert any(t.endswith("%") for t in shown_ticks(fig.axes[2].yaxis))


@pytest.mark.parametrize("shift", [pd.DataFrame(), pd.DataFrame(columns=list(distribution_figures.SHIFT_COLUMNS)),
                                   None])
def test_empty_shift(trace, shift):
    fig = distribution_figures.covariate_shift(trace, shift)
    assert len(fig.axes) == 1
    assert fig.axes[0].get_xlabel() == "step" and fig.axes[0].get_ylabel()
    assert any(t.startswith("covariate shift needs per-unit statistics at two or more detail steps") for t in texts(fig))
    assert style.is_placeholder(fig)


def test_shift_shows_the_nonlinearity_inputs_and_the_noise_baseline(tmp_path):
    trace = fake(tmp_path / "t.covshift")  # fc -> act (tanh) -> out: the input of act is fc
    shift = pd.DataFrame([{"run": run, "layer": layer, "step": step, "w2_prev": 0.5, "w2_first": 0.5,
                           "w1_prev": np.nan, "w1_first": np.nan, "baseline": 0.1}
                          for run in ("bn", "nobn") for layer in ("fc", "act", "out") for step in (10, 20)])
    fig = distribution_figures.covariate_shift(trace, shift)
    for ax in main_axes(fig):
        solid = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert [line.get_label() for line in solid] == ["fc"]
        assert len(dashed) == 1 and list(dashed[0].get_ydata()) == pytest.approx([0.1, 0.1])
        assert ax.get_title().endswith("W₂ shift per nonlinearity input")
    assert any("sampling noise" in t for t in texts(fig))


def test_shift_missing_columns(trace):
    with pytest.raises(ValueError, match="missing columns"):
        distribution_figures.covariate_shift(trace, pd.DataFrame({"run": ["bn"], "layer": ["act1"]}))


def test_nonfinite_values_and_a_diverged_run(tmp_path):
    def loss(run, step):
        return float("inf") if run == "nobn" and step == 12 else 2.0 * 0.98 ** step

    def grad(run, step, layer):
        return {3: 0.0, 4: float("inf"), 5: float("nan")}.get(step, 0.5) if layer == "act" else 0.1

    trace = fake(tmp_path / "nan.covshift", loss=loss, grad=grad, stop={"nobn": 13}, val=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from NaN/inf, no glyph warnings
        figs = {name: build(name, trace, shift=pd.DataFrame()) for name in FIGURES}
        for fig in figs.values():
            fig.canvas.draw()
    assert "nobn diverged at step 12" in texts(figs["training_loss"])
    nobn = next(ln for ln in figs["training_loss"].axes[0].get_lines() if ln.get_label() == "nobn")
    # the smoothed line is the analysis' finite part: steps 0..11, before the inf at step 12
    assert list(nobn.get_xdata()) == list(range(12)) and np.isfinite(nobn.get_ydata()).all()
    mesh = main_axes(figs["gradient_flow"])[0].collections[0]
    cells = mesh.get_array()
    assert np.ma.count_masked(cells) == 3  # 0, inf and NaN are masked, grey
    assert np.isfinite(cells.compressed()).all()


def test_diverged_at_from_config(tmp_path):
    path = tmp_path / "cfg.covshift"
    fake(path, stop={"nobn": 8}).close()
    writer = TraceWriter(path)
    writer.update_config(2, diverged_at=7)
    writer.close()
    with covshift.load(path) as trace:
        assert "nobn diverged at step 7" in texts(figures.training_loss(trace))


def test_no_histograms(tmp_path):
    trace = fake(tmp_path / "nohist.covshift", hists=False)
    fig = distribution_figures.histograms(trace)
    assert len(fig.axes) == 1
    assert any(t.startswith("no histograms recorded") for t in texts(fig))
    assert style.is_placeholder(fig)
    written = figures.save_all(trace, pd.DataFrame(), tmp_path / "figs")  # placeholders are not written
    assert sorted(written) == sorted(set(figures.FILES.values()) - {"histograms.png", "covariate_shift.png"})
    assert not (tmp_path / "figs" / "histograms.png").exists()


def test_histograms_of_a_run_without_them(tmp_path):
    path = tmp_path / "mixed.covshift"
    fake(path, runs=("bn",)).close()
    with covshift.load(path) as first:
        assert len(first.histograms()) > 0
    writer = TraceWriter(path)
    rid = writer.add_run("nobn", {})
    writer.add_layer(rid, "act", "Tanh", "tanh", 0, None)
    writer.write(rid, [(0, "", "loss", 1.0), (0, "act", "mean", 0.0)], [], [])
    writer.close()
    with covshift.load(path) as trace:
        fig = distribution_figures.histograms(trace)
        assert any(t.startswith("no histograms of layer") for t in texts(fig))
        assert len(main_axes(fig)) == 2


def test_ics_figure_shows_ics_rel_without_the_first_layer(tmp_path):
    from covshift.report.instrument_figures import ics_figure, save_figures
    writer = TraceWriter(tmp_path / "ics.covshift")
    values = {}
    for run in ("bn", "nobn"):
        rid = writer.add_run(run, {"variant": run})
        for pos, (layer, kind, nl) in enumerate(LAYERS):
            writer.add_layer(rid, layer, kind, nl, pos, None)
        values[run] = {layer: np.linspace(0.1, 0.5, 4) * (2 if run == "nobn" else 1) for layer in ("fc", "out")}
        writer.write(rid, [(3 * k, layer, metric, float(v if metric == "ics_rel" else 1 - v))
                           for layer, vs in values[run].items() for k, v in enumerate(vs)
                           for metric in ("ics_rel", "ics_cos")], [], [])
    writer.close()
    written = save_figures(covshift.load(tmp_path / "ics.covshift"), tmp_path / "out")
    assert (tmp_path / "out" / "ics.png").is_file() and "ics.png" in written
    fig = ics_figure(covshift.load(tmp_path / "ics.covshift"))
    top = fig.axes[:2]  # the ics_rel row: bn, nobn
    for ax, run in zip(top, ("bn", "nobn")):
        assert "‖G − G′‖ / ‖G‖" in ax.get_title()
        lines = ax.get_lines()
        assert [ln.get_label() for ln in lines] == ["out"]  # fc, the first layer, is left out
        np.testing.assert_allclose(lines[0].get_ydata(), values[run]["out"])
    assert top[0].get_shared_y_axes().joined(top[0], top[1])


def test_seed_bands_on_the_loss_curves(tmp_path):
    """With three seed pairs each variant is one line, the mean of the seeds' trailing-mean
    losses, in a band from the lowest to the highest seed (computed here with pandas)."""
    writer = TraceWriter(tmp_path / "seeds.covshift")
    rng = np.random.default_rng(3)
    expected = {}
    for seed in range(3):
        for variant, rate in (("bn", 0.9), ("nobn", 0.97)):
            run = f"{variant} seed={seed}"
            rid = writer.add_run(run, {"variant": variant, "seed": seed})
            loss = 2.0 * rate ** np.arange(100) * np.exp(rng.normal(0, 0.1, 100))
            writer.write(rid, [(s, "", "loss", float(v)) for s, v in enumerate(loss)], [], [])
            expected.setdefault(variant, []).append(pd.Series(loss).rolling(2, min_periods=1).mean())  # w = 2
    writer.close()
    fig = figures.training_loss(covshift.load(tmp_path / "seeds.covshift"))
    ax = fig.axes[0]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["run bn (3 seeds)", "run nobn (3 seeds)"]
    for variant, band in zip(("bn", "nobn"), ax.collections):
        table = pd.concat(expected[variant], axis=1)
        (line,) = [ln for ln in ax.get_lines() if ln.get_label() == f"{variant} (3 seeds)"]
        np.testing.assert_allclose(line.get_ydata(), table.mean(axis=1), rtol=1e-12)
        assert mcolors.to_hex(line.get_color()) == style.PALETTE[variant]
        vertices = band.get_paths()[0].vertices
        low, high = table.min(axis=1).to_numpy(), table.max(axis=1).to_numpy()
        assert np.isclose(vertices[:, 1], low[:, None], rtol=1e-12).any(axis=0).sum() >= 100
        assert np.isclose(vertices[:, 1], high[:, None], rtol=1e-12).any(axis=0).sum() >= 100
        assert low.min() < high.max() and (high - low).max() > 0.01
    assert "band: lowest to highest seed" in fig._suptitle.get_text()


def test_percentiles_figure_is_ioffe_figure_1(tmp_path):
    """Rows: the inputs of the first, middle and last of five nonlinearities, matched by role
    (bn: its BatchNorm outputs, nobn: its Linear outputs, names differ); columns: bn, nobn on
    a shared y axis per row; the lines are the recorded percentiles of exactly those layers."""
    writer = TraceWriter(tmp_path / "t.covshift")
    rng = np.random.default_rng(1)
    recorded = {}
    for variant in ("bn", "nobn"):
        rid = writer.add_run(variant, {"variant": variant, "seed": 0})
        layers = []
        for k in range(5):
            layers += [(f"{variant}fc{k}", "Linear", None)] + ([(f"bnorm{k}", "BatchNorm1d", None)] if variant == "bn"
                                                               else []) + [(f"{variant}act{k}", "Sigmoid", "sigmoid")]
        rows = []
        for pos, (name, kind, nl) in enumerate(layers):
            writer.add_layer(rid, name, kind, nl, pos, None)
            values = np.sort(rng.normal(pos, 1.0, (20, 3)), axis=1).astype(np.float32).astype(float)  # as stored
            recorded[(variant, name)] = values
            rows += [(s, name, q, float(values[s, i])) for s in range(20) for i, q in enumerate(("p15", "p50", "p85"))]
        writer.write(rid, rows, [], [])
    writer.close()
    fig = figures.percentiles(covshift.load(tmp_path / "t.covshift"))
    axes = np.array(fig.axes).reshape(3, 2)
    expected = {"bn": ["bnorm0", "bnorm2", "bnorm4"], "nobn": ["nobnfc0", "nobnfc2", "nobnfc4"]}
    for row, k in enumerate((1, 3, 5)):
        for col, variant in enumerate(("bn", "nobn")):
            ax, layer = axes[row, col], expected[variant][row]
            assert ax.get_title().startswith(f"{variant}: input to nonlinearity {k} ({layer}, ")
            lines = {ln.get_label(): ln.get_ydata() for ln in ax.get_lines()}
            np.testing.assert_array_equal(lines["15th percentile"], recorded[(variant, layer)][:, 0])
            np.testing.assert_array_equal(lines["85th percentile"], recorded[(variant, layer)][:, 2])
        assert axes[row, 0].get_shared_y_axes().joined(axes[row, 0], axes[row, 1])
    assert "Ioffe & Szegedy 2015, Fig. 1" in fig._suptitle.get_text()


def test_landscape_figure_draws_min_max_bands(tmp_path):
    """Santurkar et al. Fig. 4: per run a band from the lowest to the highest loss (and gradient
    change) over the step sizes, at each measured step; β-smoothness as a line."""
    from covshift.report.instrument_figures import landscape_figure
    writer = TraceWriter(tmp_path / "l.covshift")
    rng = np.random.default_rng(2)
    values = {}
    for run in ("bn", "nobn"):
        rid = writer.add_run(run, {"variant": run})
        low = rng.uniform(0.5, 1.0, 5)
        v = {"landscape_loss_min": low, "landscape_loss_max": low + rng.uniform(0.1, 0.5, 5),
             "grad_predictiveness_min": rng.uniform(0.0, 0.1, 5), "grad_predictiveness": rng.uniform(0.2, 0.4, 5),
             "beta_smoothness": rng.uniform(1, 3, 5)}
        v["loss_variation"] = v["landscape_loss_max"] - v["landscape_loss_min"]
        values[run] = v
        writer.write(rid, [(10 * k, "", m, float(x)) for m, xs in v.items() for k, x in enumerate(xs)], [], [])
    writer.close()
    fig = landscape_figure(covshift.load(tmp_path / "l.covshift"))
    loss_ax, pred_ax, beta_ax = fig.axes[:3]
    for ax, (lo, hi) in ((loss_ax, ("landscape_loss_min", "landscape_loss_max")),
                         (pred_ax, ("grad_predictiveness_min", "grad_predictiveness"))):
        assert "band: min to max" in ax.get_title()
        for band, run in zip(ax.collections, ("bn", "nobn")):
            y = band.get_paths()[0].vertices[:, 1]
            for bound in (lo, hi):
                assert np.isclose(y[:, None], values[run][bound][None, :], rtol=1e-12).any(axis=0).all()
            assert y.min() == pytest.approx(values[run][lo].min()) and y.max() == pytest.approx(values[run][hi].max())
    for line, run in zip(beta_ax.get_lines(), ("bn", "nobn")):
        np.testing.assert_allclose(line.get_ydata(), values[run]["beta_smoothness"])


def test_a_run_shorter_than_detail_every(tmp_path):
    """Only step 0 has histograms: histograms.png shows that step's distribution (not a one-column
    heat map), and no covariate-shift figure is written (it needs two detail steps)."""
    trace = fake(tmp_path / "short.covshift", steps=8)  # histograms at step 0 only
    fig = distribution_figures.histograms(trace)
    hist = trace.histograms()
    for ax, run in zip(main_axes(fig), ("bn", "nobn")):
        assert "the only detail step" in ax.get_xlabel() and not ax.collections[1:]
        (patch,) = ax.patches
        rows = hist[(hist["run"] == run) & (hist["layer"] == ax.get_title().split("layer ")[1].split(" ")[0])]
        inner = rows[np.isfinite(rows["left"]) & np.isfinite(rows["right"])]
        expected = inner["count"].to_numpy() / rows["count"].sum()
        widths = patch.get_path().vertices[:, 0]
        assert np.isclose(widths[:, None], expected[None, :]).any(axis=0).all()
    written = figures.save_all(trace, shift_of(trace), tmp_path / "figs")
    assert "histograms.png" in written and "covariate_shift.png" not in written


def test_many_layers_get_distinct_shades_and_named_ends():
    shades = style.depth_colors(style.PALETTE["nobn"], 24)
    lightness = [sum(mcolors.to_rgb(c)) for c in shades]
    assert len(set(shades)) == 24 and style.PALETTE["nobn"] in shades
    assert max(lightness) - min(lightness) > 1.5  # pale to dark, not pale to the run colour only
    assert all(a > b for a, b in zip(lightness, lightness[1:]))  # ordered by depth
    fig, axes = style.new_figure(1, 1)
    names = [f"layer{i}" for i in range(24)]
    for i, (name, color) in enumerate(zip(names, shades)):
        axes[0][0].plot([0, 1], [i, i + 1], color=color, label=name)
    style.depth_key(fig, [axes[0][0]], names, shades)
    assert [t.get_text() for t in axes[0][0].texts] == ["layer0", "layer23"]
