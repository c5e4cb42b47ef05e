"""Tests of covshift.Tracer against independent references.

Every statistic in the trace is checked against values computed here, from layer outputs
and output gradients captured by our own hooks on a *twin* of the traced model (a copy with
identical weights, non-in-place where the traced model works in place) and reduced in
numpy float64. covshift is never compared with itself.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import fit
from torch import nn

import covshift
from covshift import stats

ROOT = "(model)"
ORDER_STATS = ("min", "max", "p15", "p50", "p85")
BASE_METRICS = {"mean", "var", "std", "min", "max", "p15", "p50", "p85", "nonfinite"}
DERIVATIVE = {  # local derivative divided by its maximum, from the output
    "sigmoid": lambda y: 4.0 * y * (1.0 - y),
    "tanh": lambda y: 1.0 - y * y,
    "relu": lambda y: (y > 0).astype(np.float64),
    "hardtanh": lambda y: ((y > -1.0) & (y < 1.0)).astype(np.float64),
    "relu6": lambda y: ((y > 0.0) & (y < 6.0)).astype(np.float64),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    np.random.seed(1234)


# ---------------------------------------------------------------------------------------
# independent reference: our own hooks on a twin model, autograd for output gradients
# ---------------------------------------------------------------------------------------
def first_float(out):
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            found = first_float(item)
            if found is not None:
                return found
    return None


@dataclass
class Ref:
    loss: float
    outs: dict  # name -> list of float64 arrays, one per call
    grads: dict  # name -> list of float64 arrays (or None), one per call


def reference(twin, names, x, target, loss_of):
    """Run ``twin`` on ``x`` with our own forward hooks on ``names`` and return the outputs
    and the gradients of the loss w.r.t. each of them, in float64."""
    modules = dict(twin.named_modules())
    captured = defaultdict(list)
    handles = []
    for name in names:
        module = modules["" if name == ROOT else name]
        handles.append(module.register_forward_hook(
            lambda mod, args, out, name=name: captured[name].append(first_float(out))))
    try:
        loss = loss_of(twin(x), target)
    finally:
        for h in handles:
            h.remove()
    flat = [(n, i, t) for n in names for i, t in enumerate(captured[n])]
    want = [t for _, _, t in flat if t.requires_grad]
    got = iter(torch.autograd.grad(loss, want, allow_unused=True)) if want else iter(())
    grads = defaultdict(list)
    for n, _, t in flat:
        g = next(got) if t.requires_grad else None
        grads[n].append(None if g is None else g.detach().double().numpy())
    outs = {n: [t.detach().double().numpy() for t in captured[n]] for n in names}
    return Ref(float(loss.detach()), outs, dict(grads))


def expected_metrics(outs, grads=None, kind=None):
    """Layer metrics of the concatenation of ``outs`` (one array per call, used whole), by
    definition."""
    y = np.concatenate([o.ravel() for o in outs])
    # the sample of an output used whole is the output in a fixed random order; the
    # percentiles are those of its first PERCENTILE_VALUES values
    ranked = y if y.size <= stats.PERCENTILE_VALUES else y[stats.sample_indices(y.size, 4096, "cpu").numpy()[
        : stats.PERCENTILE_VALUES]]
    e = {
        "mean": y.mean(), "var": y.var(), "std": y.std(), "min": y.min(), "max": y.max(),
        "p15": np.quantile(ranked, 0.15, method="lower"),
        "p50": np.quantile(ranked, 0.50, method="lower"),
        "p85": np.quantile(ranked, 0.85, method="lower"),
        "nonfinite": float((~np.isfinite(y)).sum()),
        "calls": float(len(outs)),  # one array per call: the number of calls in the step
    }
    if kind is not None:
        d = DERIVATIVE[kind](y)
        e["saturation"] = float(np.mean(d < 0.1))
        e["gain"] = float(np.mean(d))
    if kind in ("relu", "relu6") and all(o.ndim >= 2 for o in outs):
        tops = [o.max(axis=tuple(i for i in range(o.ndim) if i != 1)) for o in outs]
        if len({t.shape for t in tops}) == 1:
            e["dead"] = float((np.max(tops, axis=0) <= 0).sum())
    gs = [g.ravel() for g in (grads or []) if g is not None]
    if gs:
        g = np.concatenate(gs)
        e["grad_norm"] = math.sqrt(np.sum(g * g))
        e["grad_rms"] = math.sqrt(np.mean(g * g))
    return e


def table(trace, run=None):
    """{(step, layer, metric): value}, asserting one row per key."""
    df = trace.scalars(run=run)
    assert not df.duplicated(["run", "step", "layer", "metric"]).any(), "duplicate metric rows"
    return {(int(r.step), r.layer, r.metric): float(r.value) for r in df.itertuples()}


def layer_row(tab, step, layer):
    """The layer metrics (not the parameter ones) of one layer at one step, but the detail-step
    ``unit_count`` (checked in test_unit_count_is_the_sample_size_per_unit)."""
    return {m: v for (s, l, m), v in tab.items() if s == step and l == layer and "." not in m and m != "unit_count"}


def check_layer(got, exp, rtol=1e-4, order_rtol=1e-6, frac_atol=1e-6):
    assert set(got) == set(exp), f"metrics differ: got {sorted(got)}, expected {sorted(exp)}"
    scale = abs(exp["mean"]) + exp["std"]
    for m, want in exp.items():
        have = got[m]
        if m in ("dead", "nonfinite", "calls"):
            assert have == want, m
        elif m in ORDER_STATS:
            assert have == pytest.approx(want, rel=order_rtol, abs=1e-30), m
        elif m == "mean":
            assert abs(have - want) <= rtol * scale + 1e-12, (m, have, want)
        elif m in ("saturation", "gain"):
            assert have == pytest.approx(want, abs=frac_atol), m
        else:
            assert have == pytest.approx(want, rel=rtol, abs=1e-30), (m, have, want)


def mse(out, target):
    return F.mse_loss(out, target)


def train(model, tracer, opt, batches, twin=None, names=(), loss_of=mse, between=None):
    """One optimizer step per batch; with ``twin``, the reference of each step is taken on
    the twin loaded with the model's weights *before* that step's update."""
    refs = []
    for i, (x, target) in enumerate(batches):
        if twin is not None:
            twin.load_state_dict(model.state_dict())
            refs.append(reference(twin, names, x, target, loss_of))
        opt.zero_grad()
        loss = loss_of(model(x), target)
        loss.backward()
        opt.step()
        if between is not None:
            between(i)
        tracer.step(loss=loss)
    return refs


def batches(n, in_shape, out_shape, dtype=torch.float32, scale=1.0):
    return [(scale * torch.randn(*in_shape, dtype=dtype), torch.randn(*out_shape, dtype=dtype)) for _ in range(n)]


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               and not m._backward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------
# 1. MLP with Sigmoid, Tanh and ReLU
# ---------------------------------------------------------------------------------------
def test_mlp_layer_metrics_match_reference(tmp_path):
    model = nn.Sequential(nn.Linear(6, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    with torch.no_grad():
        model[0].weight.mul_(4.0)  # drive the sigmoid into saturation for some inputs
        model[4].bias[:3] = -50.0  # three ReLU units dead on every input
    twin = copy.deepcopy(model)
    names = [str(i) for i in range(7)]
    kinds = {"1": "sigmoid", "3": "tanh", "5": "relu"}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    path = tmp_path / "t.covshift"
    data = batches(4, (32, 6), (32, 3), scale=2.0)
    with covshift.Tracer(model, path, run="r", optimizer=opt) as tracer:
        refs = train(model, tracer, opt, data, twin, names)

    trace = covshift.load(path)
    assert trace.runs == ["r"]
    assert trace.layers == names
    info = trace.layer_info().set_index("layer")
    assert info.loc["0", "type"] == "Linear" and info.loc["5", "type"] == "ReLU"
    assert info.loc["1", "nonlinearity"] == "sigmoid"
    assert info.loc["3", "nonlinearity"] == "tanh"
    assert info.loc["5", "nonlinearity"] == "relu"
    assert pd.isna(info.loc["0", "nonlinearity"])
    tab = table(trace)
    assert {s for s, _, _ in tab} == {0, 1, 2, 3}
    for step, ref in enumerate(refs):
        assert tab[(step, "", "loss")] == pytest.approx(ref.loss, rel=1e-6)
        for name in names:
            exp = expected_metrics(ref.outs[name], ref.grads[name], kinds.get(name))
            check_layer(layer_row(tab, step, name), exp)
    # the checks above are meaningful: saturation, dead and gradients are not trivial
    sig = expected_metrics(refs[0].outs["1"], kind="sigmoid")
    assert 0.0 < sig["saturation"] < 1.0
    assert expected_metrics(refs[0].outs["5"], kind="relu")["dead"] >= 3
    assert tab[(0, "5", "dead")] >= 3


# ---------------------------------------------------------------------------------------
# 2. Conv2d + ReLU: 4-D outputs, units and histograms
# ---------------------------------------------------------------------------------------
def _conv_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))


def _edges_of(hist):
    """Bin edges from the left/right columns of one layer's histogram rows at one step."""
    h = hist.sort_values("bin")
    assert np.isneginf(h["left"].iloc[0]) and np.isposinf(h["right"].iloc[-1])
    assert np.array_equal(h["left"].to_numpy()[1:], h["right"].to_numpy()[:-1])
    return h["right"].to_numpy()[:-1]


