"""How recorded steps reach the file: the arena the hooks write into, merged writes
(``write_every``), and exact statistics on large outputs through the whole path."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch
from torch import nn

import covshift
from covshift import stats
from covshift.records import Arena


def test_arena_hands_out_consecutive_views_grows_and_keeps_its_largest_buffer():
    arena = Arena(size=8)
    f32, f64 = torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    first = arena.take(3, f32)
    second = arena.take(4, f32)
    assert (first[0], first[1], second[0], second[1]) == (0, 0, 0, 3)
    first[2].copy_(torch.tensor([1.0, 2.0, 3.0]))
    second[2].copy_(torch.tensor([4.0, 5.0, 6.0, 7.0]))
    grown = arena.take(5, f32)  # does not fit in the 8 elements left: a new buffer, twice as large
    assert grown[:2] == (1, 0) and arena.buffers[1].numel() == 16
    grown[2].fill_(9.0)
    wide = arena.take(2, f64)  # another dtype: its own buffer
    assert wide[0] == 2 and wide[2].dtype == torch.float64
    wide[2].fill_(0.5)
    values, bases = arena.read(), arena.bases()
    assert bases.tolist() == [0, 7, 12]
    np.testing.assert_array_equal(values, [1, 2, 3, 4, 5, 6, 7, 9, 9, 9, 9, 9, 0.5, 0.5])
    arena.reset()  # the buffers being filled are kept, empty
    assert [b.numel() for b in arena.buffers] == [16, 8] and arena.used == [0, 0]
    assert arena.take(1, f32)[:2] == (0, 0) and arena.take(1, f64)[:2] == (1, 0)


def test_moments_write_into_a_view_of_a_buffer():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    buffer = torch.full((12,), -7.0)
    row = buffer[3:8]
    torch.mean(x[:100], 0, out=row[0])
    assert stats.moments(x, row[0], out=row) is row
    np.testing.assert_allclose(row.numpy(), stats.moments(x, x[:100].mean()).numpy())
    assert (buffer[:3] == -7.0).all() and (buffer[8:] == -7.0).all()


def _model_and_batch() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(16, 6), torch.randint(0, 3, (16,))


def _step(model, opt, x, y, tracer) -> None:
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    tracer.step(loss)


def _loss_chunks(path) -> list[int]:
    """The number of steps in each stored chunk of the run's loss."""
    with sqlite3.connect(path) as conn:
        return [count for (count,) in conn.execute(
            "SELECT count FROM series JOIN metrics ON metrics.id = series.metric_id "
            "WHERE metrics.name = 'loss' ORDER BY part")]


def test_flushes_within_write_every_are_written_together(tmp_path):
    """Flushes less than write_every seconds after the start or the last write wait in
    memory and go into the next write as one chunk per series; flush() and close() write
    at once."""
    path = tmp_path / "t.covshift"
    model, opt, x, y = _model_and_batch()
    with covshift.Tracer(model, path, optimizer=opt, flush_every=2, write_every=3600) as tracer:
        for _ in range(6):  # flushes after steps 1, 3 and 5
            _step(model, opt, x, y, tracer)
        with covshift.load(path) as live:
            assert live.series("run", "", "loss")[0].tolist() == []  # all still in memory
            assert tracer.unsaved_steps == [[0, 5]]
        tracer.flush()
        with covshift.load(path) as live:
            assert live.series("run", "", "loss")[0].tolist() == list(range(6))
            assert live.config("run")["saved_steps"] == [[0, 5]]
        _step(model, opt, x, y, tracer)
    assert _loss_chunks(path) == [6, 1]
    trace = covshift.load(path)
    df = trace.scalars(layer="1", metric="std")
    assert df["step"].tolist() == list(range(7))


def test_write_every_zero_writes_every_flush(tmp_path):
    path = tmp_path / "t.covshift"
    model, opt, x, y = _model_and_batch()
    with covshift.Tracer(model, path, optimizer=opt, flush_every=2, write_every=0) as tracer:
        for _ in range(6):
            _step(model, opt, x, y, tracer)
    assert _loss_chunks(path) == [2, 2, 2]


