"""Outputs kept whole (at most twice ``sample_size`` values): their moments are computed at the
step's end for all outputs of a size at once (stats.row_moments), and their gradients
summed there too (stats.stacked_sums_of_squares), with no per-layer moment or gradient
kernel in the hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import covshift
from covshift import stats
from covshift.records import Arena, Place


def _rows(rng: np.random.Generator) -> list[np.ndarray]:
    """Realistic outputs, 2.4M values in all, as float32: saturated sigmoids (0.999 +- 1e-4),
    ReLU outputs, large-offset Gaussians, and bfloat16 values."""
    sigmoid = (0.999 + 1e-4 * rng.standard_normal((200, 4096))).astype(np.float32)
    relu = np.maximum(rng.standard_normal((200, 4096)), 0).astype(np.float32)
    offset = (1000.0 + rng.standard_normal((300, 2048))).astype(np.float32)
    bf16 = torch.randn(100, 2048, generator=torch.Generator().manual_seed(1)).bfloat16().float().numpy()
    return [sigmoid, relu, offset, bf16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_moments_match_float64_on_millions_of_values(dtype):
    groups = _rows(np.random.default_rng(0))
    assert sum(g.size for g in groups) >= 2_000_000
    for group in groups:
        got = stats.row_moments(torch.from_numpy(group).to(dtype)).numpy()
        x = group.astype(np.float64)
        mean, m2 = stats.finish_moments(x.shape[1], got[:, 0] / x.shape[1], got[:, 1], got[:, 2])
        want = x.mean(axis=1)
        scale = np.abs(want) + x.std(axis=1)  # a mean near 0 is judged against the spread
        assert (np.abs(mean - want) <= 1e-6 * scale).all()
        np.testing.assert_allclose(m2, ((x - want[:, None]) ** 2).sum(axis=1), rtol=1e-6)
        assert (got[:, 3] == x.min(axis=1)).all() and (got[:, 4] == x.max(axis=1)).all()


def test_row_moments_of_nonfinite_values_are_not_finite():
    got = stats.row_moments(torch.tensor([[1.0, float("nan"), 2.0], [3.0, float("inf"), -1.0]])).numpy()
    assert np.isnan(got[0, [0, 2, 3, 4]]).all() and not np.isfinite(got[1, [0, 2]]).any()
    assert (got[1, 3:] == (-1.0, np.inf)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_stacked_sums_of_squares_match_float64(dtype):
    gen = torch.Generator().manual_seed(0)
    same = [(torch.randn(32, 64, generator=gen) * 10 ** (i % 5)).to(dtype) for i in range(49)]
    got = stats.stacked_sums_of_squares(same)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = torch.stack([(t.double() ** 2).sum() for t in same])
    assert float(((got.double() - want) / want).abs().max()) < 1e-6


def _net(uneven: bool = False) -> nn.Sequential:
    """Outputs of 16 x 8 = 128 values (kept whole), 16 x 300 = 4800 (sampled), 16 x 3. With
    ``uneven``, the whole outputs of the Linear layers 0, 2 and 5 do not lie at even
    distances in the step's buffer (the sampled layers' values sit between 2 and 5), so
    their rows are gathered by positions instead of viewed."""
    torch.manual_seed(0)
    middle = [nn.Linear(8, 8)] if uneven else []
    tail = [nn.Linear(300, 8), nn.Linear(8, 3)] if uneven else [nn.Linear(300, 3)]
    net = nn.Sequential(nn.Linear(5, 8), nn.Sigmoid(), *middle, nn.Linear(8, 300), nn.Tanh(), *tail)
    with torch.no_grad():
        net[0].bias.fill_(7.0)  # the sigmoid saturates: 0.999 +- a little
    return net


@pytest.mark.parametrize("uneven", [False, True])
def test_small_outputs_cost_no_moment_or_gradient_kernel_and_are_exact(tmp_path, monkeypatch, uneven):
    """Only the sampled layers (Linear(8, 300) and its Tanh) call the moment and gradient
    kernels, and only the Tanh has its saturation and gain taken at the flush; the others'
    mean, variance, min, max, gradient norm, saturation and gain equal float64 computations
    on their outputs (within the float32 the trace stores them in)."""
    net = _net(uneven)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    calls = {"moments": 0, "sum_of_squares": 0}
    for name in calls:
        real = getattr(stats, name)
        monkeypatch.setattr(stats, name, lambda *a, _real=real, _name=name, **k: calls.__setitem__(
            _name, calls[_name] + 1) or _real(*a, **k))
    widths: list[int] = []
    real_derivative_stats = stats.derivative_stats
    monkeypatch.setattr(stats, "derivative_stats", lambda source, kind: widths.append(source.shape[1])
                        or real_derivative_stats(source, kind))
    outs: dict[str, list[torch.Tensor]] = {}
    grads: dict[str, list[torch.Tensor]] = {}

    def keep(name, module, args, out):
        outs.setdefault(name, []).append(out.detach().double())
        out.register_hook(lambda g: grads.setdefault(name, []).append(g.double()))

    steps = 3
    with covshift.Tracer(net, tmp_path / "t.covshift", optimizer=opt, sample_size=1024) as tracer:
        handles = [m.register_forward_hook(lambda m, a, o, n=n: keep(n, m, a, o)) for n, m in net.named_children()]
        for _ in range(steps):
            opt.zero_grad()
            loss = net(torch.randn(16, 5)).square().mean()
            loss.backward()
            opt.step()
            tracer.step(loss)
        for h in handles:
            h.remove()
        gathered = any(key[0] == "rows" for key in tracer._indices.kept)
    assert gathered == uneven
    assert calls == {"moments": 2 * steps, "sum_of_squares": 2 * steps}
    assert widths == [1024]  # the flush took saturation and gain of the sampled Tanh only
    tab = covshift.load(tmp_path / "t.covshift").scalars().set_index(["step", "layer", "metric"])["value"]
    for name in ("0", "1", "2", "5", "6") if uneven else ("0", "1", "4"):
        for step in range(steps):
            y, g = outs[name][step], grads[name][step]
            assert abs(tab[(step, name, "mean")] - float(y.mean())) <= 1e-6 * float(y.mean().abs() + y.std())
            assert tab[(step, name, "var")] == pytest.approx(float(y.var(unbiased=False)), rel=1e-6)
            assert (tab[(step, name, "min")], tab[(step, name, "max")]) == (float(y.min()), float(y.max()))
            assert tab[(step, name, "grad_norm")] == pytest.approx(float(g.norm()), rel=1e-6)
    for step in range(steps):  # the sigmoid's saturation and gain, taken at the step
        d = 4 * outs["1"][step] * (1 - outs["1"][step])
        assert tab[(step, "1", "saturation")] == pytest.approx(float((d.abs() < 0.1).double().mean()), abs=1e-7)
        assert tab[(step, "1", "gain")] == pytest.approx(float(d.mean()), rel=1e-6)
    saturated = outs["1"][0]
    assert float(saturated.mean()) > 0.99 and float(saturated.std()) < 1e-2  # the hard case for a variance


@pytest.mark.parametrize("width, whole", [(64, True), (128, True), (129, False)])
def test_outputs_of_up_to_twice_the_sample_size_are_kept_whole(tmp_path, monkeypatch, width, whole):
    """With ``sample_size`` 1024 and batch 16, a sigmoid's output of 1024 or 2048 values is
    kept whole (no moment kernel in the hook; its saturation is that of all its values,
    taken at the step), one of 2064 values is sampled (moments in the hook, saturation from
    a 1024-value sample at the flush); the mean and variance are exact either way."""
    from covshift.tracer import WHOLE_UP_TO

    assert WHOLE_UP_TO == 2
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, width), nn.Sigmoid(), nn.Linear(width, 1))
    with torch.no_grad():
        net[0].bias.fill_(3.0)  # about a third of the values saturate (|g| < 0.1)
    calls, widths = [0], []
    real_moments, real_derivative_stats = stats.moments, stats.derivative_stats
    monkeypatch.setattr(stats, "moments", lambda *a, **k: calls.__setitem__(0, calls[0] + 1) or real_moments(*a, **k))
    monkeypatch.setattr(stats, "derivative_stats", lambda source, kind: widths.append(source.shape[1])
                        or real_derivative_stats(source, kind))
    outs: list[torch.Tensor] = []
    net[1].register_forward_hook(lambda m, a, o: outs.append(o.detach().double()))
    with covshift.Tracer(net, tmp_path / "t.covshift", sample_size=1024) as tracer:
        for _ in range(2):
            loss = net(torch.randn(16, 5)).square().mean()
            loss.backward()
            tracer.step(loss)
    assert calls[0] == (0 if whole else 2 * 2)  # two sampled outputs (Linear and Sigmoid) a step
    assert widths == ([] if whole else [1024])
    tab = covshift.load(tmp_path / "t.covshift").scalars().set_index(["step", "layer", "metric"])["value"]
    for step, y in enumerate(outs):
        assert tab[(step, "1", "mean")] == pytest.approx(float(y.mean()), rel=1e-6)
        assert tab[(step, "1", "var")] == pytest.approx(float(y.var(unbiased=False)), rel=1e-6)
        exact = float(((4 * y * (1 - y)).abs() < 0.1).double().mean())
        assert 0.05 < exact < 0.95
        if whole:
            assert tab[(step, "1", "saturation")] == pytest.approx(exact, abs=1e-7)
        else:
            assert abs(tab[(step, "1", "saturation")] - exact) < 0.1  # a sample's fraction


def test_a_backward_after_step_does_not_break_the_next_step(tmp_path):
    """A gradient held after step() ended its step is written at the next step's end, and
    nothing fails (the cell it goes to belongs to the next step)."""
    net = _net()
    with covshift.Tracer(net, tmp_path / "t.covshift") as tracer:
        loss = net(torch.randn(4, 5)).sum()
        tracer.step(loss)
        loss.backward()
        net(torch.randn(4, 5)).sum().backward()
        tracer.step()
    trace = covshift.load(tmp_path / "t.covshift")
    assert trace.series("run", "", "loss")[0].tolist() == [0]
    assert trace.series("run", "0", "grad_norm")[0].tolist() == [1]  # step 0's gradient came after it ended


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_norms_with_a_plan_stack_small_tensors_of_one_shape_and_match_float64(dtype):
    """Five 64 x 64 and five 64-element tensors are stacked, a large one and two of a rare
    shape are normed one by one (``torch._foreach_norm``, within 3e-5); the stacked norms
    are within 1e-6 of float64, all in the input order."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 64), (64,)] * 5 + [(100, 100), (3, 7), (3, 7)]
    tensors = [(torch.randn(*s, generator=gen) * (i + 1)).to(dtype) for i, s in enumerate(shapes)]
    plan = stats.NormPlan.of(tensors)
    assert sorted(len(members) for members, _ in plan.stacks) == [5, 5]
    assert plan.rest[0] == [10, 11, 12]
    got = stats.norms(tensors, plan)
    want = torch.stack([t.double().norm() for t in tensors])
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    error = ((got.double() - want) / want).abs()
    assert float(error[:10].max()) < 1e-6 and float(error[10:].max()) < 3e-5