def _histogram_ref(y, edges):
    y = y.ravel()
    y = y[np.isfinite(y)]
    inside, _ = np.histogram(y, bins=edges)
    return np.concatenate([[np.sum(y < edges[0])], inside, [np.sum(y > edges[-1])]])


def test_conv_relu_stats_units_and_histograms(tmp_path):
    model = _conv_net()
    twin = copy.deepcopy(model)
    names = ["0", "1", "2", "3"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    path = tmp_path / "t.covshift"
    data = batches(4, (8, 3, 6, 6), (8, 2))
    bins = 16
    with covshift.Tracer(model, path, run="r", optimizer=opt, detail_every=2, bins=bins) as tracer:
        refs = train(model, tracer, opt, data, twin, names)

    trace = covshift.load(path)
    info = trace.layer_info().set_index("layer")
    assert info.loc["0", "type"] == "Conv2d" and info.loc["1", "nonlinearity"] == "relu"
    tab = table(trace)
    kinds = {"1": "relu"}
    for step, ref in enumerate(refs):
        for name in names:
            check_layer(layer_row(tab, step, name), expected_metrics(ref.outs[name], ref.grads[name], kinds.get(name)))

    units = trace.units()
    hists = trace.histograms()
    assert set(units["step"]) == {0, 2} and set(hists["step"]) == {0, 2}
    edges_at = {}
    for step in (0, 2):
        for name in names:
            y = refs[step].outs[name][0]
            per_unit = np.moveaxis(y, 1, 0).reshape(y.shape[1], -1)
            u = units[(units.step == step) & (units.layer == name)].sort_values("unit")
            assert u["unit"].tolist() == list(range(y.shape[1]))
            np.testing.assert_allclose(u["mean"], per_unit.mean(1), rtol=1e-4, atol=1e-5 * (per_unit.std() + 1e-12))
            np.testing.assert_allclose(u["var"], per_unit.var(1), rtol=1e-4, atol=1e-9)

            h = hists[(hists.step == step) & (hists.layer == name)]
            assert len(h) == bins + 2
            edges = _edges_of(h)
            assert len(edges) == bins + 1
            assert np.all(np.diff(edges) > 0)
            counts = h.sort_values("bin")["count"].to_numpy()
            assert counts.sum() == min(y.size, 4096)
            np.testing.assert_array_equal(counts, _histogram_ref(y, edges))
            edges_at.setdefault(name, []).append(edges)
    for name in names:  # the edges of a layer are fixed
        np.testing.assert_array_equal(edges_at[name][0], edges_at[name][1])
    # the conv output spans its edges' interior at the first detail step
    y0 = refs[0].outs["0"][0]
    e0 = edges_at["0"][0]
    assert e0[0] < y0.min() and y0.max() < e0[-1]


def test_bounded_activations_values_on_the_edges(tmp_path):
    """Hardtanh and ReLU6 put many outputs exactly on their bounds, which are the bin edges."""
    model = nn.Sequential(nn.Linear(5, 16), nn.Hardtanh(), nn.Linear(16, 16), nn.ReLU6(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].weight.mul_(3.0)
        model[2].weight.mul_(20.0)
    twin = copy.deepcopy(model)
    names = ["0", "1", "2", "3", "4"]
    kinds = {"1": "hardtanh", "3": "relu6"}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, optimizer=opt, detail_every=1, bins=10) as tracer:
        refs = train(model, tracer, opt, batches(2, (12, 5), (12, 2), scale=2.0), twin, names)

    trace = covshift.load(path)
    info = trace.layer_info().set_index("layer")
    assert info.loc["1", "nonlinearity"] == "hardtanh" and info.loc["3", "nonlinearity"] == "relu6"
    tab = table(trace)
    hists = trace.histograms()
    for step, ref in enumerate(refs):
        for name in names:
            check_layer(layer_row(tab, step, name), expected_metrics(ref.outs[name], ref.grads[name], kinds.get(name)))
            y = ref.outs[name][0]
            h = hists[(hists.step == step) & (hists.layer == name)]
            np.testing.assert_array_equal(h.sort_values("bin")["count"].to_numpy(), _histogram_ref(y, _edges_of(h)))
        for name, lo, hi in (("1", -1.0, 1.0), ("3", 0.0, 6.0)):
            y = ref.outs[name][0]
            assert (y == lo).sum() > 0 and (y == hi).sum() > 0  # values on both edges
            h = hists[(hists.step == step) & (hists.layer == name)]
            np.testing.assert_array_equal(_edges_of(h)[[0, -1]], [lo, hi])


def test_histograms_and_percentiles_when_subsampled(tmp_path):
    model = _conv_net()
    twin = copy.deepcopy(model)
    names = ["0", "1", "3"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    path = tmp_path / "t.covshift"
    k = 500  # conv outputs have 8*4*36 = 1152 elements, the Linear's 16
    with covshift.Tracer(model, path, run="r", optimizer=opt, detail_every=1, sample_size=k) as tracer:
        refs = train(model, tracer, opt, batches(2, (8, 3, 6, 6), (8, 2)), twin, names)

    trace = covshift.load(path)
    tab = table(trace)
    hists = trace.histograms()
    bound = math.sqrt(math.log(2.0 / 1e-3) / (2.0 * k))
    for step, ref in enumerate(refs):
        for name in names:
            y = ref.outs[name][0].ravel()
            counts = hists[(hists.step == step) & (hists.layer == name)]["count"]
            assert counts.sum() == min(y.size, k)
            got = layer_row(tab, step, name)
            exp = expected_metrics(ref.outs[name], ref.grads[name], "relu" if name == "1" else None)
            for m in ("mean", "var", "min", "max", "grad_norm", "dead"):  # exact whatever the sample
                if m in exp:
                    assert got[m] == pytest.approx(exp[m], rel=1e-4, abs=1e-6), (name, m)
            for m, q in (("p15", 0.15), ("p50", 0.50), ("p85", 0.85)):
                assert got[m] in set(y)  # an element of the output
                lo_rank = np.mean(y < got[m])
                hi_rank = np.mean(y <= got[m])
                assert lo_rank - bound <= q <= hi_rank + bound, (name, m)


# ---------------------------------------------------------------------------------------
# 3. In-place ReLU after a Linear
# ---------------------------------------------------------------------------------------
def test_inplace_relu_records_pre_activation_and_its_gradient(tmp_path):
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))
    twin = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    names = ["0", "1", "2"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, optimizer=opt) as tracer:
        refs = train(model, tracer, opt, batches(3, (16, 5), (16, 2)), twin, names)

    tab = table(covshift.load(path))
    for step, ref in enumerate(refs):
        for name in names:
            exp = expected_metrics(ref.outs[name], ref.grads[name], "relu" if name == "1" else None)
            check_layer(layer_row(tab, step, name), exp)
        pre = ref.outs["0"][0]
        assert pre.min() < 0 and tab[(step, "0", "min")] < 0  # stats are of the pre-ReLU output
        g_pre, g_post = ref.grads["0"][0], ref.grads["1"][0]
        assert not np.isclose(np.linalg.norm(g_pre), np.linalg.norm(g_post), rtol=1e-3)
        assert tab[(step, "0", "grad_norm")] == pytest.approx(np.linalg.norm(g_pre), rel=1e-4)


