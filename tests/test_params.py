"""covshift.params: the norms of gradients, weights and updates against float64 computed
from copies of the same tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covshift.params import ParamNorms
from covshift.records import StepRecord, fetch

#: shapes that are not multiples of a norm row, one larger than a row, and a single value
SHAPES = [(37, 11), (5,), (300,), (1,), (128,), (3, 129)]


def _tensors(dtype: torch.dtype, scales: list[float]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * c).to(dtype).requires_grad_()
            for s, c in zip(SHAPES, scales)]


def _norm(t: torch.Tensor) -> float:
    return float(np.sqrt(np.sum(np.square(t.detach().double().numpy()))))


def _record(norms: ParamNorms, step: int) -> dict[str, np.ndarray]:
    rec = StepRecord(step)
    norms.record(rec)
    fetch([rec.slots])
    got = {"grad_params": np.array(rec.grad_params)}
    for name in ("grad_norms", "weight_norms", "update_norms", "prev_norms"):
        handle = getattr(rec, name)
        got[name] = None if handle is None else rec.slots.get(handle)
    return got


def _train(ws: list[torch.Tensor], norms: ParamNorms, steps: int, every: int = 1, unused: int | None = None,
           lr: float = 1e-3) -> None:
    """SGD on a sum of squares; at each recorded step the norms against float64 references."""
    norms.snapshot()
    for step in range(steps):
        for i, w in enumerate(ws):
            w.grad = None if i == unused and step % 2 else (w.detach() * (i + 1) * 0.5).to(w.dtype)
        before = [w.detach().double().clone() for w in ws]
        with torch.no_grad():
            for w in ws:
                if w.grad is not None:
                    w -= lr * w.grad
        if step % every == 0:
            got = _record(norms, step)
            have = [i for i, w in enumerate(ws) if w.grad is not None]
            assert sorted(got["grad_params"].tolist()) == have
            grads = dict(zip(got["grad_params"].tolist(), got["grad_norms"]))
            tol = 1e-6  # of the tensors' own values (bfloat16 too), summed exactly enough
            for i in have:
                assert grads[i] == pytest.approx(_norm(ws[i].grad), rel=tol, abs=0), (step, i)
            for i, w in enumerate(ws):
                assert got["weight_norms"][i] == pytest.approx(_norm(w), rel=tol), (step, i)
                assert got["prev_norms"][i] == pytest.approx(_norm(before[i].to(w.dtype)), rel=tol), (step, i)
                update = _norm(w.detach().double() - before[i].to(w.dtype).double())
                assert got["update_norms"][i] == pytest.approx(update, rel=1e-5), (step, i)
        if (step + 1) % every == 0:
            norms.snapshot()


@pytest.mark.parametrize("every", [1, 3])
def test_norms_match_float64(every):
    """Gradients 1e8 apart in size, odd shapes, consecutive and spaced recorded steps."""
    ws = _tensors(torch.float32, [1e4, 1e-4, 1.0, 3.0, 1e-3, 10.0])
    norms = ParamNorms(ws, sharded=False)
    for i in range(len(ws)):
        norms.track(str(i), "weight", i)
    _train(ws, norms, steps=7, every=every)


def test_a_missing_gradient_is_left_out():
    """A parameter without a gradient at some steps: its norm is not recorded there, the
    others' are."""
    ws = _tensors(torch.float32, [1.0] * len(SHAPES))
    norms = ParamNorms(ws, sharded=False)
    for i in range(len(ws)):
        norms.track(str(i), "weight", i)
    _train(ws, norms, steps=6, unused=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_norms_in_float64_and_bfloat16(dtype):
    ws = _tensors(dtype, [1.0, 2.0, 0.5, 1.0, 4.0, 1.0])
    norms = ParamNorms(ws, sharded=False)
    for i in range(len(ws)):
        norms.track(str(i), "weight", i)
    _train(ws, norms, steps=4, lr=1e-2)


def test_a_weight_tracked_during_a_step_takes_its_value_then_as_its_snapshot():
    """A layer found during a step (a functional container in step 0) tracks one more
    weight: its update is measured from its value when it was added."""
    ws = _tensors(torch.float32, [1.0] * len(SHAPES))
    norms = ParamNorms(ws, sharded=False)
    for i in range(len(ws) - 1):
        norms.track(str(i), "weight", i)
    norms.snapshot()
    norms.track("last", "weight", len(ws) - 1)
    for w in ws:
        w.grad = w.detach().clone()
    before = _norm(ws[-1])
    with torch.no_grad():
        ws[-1] -= 0.5 * ws[-1].grad
    got = _record(norms, 0)
    assert len(got["weight_norms"]) == len(ws)
    assert got["update_norms"][-1] == pytest.approx(0.5 * before, rel=1e-6)
    assert got["prev_norms"][-1] == pytest.approx(before, rel=1e-6)
    norms.snapshot()
    _train(ws, norms, steps=3)


def test_untracked_parameters_have_gradient_norms_only():
    ws = _tensors(torch.float32, [1.0] * len(SHAPES))
    norms = ParamNorms(ws, sharded=False)
    norms.track("0", "weight", 0)
    norms.snapshot()
    for w in ws:
        w.grad = torch.ones_like(w)
    got = _record(norms, 0)
    assert len(got["grad_norms"]) == len(ws) and len(got["weight_norms"]) == 1
    assert got["grad_norms"].tolist() == pytest.approx([np.sqrt(w.numel()) for w in ws])