def test_a_norm_plan_stacks_nothing_off_the_cpu():
    meta = [torch.empty(8, 8, device="meta") for _ in range(6)]
    assert stats.NormPlan.of(meta).stacks == ()


def test_the_plan_of_whole_outputs_is_made_once_per_layout_and_follows_changes(tmp_path, monkeypatch):
    """The groups of a step's outputs kept whole are planned once while the step's calls stay
    the same, and planned again when they change (a step with two forward passes, then one
    again); every step's mean and saturation still match its own outputs."""
    from covshift.whole import WholePlan

    plans: list[int] = []
    real_plan = WholePlan._plan
    monkeypatch.setattr(WholePlan, "_plan", lambda self, calls, kind_of: plans.append(len(calls))
                        or real_plan(self, calls, kind_of))
    net = _net(uneven=True)
    outs: dict[tuple[int, str], list[torch.Tensor]] = {}
    passes = [1, 1, 1, 2, 2, 1, 1]
    with covshift.Tracer(net, tmp_path / "t.covshift", sample_size=1024) as tracer:
        for step, count in enumerate(passes):
            handles = [m.register_forward_hook(lambda m, a, o, n=n, s=step: outs.setdefault((s, n), []).append(
                o.detach().double())) for n, m in net.named_children()]
            loss = sum(net(torch.randn(16, 5)).square().mean() for _ in range(count))
            loss.backward()
            tracer.step(loss)
            for h in handles:
                h.remove()
    assert plans == [7, 14, 7]  # seven calls, fourteen with two passes, seven again
    tab = covshift.load(tmp_path / "t.covshift").scalars().set_index(["step", "layer", "metric"])["value"]
    for step in range(len(passes)):
        y = torch.cat([o.reshape(-1) for o in outs[(step, "0")]])  # the calls of a step pooled
        assert tab[(step, "0", "mean")] == pytest.approx(float(y.mean()), rel=1e-6)
        d = torch.cat([(4 * o * (1 - o)).reshape(-1) for o in outs[(step, "1")]])
        assert tab[(step, "1", "saturation")] == pytest.approx(float((d.abs() < 0.1).double().mean()), abs=1e-7)


