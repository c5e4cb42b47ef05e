"""Lightning's and the Hugging Face Trainer's callbacks under DDP (torchrun, gloo, CPU):
every rank records, and the trace holds the global batch's statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import covshift
from helpers import torchrun

SCRIPT = Path(__file__).parent / "ddp_frameworks.py"


def launch(framework: str, tmp_path: Path) -> tuple[covshift.Trace, list[dict[str, np.ndarray]]]:
    done = torchrun(SCRIPT, framework, tmp_path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    return covshift.load(tmp_path / "trace.covshift"), ranks


def test_lightning_ddp_records_the_global_batch(tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch")
    trace, ranks = launch("lightning", tmp_path)
    assert trace.config("fit")["tracer"]["world_size"] == 2
    assert trace.layers == ["net.0", "net.1", "net.2"]
    np.testing.assert_allclose(trace.series("fit", "", "loss")[1], np.mean([r["losses"] for r in ranks], axis=0),
                               rtol=1e-6)
    both = np.concatenate([ranks[0]["outputs"], ranks[1]["outputs"]], axis=1).astype(np.float64)  # step, row, unit
    np.testing.assert_allclose(trace.series("fit", "net.0", "mean")[1], both.reshape(3, -1).mean(axis=1),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(trace.series("fit", "net.0", "var")[1], both.reshape(3, -1).var(axis=1), rtol=1e-5)


def test_transformers_trainer_ddp_records_the_global_batch(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    trace, ranks = launch("transformers", tmp_path)
    assert trace.config("gpt2")["tracer"]["world_size"] == 2
    steps, loss = trace.series("gpt2", "", "loss")
    assert steps.tolist() == [0, 1, 2]
    np.testing.assert_allclose(loss, ranks[0]["losses"], rtol=1e-6)  # the Trainer's logged loss: global
    assert "transformer.h.0.mlp.c_fc" in trace.layers
