"""The hooks under torch.compile with the default (inductor) backend: one graph, no graph
break, no recompile after the first step, and the trace an eager run records.

One compiled run is shared by the tests (inductor compiles the tiny model in seconds with
a warm cache, about half a minute without)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import covshift

STEPS = 4


def _train(path, compiled: bool) -> list[tuple[int, int]]:
    """Train a tiny model (a ReLU: unit maxima; a GELU: input samples; detail steps 0
    and 2) for STEPS steps; return dynamo's (graphs, graph breaks) after every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    forward = torch.compile(model, fullgraph=True) if compiled else model
    seen = []
    with covshift.Tracer(model, path, optimizer=opt, detail_every=2) as tracer:
        for _ in range(STEPS):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(forward(x), y)
            loss.backward()
            opt.step()
            tracer.step(loss=loss)
            seen.append((counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())))
    return seen


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compile")
    torch._dynamo.reset()  # dynamo does not guard on hooks: no graph compiled elsewhere without them
    counters.clear()
    seen = _train(folder / "compiled.covshift", compiled=True)
    _train(folder / "eager.covshift", compiled=False)
    return seen, covshift.load(folder / "compiled.covshift"), covshift.load(folder / "eager.covshift")


def test_traced_model_compiles_to_one_graph_with_no_break_and_no_recompile(runs):
    seen, _, _ = runs
    assert seen == [(1, 0)] * STEPS  # fullgraph=True: a break would have raised


def test_compiled_trace_equals_the_eager_trace(runs):
    _, compiled, eager = runs
    a, b = eager.scalars(), compiled.scalars()
    assert len(a) == len(b) > 0
    assert {"grad_norm", "p50", "saturation", "dead"} <= set(b["metric"])
    keys = ["step", "layer", "metric"]
    assert (a[keys].to_numpy() == b[keys].to_numpy()).all()
    np.testing.assert_allclose(b["value"], a["value"], rtol=1e-5, atol=1e-6)
    units_a, units_b = eager.units(), compiled.units()
    assert sorted(set(units_b["step"])) == [0, 2]  # detail steps only
    np.testing.assert_allclose(units_b.select_dtypes("number"), units_a.select_dtypes("number"), rtol=1e-5, atol=1e-6)
    assert compiled.layers == eager.layers