def test_hooks_take_last_steps_places_again_without_a_lookup(tmp_path, monkeypatch):
    """At steps whose calls come as at the last step, each hook takes the staging's elements
    its layer took then (samples, moment rows, gradient cells: Arena._again) and looks none
    up; a step with two passes looks places up again and still records every call of it."""
    found: list[bool] = []
    real_again = Arena._again
    monkeypatch.setattr(Arena, "_again", lambda self, place, n, like: found.append(
        real_again(self, place, n, like)) or found[-1])
    net = _net(uneven=True)
    per_step = []
    outs: dict[int, list[torch.Tensor]] = {}
    passes = [1, 1, 1, 2, 1, 1]
    with covshift.Tracer(net, tmp_path / "t.covshift", sample_size=1024) as tracer:
        for step, count in enumerate(passes):
            handle = net[0].register_forward_hook(lambda m, a, o, s=step: outs.setdefault(s, []).append(o.detach().double()))
            before = len(found)
            loss = sum(net(torch.randn(16, 5)).square().mean() for _ in range(count))
            loss.backward()
            tracer.step(loss)
            handle.remove()
            per_step.append(found[before:])
    # 7 outputs, 2 of them sampled (a moments' row and a gradient cell each, whole ones a held gradient)
    for step in (1, 2, 5):
        assert per_step[step] == [True] * 16, step
    assert not all(per_step[3])
    tab = covshift.load(tmp_path / "t.covshift").scalars().set_index(["step", "layer", "metric"])["value"]
    for step in range(len(passes)):
        y = torch.cat([o.reshape(-1) for o in outs[step]])
        assert tab[(step, "0", "mean")] == pytest.approx(float(y.mean()), rel=1e-6)
        assert tab[(step, "0", "var")] == pytest.approx(float(y.var(unbiased=False)), rel=1e-6)