@pytest.mark.parametrize("value", [-1, float("nan"), "2"])
def test_write_every_must_be_a_non_negative_number(tmp_path, value):
    model, opt, _, _ = _model_and_batch()
    with pytest.raises(ValueError, match="write_every"):
        covshift.Tracer(model, tmp_path / "t.covshift", write_every=value)


def test_large_outputs_are_exact_through_the_tracer(tmp_path):
    """A 2M-element ReLU output and its gradient: the stored mean, variance, std and
    grad_norm are within 1e-6 of float64 computed on the same tensors (the file keeps
    layer metrics as float32, 6e-8), taken on the CPU in pieces with a working buffer of
    one piece, not of the output's size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 32 * 32, 2))
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 2, (32,))
    seen: dict[str, torch.Tensor] = {}
    model[1].register_forward_hook(lambda m, a, out: seen.__setitem__("y", out.detach().double().clone()))
    model[1].register_full_backward_hook(lambda m, gi, go: seen.__setitem__("g", go[0].detach().double().clone()))
    path = tmp_path / "t.covshift"
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with covshift.Tracer(model, path, optimizer=opt) as tracer:
        _step(model, opt, x, y, tracer)
        assert [b.numel() for b in tracer._scratch.values()] == [stats.MOMENTS_PIECE]
    assert seen["y"].numel() == 2_097_152
    trace = covshift.load(path)
    got = {metric: trace.series("run", "1", metric)[1][0] for metric in ("mean", "var", "std", "grad_norm")}
    ref_y, ref_g = seen["y"].numpy().ravel(), seen["g"].numpy().ravel()
    expect = {"mean": ref_y.mean(), "var": ref_y.var(), "std": ref_y.std(), "grad_norm": np.sqrt(np.square(ref_g).sum())}
    for metric, value in expect.items():
        assert abs(got[metric] - value) <= 1e-6 * abs(value), metric


@pytest.mark.parametrize("every", [1, 2])
def test_the_previous_steps_weight_norms_are_reused_and_update_ratios_stay_exact(tmp_path, monkeypatch, every):
    """When the previous step was recorded, the norms of the weights before this update are
    the norms it already took: one _foreach_norm call of every parameter norm per step, not
    a second one of the weights before the update; the update ratios equal ||W_t - W_(t-1)|| / ||W_(t-1)|| computed from copies of the weights."""
    model, opt, x, y = _model_and_batch()
    calls = []
    real = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda tensors, *a, **k: calls.append(1) or real(tensors, *a, **k))
    weights = [model[0].weight.detach().clone()]
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, optimizer=opt, every=every) as tracer:
        for step in range(6):
            before = len(calls)
            _step(model, opt, x, y, tracer)
            weights.append(model[0].weight.detach().clone())
            if step % every == 0 and step > 0:
                assert len(calls) - before == (1 if every == 1 else 2), step
    steps, ratios = covshift.load(path).series("run", "0", "weight.update_ratio")
    assert steps.tolist() == list(range(0, 6, every))
    for step, ratio in zip(steps.tolist(), ratios):
        w0, w1 = weights[step].double(), weights[step + 1].double()
        assert ratio == pytest.approx(float((w1 - w0).norm() / w0.norm()), rel=1e-5)


def test_deferred_flushes_are_written_in_transactions_of_at_most_merged_steps(tmp_path):
    """Batches waiting for write_every go to the file in chunks of up to MERGED_STEPS steps
    (so a chunk fits in a page), in a file of PAGE_SIZE pages."""
    from covshift.saving import MERGED_STEPS
    from covshift.store.schema import PAGE_SIZE

    path = tmp_path / "t.covshift"
    model, opt, x, y = _model_and_batch()
    flush = MERGED_STEPS // 4
    with covshift.Tracer(model, path, optimizer=opt, flush_every=flush, write_every=3600, every=1) as tracer:
        for _ in range(5 * flush):
            _step(model, opt, x, y, tracer)
    assert _loss_chunks(path) == [MERGED_STEPS, flush]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE
    assert covshift.load(path).config("run")["saved_steps"] == [[0, 5 * flush - 1]]
