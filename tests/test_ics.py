"""Tests of covshift.ics against closed forms written out here with plain matrix algebra."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from covshift.ics import Instruments, layer_groups, measure_ics, measure_landscape

D = torch.float64


def _linear_grads(Ws: list[torch.Tensor], X: torch.Tensor, Y: torch.Tensor) -> list[torch.Tensor]:
    """∂L/∂W_i for Ŷ = X W_1ᵀ ... W_kᵀ and L = mean((Ŷ - Y)²), by explicit products:
    ∂L/∂W_i = (D W_k ⋯ W_{i+1})ᵀ (X W_1ᵀ ⋯ W_{i-1}ᵀ) with D = 2 (Ŷ - Y) / Y.numel()."""
    k = len(Ws)
    Yhat = X
    for W in Ws:
        Yhat = Yhat @ W.T
    Dm = 2.0 * (Yhat - Y) / Y.numel()
    grads = []
    for i in range(k):
        left = Dm
        for W in reversed(Ws[i + 1 :]):
            left = left @ W
        right = X
        for W in Ws[:i]:
            right = right @ W.T
        grads.append(left.T @ right)
    return grads


def test_ics_closed_form_deep_linear():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5, bias=False), nn.Linear(5, 3, bias=False), nn.Linear(3, 2, bias=False)
    ).to(D)
    X, Y = torch.randn(7, 4, dtype=D), torch.randn(7, 2, dtype=D)
    lr = 0.3
    Wb = [m.weight.detach().clone() for m in model]
    step = _linear_grads(Wb, X, Y)
    Wa = [W - lr * g for W, g in zip(Wb, step)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for m, W in zip(model, Wa):
            m.weight.copy_(W)

    got = measure_ics(model, nn.MSELoss(), X, Y, before)

    assert [r[0] for r in got] == ["0", "1", "2"]
    for i, (_, l2, rel, cos) in enumerate(got):
        G = _linear_grads(Wb, X, Y)[i].reshape(-1)
        G2 = _linear_grads(Wa[:i] + Wb[i:], X, Y)[i].reshape(-1)
        want_l2 = torch.linalg.vector_norm(G - G2).item()
        want_cos = (G @ G2 / (G.norm() * G2.norm())).item()
        assert l2 == pytest.approx(want_l2, rel=1e-10, abs=1e-14)
        assert rel == pytest.approx(want_l2 / G.norm().item(), rel=1e-10, abs=1e-14)
        assert cos == pytest.approx(want_cos, rel=1e-10)
    assert got[0][1] == 0.0 and got[0][2] == 0.0 and got[0][3] == pytest.approx(1.0, rel=1e-12)
    assert got[1][1] > 1e-3 and got[2][1] > 1e-3  # the later layers do see a shift
    # the model itself is untouched
    for m, W in zip(model, Wa):
        assert torch.equal(m.weight, W)


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)
    )


def _train(instrument: bool):
    torch.manual_seed(123)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    inst = Instruments(model, loss_fn, every=2, lr_of=lambda: opt.param_groups[0]["lr"])
    losses, records = [], []
    for step in range(6):
        x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if instrument:
            inst.before_step(step)
        opt.step()
        if instrument:
            records.append(inst.after_step(step, x, y))
        losses.append(loss.detach())
    return torch.stack(losses), model, opt, torch.random.get_rng_state(), records


def test_instruments_do_not_interfere():
    l0, m0, o0, rng0, _ = _train(False)
    l1, m1, o1, rng1, records = _train(True)
    assert torch.equal(l0, l1)
    s0, s1 = m0.state_dict(), m1.state_dict()
    assert list(s0) == list(s1) and "1.num_batches_tracked" in s0
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert int(s1["1.num_batches_tracked"]) == 6
    st0, st1 = o0.state_dict()["state"], o1.state_dict()["state"]
    assert st0.keys() == st1.keys() and len(st0) == 6
    for k in st0:
        assert torch.equal(st0[k]["momentum_buffer"], st1[k]["momentum_buffer"])
    assert torch.equal(rng0, rng1)

    assert [r is not None for r in records] == [True, False, True, False, True, False]
    for r in records[::2]:
        assert [layer for layer, *_ in r["layers"]] == ["0", "4"]
        assert r["layers"][0][1] == 0.0 and r["layers"][0][3] == pytest.approx(1.0)
        assert r["layers"][1][1] > 0
        assert all(math.isfinite(v) for layer in r["layers"] for v in layer[1:])
        for key in ("loss_variation", "grad_predictiveness", "beta_smoothness", "landscape_loss_min",
                    "landscape_loss_max", "grad_predictiveness_min"):
            assert math.isfinite(r[key]) and r[key] > 0
        assert r["loss_variation"] == r["landscape_loss_max"] - r["landscape_loss_min"]
        assert r["grad_predictiveness_min"] <= r["grad_predictiveness"]


def test_layer_groups_attach_batchnorm_to_previous_layer():
    model = nn.Sequential(
        nn.BatchNorm1d(3),
        nn.Linear(3, 4),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.Sequential(nn.Linear(4, 2, bias=False), nn.BatchNorm1d(2, affine=False)),
        nn.BatchNorm1d(2),
    )
    model[1].bias.requires_grad_(False)
    assert layer_groups(model) == [
        ("0", ["0.weight", "0.bias"]),
        ("1", ["1.weight", "2.weight", "2.bias"]),
        ("4.0", ["4.0.weight", "5.weight", "5.bias"]),
    ]


class _Quadratic(nn.Module):
    """L(θ) = ½ ||X θ||² = ½ θᵀ A θ with A = XᵀX, through a bias-free Linear."""

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(theta.numel(), 1, bias=False).to(D)
        with torch.no_grad():
            self.lin.weight.copy_(theta.reshape(1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("overshoot", [False, True], ids=["small-steps", "overshooting"])
def test_landscape_closed_form_quadratic(overshoot):
    """Along -g the loss is ½(θ - ηg)ᵀA(θ - ηg) and ∇L(θ) - ∇L(θ - ηg) = ηAg, by hand.
    Small steps: the loss falls along all of them, so its max is at η = 0 and its min at the
    largest η. Overshooting: the largest step, 3 η* (η* = gᵀg / gᵀAg minimises the loss along
    -g), lands above L(θ), and the smallest loss is at 0.75 η*: both extremes lie inside."""
    torch.manual_seed(1)
    X = torch.randn(6, 4, dtype=D)
    A = X.T @ X
    theta = torch.randn(4, dtype=D)
    model = _Quadratic(theta)
    loss_fn = lambda out, y: 0.5 * out.pow(2).sum()  # noqa: E731
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = A @ theta
    factors = (0.25, 0.5, 1, 2, 4)
    lr = 0.75 * (g @ g / (g @ A @ g)).item() if overshoot else 0.2 / torch.linalg.eigvalsh(A).max().item()

    got = measure_landscape(model, loss_fn, X, None, before, lr=lr, factors=factors)

    etas = [0.0] + [lr * f for f in factors]
    losses = [(0.5 * (theta - e * g) @ A @ (theta - e * g)).item() for e in etas]
    low, high = losses.index(min(losses)), losses.index(max(losses))
    assert (low, high) == ((3, 5) if overshoot else (5, 0))  # η = 0 is counted
    assert got["landscape_loss_min"] == pytest.approx(losses[low], rel=1e-10)
    assert got["landscape_loss_max"] == pytest.approx(losses[high], rel=1e-10)
    assert got["loss_variation"] == pytest.approx(losses[high] - losses[low], rel=1e-10)
    Ag = torch.linalg.vector_norm(A @ g).item()
    assert got["grad_predictiveness"] == pytest.approx(lr * max(factors) * Ag, rel=1e-10)
    assert got["grad_predictiveness_min"] == pytest.approx(lr * min(factors) * Ag, rel=1e-10)
    assert got["beta_smoothness"] == pytest.approx(Ag / torch.linalg.vector_norm(g).item(), rel=1e-10)
    assert got["beta_smoothness"] <= torch.linalg.eigvalsh(A).max().item() * (1 + 1e-12)
    assert torch.equal(model.lin.weight.reshape(-1), theta)


def test_measure_ics_keeps_batchnorm_buffers_and_grads():
    torch.manual_seed(2)
    model = _net()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    nn.CrossEntropyLoss()(model(x), y).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    snapshot = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    measure_ics(model, nn.CrossEntropyLoss(), x, y, before)
    measure_landscape(model, nn.CrossEntropyLoss(), x, y, before, lr=0.1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert model.training