def test_a_place_is_taken_again_only_when_next_free_in_the_same_buffers():
    arena, place, like = Arena(8), Place(), torch.zeros(1)
    index, offset, view = arena.take(3, like, place)
    arena.used[index] = 0  # the next step
    again = arena.take(3, like, place)
    assert again[:2] == (index, offset) and again[2] is view and arena.used[index] == 3
    arena.used[index] = 0
    arena.take(2, like)  # another take first: the place's elements are not the next free ones
    assert arena.take(3, like, place)[1] == 2 and place.offset == 2
    assert arena.take(3, torch.zeros(1, dtype=torch.float64), place)[0] != index  # another kind
    arena.reset()  # new buffers: a view of the old ones is not handed out
    arena.take(3, like, place)
    arena.used[place.index] = 0
    kept = place.view
    arena.reset()
    assert arena.take(3, like, place)[2] is not kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_window_derivatives_and_saturation_counts_at_the_edges(dtype):
    """The ReLU-family windows are 1 strictly inside their interval and 0 at its ends, outside,
    and on NaN and infinities; a saturation count takes |g| < 0.1 strictly and leaves NaN out."""
    y = torch.tensor([-1.0, 0.0, 0.5, 6.0, 7.0, float("nan"), float("inf"), -float("inf")], dtype=dtype)
    relu, relu6 = stats.BEHAVIOURS["relu"][1], stats.BEHAVIOURS["relu6"][1]
    assert relu.derivative(y).dtype == dtype
    assert relu.derivative(y).tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert relu6.derivative(y).tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    identity = stats.Nonlinearity("identity", lambda t: t.clone())
    rows = torch.tensor([[0.1, 0.0999, -0.05, float("nan")], [0.2, -0.1, -0.0999, 1.0]], dtype=dtype)
    got = stats.row_derivative_stats(rows, identity).double().numpy()
    g = rows.double().numpy()
    np.testing.assert_array_equal(got[:, 0], (np.abs(g) < 0.1).sum(axis=1) / 4)
    assert got[0, 0] == 0.5 and got[1, 0] == 0.25 and np.isnan(got[0, 1])
    assert got[1, 1] == pytest.approx(g[1].mean(), rel=1e-6)


def test_gradients_of_whole_outputs_modified_in_place_and_of_leaf_outputs(tmp_path):
    """The gradient of an output kept whole is held by a pre-hook of the node that made it: a
    ReLU(inplace=True) applied to it afterwards does not change which gradient is summed (that
    of the Linear's output, as a reference computed out of place gives), and an output that
    is a leaf (no node) is still hooked."""

    class Leaf(nn.Module):  # returns its own parameter: an output with no grad_fn
        def __init__(self) -> None:
            super().__init__()
            self.value = nn.Parameter(torch.randn(4, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.value

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    leaf = Leaf()
    x = torch.randn(4, 5)
    y0 = net[0](x)  # the reference, out of place
    ref = torch.autograd.grad(net[2](torch.relu(y0) * leaf.value).sum(), [y0, leaf.value])
    with covshift.Tracer(nn.ModuleDict({"net": net, "leaf": leaf}), tmp_path / "t.covshift",
                         layers=["net.0", "net.2", "leaf"]) as tracer:
        (net[2](net[1](net[0](x)) * leaf(x))).sum().backward()
        tracer.step()
    tab = covshift.load(tmp_path / "t.covshift").scalars().set_index(["layer", "metric"])["value"]
    assert tab[("net.0", "grad_norm")] == pytest.approx(float(ref[0].norm()), rel=1e-6)
    assert tab[("leaf", "grad_norm")] == pytest.approx(float(ref[1].norm()), rel=1e-6)