# ---------------------------------------------------------------------------------------
# 4. Residual block with an in-place add on a module output
# ---------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        out = self.conv(x)
        if self.inplace:
            out += x
        else:
            out = out + x
        return self.head(out.mean((2, 3)))


def test_residual_inplace_add_records_pre_add_stats_and_trains(tmp_path):
    model = ResBlock(inplace=True)
    twin = ResBlock(inplace=False)
    untraced = ResBlock(inplace=False)
    untraced.load_state_dict(model.state_dict())
    names = ["conv", "head"]
    opt = torch.optim.SGD(model.parameters(), lr=0.003)
    opt_u = torch.optim.SGD(untraced.parameters(), lr=0.003)
    w_true = torch.randn(4)
    data = []
    for _ in range(12):
        x = 3.0 + torch.randn(8, 4, 5, 5)
        data.append((x, (x.mean((2, 3)) @ w_true).unsqueeze(1)))
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, optimizer=opt) as tracer:
        refs = train(model, tracer, opt, data, twin, names)
    losses_u = []
    for x, target in data:
        opt_u.zero_grad()
        loss = mse(untraced(x), target)
        loss.backward()
        opt_u.step()
        losses_u.append(loss.item())

    tab = table(covshift.load(path))
    for step, ref in enumerate(refs):
        for name in names:
            check_layer(layer_row(tab, step, name), expected_metrics(ref.outs[name], ref.grads[name]))
        pre = ref.outs["conv"][0]
        assert abs(tab[(step, "conv", "mean")] - pre.mean()) < 0.5  # far from the post-add mean (~3 higher)
    losses = [tab[(s, "", "loss")] for s in range(len(data))]
    np.testing.assert_allclose(losses, losses_u, rtol=1e-5)
    assert losses[-1] < losses[0]
    for (n, p), (_, q) in zip(model.named_parameters(), untraced.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


# ---------------------------------------------------------------------------------------
# 5. Weight sharing: a module called twice per forward
# ---------------------------------------------------------------------------------------
class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.act = nn.Tanh()
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.act(self.lin(x))
        h = self.act(self.lin(h))
        return self.head(h)


def test_shared_module_stats_describe_both_calls(tmp_path):
    model = Shared()
    twin = copy.deepcopy(model)
    names = ["lin", "act", "head"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, optimizer=opt) as tracer:
        refs = train(model, tracer, opt, batches(3, (10, 6), (10, 2), scale=3.0), twin, names)

    trace = covshift.load(path)
    df = trace.scalars(layer="lin")
    assert (df.groupby(["step", "metric"]).size() == 1).all()
    tab = table(trace)
    for step, ref in enumerate(refs):
        assert len(ref.outs["lin"]) == 2
        for name in names:
            kind = "tanh" if name == "act" else None
            check_layer(layer_row(tab, step, name), expected_metrics(ref.outs[name], ref.grads[name], kind))
        g1, g2 = (np.linalg.norm(g) for g in ref.grads["lin"])
        assert g1 > 0 and g2 > 0
        assert tab[(step, "lin", "grad_norm")] == pytest.approx(math.hypot(g1, g2), rel=1e-4)
        first, second = ref.outs["lin"]
        assert not np.isclose(tab[(step, "lin", "var")], first.var(), rtol=1e-3)
        assert not np.isclose(tab[(step, "lin", "var")], second.var(), rtol=1e-3)


class SharedActivation(nn.Module):
    """One ReLU module applied after layers of different widths (a common pattern)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.act(self.b(self.act(self.a(x)))))


def test_shared_activation_on_different_widths(tmp_path):
    """Default settings: step 0 is a detail step, so per-unit sums of both calls are merged."""
    model = SharedActivation()
    twin = copy.deepcopy(model)
    names = ["a", "b", "act", "head"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, optimizer=opt) as tracer:
        refs = train(model, tracer, opt, batches(2, (10, 4), (10, 1)), twin, names)

    tab = table(covshift.load(path))
    for step, ref in enumerate(refs):
        for name in names:
            kind = "relu" if name == "act" else None
            check_layer(layer_row(tab, step, name), expected_metrics(ref.outs[name], ref.grads[name], kind))


def test_shared_module_subsampled_percentiles_describe_concatenation(tmp_path):
    """Calls of very different sizes: the percentiles must still estimate those of the
    concatenation within the documented sampling bound."""

    class TwoSizes(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Linear(1, 1)
            with torch.no_grad():
                self.scale.weight.fill_(1.0)
                self.scale.bias.zero_()

        def forward(self, x):
            big, small = x
            return self.scale(big).sum() + self.scale(small).sum()

    model = TwoSizes()
    k = 1000
    big = torch.randn(20000, 1)
    small = 10.0 + torch.randn(k, 1)
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, sample_size=k) as tracer:
        model((big, small)).backward()
        tracer.step()
    tab = table(covshift.load(path))
    y = np.concatenate([big.double().numpy().ravel(), small.double().numpy().ravel()])
    bound = math.sqrt(math.log(2.0 / 1e-3) / (2.0 * k))
    assert tab[(0, "scale", "mean")] == pytest.approx(y.mean(), rel=1e-4)
    for m, q in (("p15", 0.15), ("p50", 0.50), ("p85", 0.85)):
        v = tab[(0, "scale", m)]
        assert np.mean(y < v) - bound <= q <= np.mean(y <= v) + bound, (m, v, np.quantile(y, q))


# ---------------------------------------------------------------------------------------
# 6. Tuple and dict outputs
# ---------------------------------------------------------------------------------------
class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        seq, _ = self.lstm(x)  # a leaf returning (output, (h, c))
        feat = seq[:, -1]
        return self.fc(feat), feat  # the model returns a tuple


class MaskLeaf(nn.Module):
    """A leaf whose dict output starts with non-floating tensors."""

    def forward(self, x):
        return {"count": torch.tensor(x.shape[0]), "mask": x > 0, "value": 2.0 * x - 1.0}


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.leaf = MaskLeaf()
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        d = self.leaf(self.fc1(x))
        return {"n": torch.tensor(7), "logits": self.fc2(d["value"] * d["mask"]), "hidden": d["value"]}


def test_tuple_output_model_and_lstm(tmp_path):
    model = TupleNet()
    twin = copy.deepcopy(model)
    names = ["lstm", "fc", ROOT]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"

    def loss_of(out, target):
        logits, feat = out
        return F.mse_loss(logits, target) + 0.1 * feat.pow(2).mean()

    with covshift.Tracer(model, path, optimizer=opt, layers=[nn.LSTM, nn.Linear, TupleNet]) as tracer:
        refs = train(model, tracer, opt, batches(3, (4, 5, 4), (4, 2)), twin, names, loss_of=loss_of)

    trace = covshift.load(path)
    assert trace.layers == ["lstm", "fc", ROOT]
    tab = table(trace)
    for step, ref in enumerate(refs):
        assert ref.outs["lstm"][0].shape == (4, 5, 6)
        for name in names:
            check_layer(layer_row(tab, step, name), expected_metrics(ref.outs[name], ref.grads[name]))


def test_dict_output_model_and_leaf(tmp_path):
    model = DictNet()
    twin = copy.deepcopy(model)
    names = ["fc1", "leaf", "fc2", ROOT]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"

    def loss_of(out, target):
        return F.mse_loss(out["logits"], target)

    with covshift.Tracer(model, path, optimizer=opt, layers=["*", ""]) as tracer:
        refs = train(model, tracer, opt, batches(3, (7, 5), (7, 2)), twin, names, loss_of=loss_of)

    trace = covshift.load(path)
    assert trace.layers == names
    tab = table(trace)
    for step, ref in enumerate(refs):
        assert ref.outs[ROOT][0].shape == (7, 2)  # "logits", the first floating tensor
        for name in names:
            check_layer(layer_row(tab, step, name), expected_metrics(ref.outs[name], ref.grads[name]))


# ---------------------------------------------------------------------------------------
# 7. bfloat16
# ---------------------------------------------------------------------------------------
def test_bfloat16_model(tmp_path):
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    model = model.to(torch.bfloat16)
    twin = copy.deepcopy(model)
    names = [str(i) for i in range(5)]
    kinds = {"1": "tanh", "3": "relu"}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    path = tmp_path / "t.covshift"
    data = batches(3, (16, 8), (16, 4), dtype=torch.bfloat16, scale=2.0)
    with covshift.Tracer(model, path, optimizer=opt) as tracer:
        refs = train(model, tracer, opt, data, twin, names)

    tab = table(covshift.load(path))
    for step, ref in enumerate(refs):
        assert tab[(step, "", "loss")] == pytest.approx(ref.loss, rel=1e-2)
        for name in names:
            exp = expected_metrics(ref.outs[name], ref.grads[name], kinds.get(name))
            check_layer(layer_row(tab, step, name), exp, rtol=2e-3, frac_atol=1e-4)


# ---------------------------------------------------------------------------------------
# 8. NaN and infinity
# ---------------------------------------------------------------------------------------
class Poison(nn.Module):
    def __init__(self, shape, where):
        super().__init__()
        scale = torch.ones(shape)
        for index, value in where:
            scale[index] = value
        self.register_buffer("scale", scale)

    def forward(self, x):
        return x * self.scale


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nonfinite_values_are_counted_and_written(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), Poison((5, 6), [((0, 1), math.inf), ((2, 3), -math.inf),
                                                            ((4, 0), math.nan)]), nn.Linear(6, 3))
    nan_linear = nn.Linear(4, 3)
    with torch.no_grad():
        nan_linear.weight[1, 2] = math.nan
    model.add_module("3", nan_linear)

    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            m = self.m
            return m[2](m[1](m[0](x))) + m[3](x)

    net = Wrap(model)
    twin = copy.deepcopy(net)
    names = ["m.0", "m.1", "m.2", "m.3"]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"
    with covshift.Tracer(net, path, optimizer=opt) as tracer:
        refs = train(net, tracer, opt, batches(2, (5, 4), (5, 3)), twin, names)

    trace = covshift.load(path)
    tab = table(trace)
    assert {s for s, _, _ in tab} == {0, 1}
    ref = refs[0]
    assert tab[(0, "m.0", "nonfinite")] == 0
    assert tab[(0, "m.0", "mean")] == pytest.approx(ref.outs["m.0"][0].mean(), rel=1e-4, abs=1e-6)
    for name in ("m.1", "m.2", "m.3"):
        want = float((~np.isfinite(ref.outs[name][0])).sum())
        assert want >= 1
        assert tab[(0, name, "nonfinite")] == want, name
    assert tab[(0, "m.3", "nonfinite")] == 5.0  # a NaN weight makes one output column NaN
    assert math.isnan(tab[(0, "", "loss")])
    assert set(trace.layers) == set(names)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nonfinite_detected_when_output_is_subsampled(tmp_path):
    where = [((17, 42), math.inf)]
    model = nn.Sequential(nn.Linear(100, 100), Poison((100, 100), where))
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, sample_size=64) as tracer:
        model(torch.randn(100, 100)).sum().backward()
        tracer.step()
    tab = table(covshift.load(path))
    assert tab[(0, "1", "nonfinite")] >= 1
    assert tab[(0, "0", "nonfinite")] == 0
    assert math.isinf(tab[(0, "1", "max")]) or math.isinf(tab[(0, "1", "min")])


# ---------------------------------------------------------------------------------------
# 9. Hook lifecycle and side effects
# ---------------------------------------------------------------------------------------
def _mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def test_hooks_removed_on_normal_exit(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert no_hooks(model)
    with covshift.Tracer(model, tmp_path / "t.covshift", optimizer=opt) as tracer:
        assert not no_hooks(model)
        train(model, tracer, opt, batches(2, (6, 4), (6, 2)))
    assert no_hooks(model)


def test_hooks_removed_and_steps_kept_on_exception(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"

    class Boom(Exception):
        pass

    data = batches(5, (6, 4), (6, 2))
    with pytest.raises(Boom, match="stop"):
        with covshift.Tracer(model, path, optimizer=opt) as tracer:
            for i, (x, target) in enumerate(data):
                opt.zero_grad()
                loss = mse(model(x), target)
                if i == 3:
                    raise Boom("stop")  # in the middle of step 3
                loss.backward()
                opt.step()
                tracer.step(loss=loss)
    assert no_hooks(model)
    loss.backward()  # the interrupted step's graph still works, and records nothing
    trace = covshift.load(path)
    df = trace.scalars()
    assert sorted(set(df["step"])) == [0, 1, 2]
    assert set(df["layer"]) == {"", "0", "1", "2", "3"}
    assert trace.config("run")["steps"] == 3


def test_tracing_without_optimizer_step_changes_nothing(tmp_path):
    model = _mlp()
    twin = copy.deepcopy(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    structure = [(n, type(m)) for n, m in model.named_modules()]
    text = repr(model)
    data = batches(3, (6, 4), (6, 2))
    with covshift.Tracer(model, tmp_path / "t.covshift", detail_every=1) as tracer:
        for x, target in data:
            model.zero_grad()
            mse(model(x), target).backward()
            tracer.step()
    for x, target in data:
        twin.zero_grad()
        mse(twin(x), target).backward()
    state, twin_state = model.state_dict(), twin.state_dict()
    assert state.keys() == twin_state.keys()
    for k in state:
        assert torch.equal(state[k], twin_state[k]), k  # bitwise, running stats included
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n]), n
        assert torch.equal(p.grad, dict(twin.named_parameters())[n].grad), n
    assert [(n, type(m)) for n, m in model.named_modules()] == structure
    assert repr(model) == text
    assert no_hooks(model)


# ---------------------------------------------------------------------------------------
# 10. Parameter and run metrics
# ---------------------------------------------------------------------------------------
def test_param_metrics_update_ratio_lr_loss_and_global_grad_norm(tmp_path):
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3))
    nn.init.zeros_(model[3].bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"
    expected = []
    with covshift.Tracer(model, path, optimizer=opt, layers=[nn.Linear]) as tracer:
        for step, (x, target) in enumerate(batches(4, (9, 5), (9, 3))):
            lr = 0.1 / (step + 1)
            opt.param_groups[0]["lr"] = lr
            before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
            opt.zero_grad()
            loss = mse(model(x), target)
            loss.backward()
            grads = {n: p.grad.detach().clone().double() for n, p in model.named_parameters()}
            opt.step()
            after = {n: p.detach().clone().double() for n, p in model.named_parameters()}
            tracer.step(loss=loss)
            expected.append((loss.item(), lr, before, grads, after))

    tab = table(covshift.load(path))
    assert not any(layer in ("1", "2") for _, layer, _ in tab)
    for step, (loss, lr, before, grads, after) in enumerate(expected):
        assert tab[(step, "", "loss")] == pytest.approx(loss, rel=1e-6)
        assert tab[(step, "", "lr")] == pytest.approx(lr, rel=1e-12)
        total = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))  # LayerNorm's included
        assert tab[(step, "", "grad_norm")] == pytest.approx(total, rel=1e-5)
        for layer in ("0", "3"):
            for attr in ("weight", "bias"):
                n = f"{layer}.{attr}"
                w0, w1 = before[n], after[n]
                assert tab[(step, layer, f"{attr}.grad_norm")] == pytest.approx(float(grads[n].norm()), rel=1e-5)
                assert tab[(step, layer, f"{attr}.norm")] == pytest.approx(float(w1.norm()), rel=1e-5)
                key = (step, layer, f"{attr}.update_ratio")
                if float(w0.norm()) == 0.0:
                    assert key not in tab  # missing: no row, not a NaN row
                else:
                    want = float((w1 - w0).norm() / w0.norm())
                    assert tab[key] == pytest.approx(want, rel=1e-4)
                    assert tab[key] == pytest.approx(lr * float(grads[n].norm()) / float(w0.norm()), rel=1e-3)
    assert (0, "3", "bias.update_ratio") not in tab
    assert not covshift.load(path).scalars()["value"].isna().any()
    assert tab[(1, "3", "bias.update_ratio")] > 0


def test_numbers_and_tensors_as_loss_lr_and_logged_values(tmp_path):
    """Numbers are kept on the host and tensors on the device until the flush, side by side
    in one step: a float loss, a tensor learning rate (Adam's capturable kind) and an int
    one, logged floats and bfloat16 tensors; all arrive exactly (a float64 tensor too)."""
    model = nn.Sequential(nn.Linear(3, 2))
    opt = torch.optim.Adam([{"params": model[0].weight, "lr": torch.tensor(0.003)},
                            {"params": model[0].bias, "lr": 1}])
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, optimizer=opt, flush_every=2) as tracer:
        for step in range(3):
            opt.zero_grad()
            model(torch.ones(4, 3)).pow(2).sum().backward()
            opt.step()
            loss = 0.1 * step + 1e-12 if step != 1 else torch.tensor(1.25, dtype=torch.float64) + 1e-12
            tracer.step(loss=loss)
            tracer.log(val=step / 3, acc=torch.tensor(0.5 + step, dtype=torch.bfloat16))
    tab = table(covshift.load(path))
    for step in range(3):
        want = 0.1 * step + 1e-12 if step != 1 else 1.25 + 1e-12
        assert tab[(step, "", "loss")] == want  # float64 throughout: not rounded to float32
        assert tab[(step, "", "lr")] == pytest.approx(0.003, rel=1e-7) and tab[(step, "", "lr.1")] == 1.0
        assert tab[(step, "", "val")] == step / 3 and tab[(step, "", "acc")] == 0.5 + step


# ---------------------------------------------------------------------------------------
# 11. Layer selection, forward order, no_grad validation
# ---------------------------------------------------------------------------------------
class Scrambled(nn.Module):
    """Modules declared in an order different from the forward order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.block = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.stem = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def _trace_layers(model, path, layers, steps=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with covshift.Tracer(model, path, layers=layers, optimizer=opt) as tracer:
        train(model, tracer, opt, batches(steps, (5, 3), (5, 2)))
    trace = covshift.load(path)
    assert set(trace.scalars()["layer"]) - {""} == set(trace.layers)
    return trace.layers


def test_layer_selection_and_forward_order(tmp_path):
    assert [n for n, _ in Scrambled().named_modules()] == ["", "head", "block", "block.0", "block.1", "stem"]
    assert _trace_layers(Scrambled(), tmp_path / "a.cs", None) == ["stem", "block.0", "block.1", "head"]
    assert _trace_layers(Scrambled(), tmp_path / "b.cs", [nn.Linear]) == ["stem", "block.0", "head"]
    assert _trace_layers(Scrambled(), tmp_path / "c.cs", "block.*") == ["block.0", "block.1"]
    assert _trace_layers(Scrambled(), tmp_path / "d.cs", [nn.ReLU, "head"]) == ["block.1", "head"]
    assert _trace_layers(Scrambled(), tmp_path / "e.cs", ["block", "stem"]) == ["stem", "block"]
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    assert _trace_layers(seq, tmp_path / "f.cs", "0") == ["0"]
    info = covshift.load(tmp_path / "a.cs").layer_info()
    assert info["position"].is_monotonic_increasing
    assert info["layer"].tolist() == ["stem", "block.0", "block.1", "head"]


def test_container_selected_by_glob_records_its_output(tmp_path):
    model = Scrambled()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, layers=["block"], optimizer=opt) as tracer:
        refs = train(model, tracer, opt, batches(2, (5, 3), (5, 2)), twin, ["block"])
    tab = table(covshift.load(path))
    for step, ref in enumerate(refs):
        check_layer(layer_row(tab, step, "block"), expected_metrics(ref.outs["block"], ref.grads["block"]))


@pytest.mark.parametrize("bad", [3, [nn.Linear, 3], ["stem", None], [nn.Linear(2, 2)]])
def test_bad_layer_selection_raises_type_error(tmp_path, bad):
    with pytest.raises(TypeError):
        covshift.Tracer(Scrambled(), tmp_path / "t.covshift", layers=bad)


def test_no_grad_validation_is_not_recorded(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    twin = copy.deepcopy(model)
    names = ["0", "1", "2"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"
    val = 50.0 + 10.0 * torch.randn(32, 4)

    def validate(i):
        with torch.no_grad():
            model(val)
        with torch.inference_mode():
            model(val)

    with covshift.Tracer(model, path, optimizer=opt, detail_every=1) as tracer:
        refs = train(model, tracer, opt, batches(3, (6, 4), (6, 2)), twin, names, between=validate)
    trace = covshift.load(path)
    tab = table(trace)
    units = trace.units()
    for step, ref in enumerate(refs):
        for name in names:
            kind = "tanh" if name == "1" else None
            check_layer(layer_row(tab, step, name), expected_metrics(ref.outs[name], ref.grads[name], kind))
            y = ref.outs[name][0]
            u = units[(units.step == step) & (units.layer == name)].sort_values("unit")
            np.testing.assert_allclose(u["mean"], y.mean(0), rtol=1e-4, atol=1e-6)
        counts = trace.histograms(layer="0")
        assert counts[counts.step == step]["count"].sum() == 6 * 8


# ---------------------------------------------------------------------------------------
# 12. Runs, every, flush_every
# ---------------------------------------------------------------------------------------
def test_several_runs_in_one_file_and_run_names(tmp_path):
    path = tmp_path / "t.covshift"
    data = batches(3, (8, 4), (8, 1))
    losses = {}
    refs = {}
    for run, model in (("bn", nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))),
                       ("nobn", nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))):
        twin = copy.deepcopy(model)
        names = [str(i) for i in range(len(model))]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with covshift.Tracer(model, path, run=run, optimizer=opt, config={"lr": 0.1, "name": run}) as tracer:
            refs[run] = train(model, tracer, opt, data, twin, names)
        losses[run] = [r.loss for r in refs[run]]

    trace = covshift.load(path)
    assert trace.runs == ["bn", "nobn"]
    info = trace.layer_info()
    assert info[(info.run == "bn") & (info.layer == "1")]["type"].item() == "BatchNorm1d"
    assert info[(info.run == "nobn") & (info.layer == "1")]["type"].item() == "ReLU"
    for run in ("bn", "nobn"):
        cfg = trace.config(run)
        assert cfg["name"] == run and cfg["lr"] == 0.1 and cfg["steps"] == 3
        tab = table(trace, run=run)
        assert [tab[(s, "", "loss")] for s in range(3)] == pytest.approx(losses[run], rel=1e-6)
        relu = "2" if run == "bn" else "1"
        for step, ref in enumerate(refs[run]):
            for name in ref.outs:
                kind = "relu" if name == relu else None
                check_layer(layer_row(tab, step, name), expected_metrics(ref.outs[name], ref.grads[name], kind))
    with pytest.raises(KeyError):
        trace.config("missing")
    before = trace.scalars()
    trace.close()

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(ValueError):
        with covshift.Tracer(model, path, run="bn"):
            pass
    assert no_hooks(model)
    trace = covshift.load(path)
    assert trace.scalars().equals(before)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    twin = copy.deepcopy(model)
    with covshift.Tracer(model, path, run="bn", optimizer=opt, overwrite=True) as tracer:
        new = train(model, tracer, opt, data[:1], twin, ["0", "1", "2"])
    trace = covshift.load(path)
    assert sorted(trace.runs) == ["bn", "nobn"]
    tab = table(trace, run="bn")
    assert {s for s, _, _ in tab} == {0}
    assert tab[(0, "", "loss")] == pytest.approx(new[0].loss, rel=1e-6)
    assert new[0].loss != pytest.approx(losses["bn"][0], rel=1e-3)
    assert "BatchNorm1d" not in set(trace.layer_info().query("run == 'bn'")["type"])
    assert trace.config("bn")["steps"] == 1
    old = before[before.run == "nobn"].reset_index(drop=True)
    pd.testing.assert_frame_equal(trace.scalars(run="nobn"), old, check_categorical=False)


def test_every_records_only_multiples(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 2))
    twin = copy.deepcopy(model)
    names = ["0", "1", "2"]
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    path = tmp_path / "t.covshift"
    snaps = []
    with covshift.Tracer(model, path, optimizer=opt, every=2, detail_every=4) as tracer:
        refs = train(model, tracer, opt, batches(6, (8, 4), (8, 2)), twin, names,
                     between=lambda i: snaps.append(model[0].weight.detach().clone().double()))
    trace = covshift.load(path)
    tab = table(trace)
    assert {s for s, layer, _ in tab if layer} == {0, 2, 4}  # layer statistics every 2 steps
    assert {s for s, layer, m in tab if m == "loss"} == set(range(6))  # the loss and lr at every step
    assert {s for s, layer, m in tab if m == "lr"} == set(range(6))
    assert [tab[(s, "", "loss")] for s in (1, 3, 5)] == pytest.approx([refs[s].loss for s in (1, 3, 5)], rel=1e-6)
    assert set(trace.units()["step"]) == {0, 4}
    assert trace.config("run")["steps"] == 6
    for step in (0, 2, 4):
        ref = refs[step]
        assert tab[(step, "", "loss")] == pytest.approx(ref.loss, rel=1e-6)
        for name in names:
            kind = "sigmoid" if name == "1" else None
            check_layer(layer_row(tab, step, name), expected_metrics(ref.outs[name], ref.grads[name], kind))
    for step in (2, 4):  # the update of that step alone
        w0, w1 = snaps[step - 1], snaps[step]
        assert tab[(step, "0", "weight.update_ratio")] == pytest.approx(float((w1 - w0).norm() / w0.norm()), rel=1e-4)


