"""Shared test code: a few SGD steps of a model with a Tracer attached."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import covshift


def fit(model: nn.Module, path: Any, x: torch.Tensor, y: Any, steps: int, *, lr: float = 0.1,
        forward: Callable | None = None, loss_fn: Callable | None = None,
        after_step: Callable[[covshift.Tracer, int], None] | None = None, **tracer_kwargs: Any) -> nn.Module:
    """Train ``model`` (through ``forward``, default the model itself) on the fixed batch
    ``(x, y)`` for ``steps`` SGD steps, traced into ``path``; ``after_step(tracer, step)``
    runs inside the tracer after each step. Returns the model."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = loss_fn or nn.functional.cross_entropy
    forward = forward or model
    with covshift.Tracer(model, path, optimizer=opt, **tracer_kwargs) as tracer:
        for step in range(steps):
            opt.zero_grad()
            loss = loss_fn(forward(x), y)
            loss.backward()
            opt.step()
            tracer.step(loss=loss)
            if after_step is not None:
                after_step(tracer, step)
    return model


def torchrun(script: Any, *args: Any, cwd: Any, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 script args`` (CPU, one thread a process),
    importing this checkout's covshift."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(covshift.__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd)
