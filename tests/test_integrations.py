"""Tests of the Lightning and Hugging Face Trainer callbacks, each on one tiny real training.

The reference for a layer's recorded ``mean`` is our own forward hook on the same module
during the same training, reduced in numpy float64; losses and evaluation metrics are
compared with the values the training code and the library report.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import covshift


def capture(module: nn.Module, probing: dict[str, bool]) -> list[tuple[bool, np.ndarray]]:
    """Every output of ``module`` as float64, with whether it was a training forward (train
    mode, gradients enabled, not a probe)."""
    seen: list[tuple[bool, np.ndarray]] = []

    def hook(mod, args, out):
        training = mod.training and torch.is_grad_enabled() and not probing["on"]
        seen.append((training, out.detach().double().numpy().copy()))

    module.register_forward_hook(hook)
    return seen


def frame(path, run, metric, layer=""):
    with covshift.load(path) as trace:
        rows = trace.scalars(run=run, layer=layer, metric=metric)
        steps = trace.config(run)["steps"]
    return rows.sort_values("step").set_index("step")["value"], steps


def analyse_and_report(path, out_dir):
    analysis = covshift.analyze(path)
    assert analysis is not None
    written = covshift.report(path, out_dir, formats=("md",))
    assert written and all(p.exists() for p in written.values())


def test_import_covshift_imports_neither_library():
    code = "import sys, covshift; print(sorted({'lightning', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module, extra", [("lightning", "lightning"), ("transformers", "transformers")])
def test_missing_library_names_the_extra(monkeypatch, module, extra):
    for name in [n for n in sys.modules if n == module or n.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    monkeypatch.delitem(sys.modules, f"covshift.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=rf'pip install "covshift\[{extra}\]"'):
        __import__(f"covshift.integrations.{module}")


# ---------------------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------------------
def lightning_fit(tmp_path, accumulate: int, fail_at: int | None = None):
    L = pytest.importorskip("lightning.pytorch")
    from covshift.integrations.lightning import CovshiftCallback

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            self.losses: list[float] = []
            self.val_losses: list[list[float]] = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            if len(self.losses) == fail_at:
                raise RuntimeError("boom")
            x, y = batch
            loss = F.mse_loss(self(x), y)
            self.losses.append(loss.item())
            self.log("train_loss", loss)  # in callback_metrics too, but not set by validation
            return loss

        def on_validation_epoch_start(self):
            self.val_losses.append([])

        def validation_step(self, batch, batch_idx):
            x, y = batch
            with torch.enable_grad():  # a gradient-enabled forward: only the pause keeps it out
                loss = F.mse_loss(self(x), y)
            self.val_losses[-1].append(loss.item())
            self.log("val_loss", loss)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    x, y = torch.randn(12, 4), torch.randn(12, 1)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:8], y[:8]), batch_size=2)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[8:], y[8:]), batch_size=2)
    model = Tiny()
    seen = capture(model.net[0], {"on": False})
    path = tmp_path / "fit.covshift"
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                        accumulate_grad_batches=accumulate,
                        callbacks=[CovshiftCallback(path, run="fit", detail_every=2)])
    trainer.fit(model, train, val)
    return path, model, seen


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_one_trace_step_per_optimizer_step(tmp_path, accumulate):
    path, model, seen = lightning_fit(tmp_path, accumulate)
    training = [out for is_training, out in seen if is_training]
    assert len(training) == 4 * accumulate == len(model.losses)

    loss, steps = frame(path, "fit", "loss")
    assert steps == 4 and list(loss.index) == [0, 1, 2, 3]
    windows = [model.losses[k * accumulate:(k + 1) * accumulate] for k in range(4)]
    np.testing.assert_allclose(loss.to_numpy(), [np.mean(w) for w in windows], rtol=1e-6)

    mean, _ = frame(path, "fit", "mean", layer="net.0")
    expected = [np.concatenate(training[k * accumulate:(k + 1) * accumulate]).mean() for k in range(4)]
    np.testing.assert_allclose(mean.to_numpy(), expected, rtol=1e-5, atol=1e-7)

    lr, _ = frame(path, "fit", "lr")
    np.testing.assert_allclose(lr.to_numpy(), 0.1)

    # the sanity check's validation is neither recorded nor logged; each fit validation is
    # logged at the last step before it (one per epoch: 4 batches of 2 samples)
    val_loss, _ = frame(path, "fit", "val_loss")
    runs = model.val_losses[1:]  # [0] is the sanity check
    assert list(val_loss.index) == [4 // accumulate * (i + 1) - 1 for i in range(len(runs))]
    np.testing.assert_allclose(val_loss.to_numpy(), [np.mean(r) for r in runs], rtol=1e-6)
    with covshift.load(path) as trace:
        assert "train_loss" not in set(trace.scalars(run="fit")["metric"])
    if accumulate == 2:
        analyse_and_report(path, tmp_path / "report")


def test_lightning_exception_closes_the_trace(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        lightning_fit(tmp_path, accumulate=1, fail_at=2)
    loss, steps = frame(tmp_path / "fit.covshift", "fit", "loss")
    assert steps == 2 and list(loss.index) == [0, 1]


# ---------------------------------------------------------------------------------------
# Hugging Face Trainer
# ---------------------------------------------------------------------------------------
def test_transformers_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from covshift.integrations.transformers import CovshiftCallback

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 32, (12, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    probing = {"on": False}
    seen = capture(model.transformer.h[0].mlp.c_fc, probing)

    class Probe(transformers.TrainerCallback):
        """A gradient-enabled train-mode forward between steps, where the Trainer logs."""

        def on_log(self, args, state, control, model=None, **kwargs):
            if callback.tracer is not None:  # given the torch optimizer, not accelerate's wrapper
                assert type(callback.tracer.optimizer) is torch.optim.AdamW
            probing["on"] = True
            model.train()
            model(input_ids=ids[:2], labels=ids[:2])
            probing["on"] = False

    path = tmp_path / "hf.covshift"
    callback = CovshiftCallback(path, run="gpt2", detail_every=2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", eval_strategy="steps", eval_steps=2,
        per_device_eval_batch_size=2, learning_rate=1e-2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data[:8], eval_dataset=data[8:],
                                   callbacks=[callback, Probe()])
    trainer.train()

    history = trainer.state.log_history
    logged = {h["step"] - 1: h["loss"] for h in history if "loss" in h}
    loss, steps = frame(path, "gpt2", "loss")
    assert steps == 4 and list(loss.index) == [0, 1, 2, 3] == sorted(logged)
    np.testing.assert_allclose(loss.to_numpy(), [logged[s] for s in range(4)], rtol=1e-6)

    lr, _ = frame(path, "gpt2", "lr")  # the rate each step used, as the Trainer logs it
    np.testing.assert_allclose(lr.to_numpy(), [h["learning_rate"] for h in history if "loss" in h], rtol=1e-6)

    evaluations = {h["step"] - 1: h["eval_loss"] for h in history if "eval_loss" in h}
    val_loss, _ = frame(path, "gpt2", "val_loss")
    assert list(val_loss.index) == sorted(evaluations) == [1, 3]
    np.testing.assert_allclose(val_loss.to_numpy(), [evaluations[s] for s in (1, 3)], rtol=1e-6)
    with covshift.load(path) as trace:
        assert not {"eval_runtime", "val_runtime", "epoch"} & set(trace.scalars(run="gpt2", layer="")["metric"])

    # evaluation and probe forwards happened but only the training forwards are recorded
    training = [out for is_training, out in seen if is_training]
    assert len(training) == 4 and len(seen) > 4 + 2
    mean, _ = frame(path, "gpt2", "mean", layer="transformer.h.0.mlp.c_fc")
    np.testing.assert_allclose(mean.to_numpy(), [out.mean() for out in training], rtol=1e-5, atol=1e-7)

    with covshift.load(path) as trace:  # gradients were still there when the step ended
        assert trace.scalars(run="gpt2", layer="", metric="grad_norm")["step"].tolist() == [0, 1, 2, 3]
    analyse_and_report(path, tmp_path / "report")