def test_flush_every_writes_before_exit(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, optimizer=opt, flush_every=3, write_every=0) as tracer:
        train(model, tracer, opt, batches(4, (8, 4), (8, 2)))
        with covshift.load(path) as trace:
            df = trace.scalars()
            assert sorted(set(df["step"])) == [0, 1, 2]
            assert set(df["layer"]) == {"", "0", "1", "2"}
            assert "steps" not in trace.config("run")
    trace = covshift.load(path)
    assert sorted(set(trace.scalars()["step"])) == [0, 1, 2, 3]
    assert trace.config("run")["steps"] == 4


# ---------------------------------------------------------------------------------------
# 13. Crash safety
# ---------------------------------------------------------------------------------------
def test_killed_process_keeps_flushed_steps(tmp_path):
    path = tmp_path / "crash.covshift"
    script = textwrap.dedent(f"""
        import os, torch, covshift
        from torch import nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with covshift.Tracer(model, {str(path)!r}, run="crash", optimizer=opt, flush_every=5,
                             write_every=0) as tracer:
            for i in range(12):
                opt.zero_grad()
                loss = model(torch.randn(8, 3)).pow(2).mean()
                loss.backward()
                opt.step()
                tracer.step(loss=loss)
            os._exit(1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    trace = covshift.load(path)
    assert trace.runs == ["crash"]
    df = trace.scalars()
    assert sorted(set(df["step"])) == list(range(10))
    for (layer, metric), group in df.groupby(["layer", "metric"]):
        expected = [0] if metric == "unit_count" else list(range(10))  # a detail-step metric (detail_every 50)
        assert sorted(group["step"]) == expected, (layer, metric)
    assert set(df["layer"]) == {"", "0", "1", "2"}
    assert "steps" not in trace.config("crash")


# ---------------------------------------------------------------------------------------
# 14. detail_every
# ---------------------------------------------------------------------------------------
def test_detail_rows_only_at_detail_steps(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, optimizer=opt, detail_every=3) as tracer:
        train(model, tracer, opt, batches(7, (5, 4), (5, 2)))
    trace = covshift.load(path)
    assert sorted(set(trace.scalars()["step"])) == list(range(7))
    units, hists = trace.units(), trace.histograms()
    assert sorted(set(units["step"])) == [0, 3, 6]
    assert sorted(set(hists["step"])) == [0, 3, 6]
    for step in (0, 3, 6):
        for name, width in (("0", 6), ("1", 6), ("2", 2)):
            assert len(units[(units.step == step) & (units.layer == name)]) == width
            assert hists[(hists.step == step) & (hists.layer == name)]["count"].sum() == 5 * width
    with pytest.raises(ValueError):
        covshift.Tracer(model, tmp_path / "x.covshift", every=2, detail_every=3)


def test_unit_count_is_the_sample_size_per_unit(tmp_path):
    """At detail steps only: batch for a Linear output, batch × H × W for a conv channel, the
    calls of a shared module summed."""
    model = _conv_net()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, optimizer=opt, detail_every=2) as tracer:
        outs = train(model, tracer, opt, batches(3, (8, 3, 6, 6), (8, 2)), twin, ["0", "3"])
    counts = covshift.load(path).scalars(metric="unit_count").set_index(["step", "layer"])["value"]
    assert sorted(set(counts.index.get_level_values("step"))) == [0, 2]
    for step in (0, 2):
        for name in ("0", "3"):
            y = outs[step].outs[name][0]
            assert counts[(step, name)] == y.size // y.shape[1]
    assert counts[(0, "0")] == 8 * 6 * 6 and counts[(0, "3")] == 8
    for module, expected in ((Shared(), [20.0]), (SharedActivation(), [])):  # 2 calls of 10 rows; other widths
        with covshift.Tracer(module, tmp_path / f"{type(module).__name__}.covshift", detail_every=1) as tracer:
            module(torch.randn(10, module.lin.in_features if hasattr(module, "lin") else 4)).sum().backward()
            tracer.step()
        rows = covshift.load(tracer.path).scalars(metric="unit_count", layer="act")
        assert rows["value"].tolist() == expected  # no per-unit statistics when the calls' widths differ


# ---------------------------------------------------------------------------------------
# exactness of mean and variance with a large value at the first position
# ---------------------------------------------------------------------------------------
def test_mean_var_exact_with_outlier_at_first_position(tmp_path):
    """Massive activations at position 0 (an attention-sink token) must not cost accuracy:
    means and variances are documented as exact."""

    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x * self.w

    model = nn.Sequential(Gain())
    x = torch.randn(50000, 2)
    x[0, 0] = 1000.0
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path) as tracer:
        model(x).sum().backward()
        tracer.step()
    tab = table(covshift.load(path))
    y = x.double().numpy()
    assert tab[(0, "0", "var")] == pytest.approx(y.var(), rel=1e-4)
    assert abs(tab[(0, "0", "mean")] - y.mean()) <= 1e-4 * (abs(y.mean()) + y.std())


def test_hooks_run_inside_torch_compile(tmp_path):
    """The hooks are plain tensor code: a torch.compile'd model records what eager records."""
    def train(compiled):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
        run = torch.compile(model, backend="eager") if compiled else model
        x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
        path = tmp_path / f"{compiled}.covshift"
        fit(model, path, x, y, 3, forward=run)
        return covshift.load(path).scalars()

    eager, compiled = train(False), train(True)
    assert len(compiled) == len(eager) > 0
    assert (compiled[["step", "layer", "metric"]].to_numpy() == eager[["step", "layer", "metric"]].to_numpy()).all()
    np.testing.assert_allclose(compiled["value"], eager["value"], rtol=1e-5, atol=1e-7)


def test_tracer_unwraps_a_compiled_model(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    compiled = torch.compile(model, backend="eager")
    with covshift.Tracer(compiled, tmp_path / "t.covshift") as tracer:
        compiled(torch.randn(5, 3)).sum().backward()
        tracer.step()
    assert covshift.load(tmp_path / "t.covshift").layers == ["0", "1"]


def test_paused_forwards_are_not_recorded_and_log_takes_layers(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    x, probe = torch.randn(6, 3), torch.randn(6, 3) * 100
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path) as tracer:
        out = model(x)
        with tracer.paused():
            model(probe).sum().backward()  # a measurement pass: not part of the step's statistics
        out.sum().backward()
        index = tracer.step()
        tracer.log(step=index, layer="0", probe_metric=2.5)
        tracer.log(extra=1.0)
        with pytest.raises(ValueError, match="not a layer"):
            tracer.log(layer="missing", value=1.0)
    frame = covshift.load(path).scalars()
    row = frame.set_index(["layer", "metric"])["value"]
    reference = model[0](x).detach().double().numpy()
    assert row[("0", "max")] == pytest.approx(reference.max(), rel=1e-6)
    assert row[("0", "probe_metric")] == 2.5 and row[("", "extra")] == 1.0


def test_a_closed_tracer_is_freed_without_the_cycle_collector(tmp_path):
    """No reference cycle keeps a closed Tracer alive (and with it, under torch.distributed,
    a gloo group that would be freed during the interpreter's exit and abort it)."""
    import gc
    import weakref

    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gc.disable()
    try:
        tracer = covshift.Tracer(net, tmp_path / "t.covshift", optimizer=opt)
        with tracer:
            for _ in range(3):
                opt.zero_grad()
                net(torch.randn(5, 4)).square().mean().backward()
                opt.step()
                tracer.step()
        ref = weakref.ref(tracer)
        del tracer
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("every", [1, 2])
def test_hooks_and_the_step_end_never_read_the_device(tmp_path, monkeypatch, every):
    """On the meta device every read of a value (``.item()``, ``.tolist()``, ``.cpu()``,
    ``bool(t)``) raises, so a model there trains under a Tracer only while nothing before the
    flush synchronises with the device: outputs kept whole and sampled ones, a ReLU's dead
    units, a detail step's per-unit sums, gradients, parameter norms and updates, the loss and
    the learning rate. The flush, which reads the values once, is left out."""
    net = nn.Sequential(nn.Linear(20, 300), nn.Sigmoid(), nn.Linear(300, 8), nn.ReLU(), nn.Linear(8, 3)).to("meta")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    tracer = covshift.Tracer(net, tmp_path / "t.covshift", optimizer=opt, every=every, detail_every=2 * every,
                             sample_size=1024)
    monkeypatch.setattr(tracer, "_flush", lambda now: None)
    with tracer:
        for _ in range(5):
            opt.zero_grad()
            loss = F.cross_entropy(net(torch.randn(32, 20, device="meta")), torch.zeros(32, dtype=torch.long,
                                                                                       device="meta"))
            loss.backward()
            opt.step()
            tracer.step(loss)
        pending = tracer._pending
        assert len(pending) == 5 and sum(bool(r.calls) for r in pending) == (5 if every == 1 else 3)
        assert any(r.units for r in pending) and any(r.maxima for r in pending)  # detail steps, ReLU
        assert any(r.whole for r in pending) and any(c[5] >= 0 for r in pending for c in r.calls)  # both paths
