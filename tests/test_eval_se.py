"""The standard error of the mean evaluation loss that covshift.runner records (``val_loss_se``,
``train_eval_loss_se``): numpy's std (ddof 1) of the per-example losses over √n, computed here
on the same model and data, for the default loss, a loss module, a user function without a
``reduction`` keyword, and nothing for a loss that is not a mean over examples."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import covshift
from covshift import modelfile, runner
from covshift.runner import Settings

MODEL = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

config = {"batch_size": 16}


def build_model():  # Dropout: a train-mode pass would give other losses
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))


def data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(100, 4, generator=g)
    y = %s
    return TensorDataset(x[:60], y[:60]), TensorDataset(x[60:], y[60:])
'''
CLASSES = "torch.randint(0, 3, (100,), generator=g)"
TARGETS = "torch.randn(100, 3, generator=g)"


def train(tmp_path, targets: str, loss: str = ""):
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent(MODEL % targets) + loss)
    mf = modelfile.load(str(path))
    train_set, val = mf.datasets()
    torch.manual_seed(0)
    model = mf.build()
    trace = tmp_path / "t.covshift"
    runner.train_run(mf, model, "nobn", train_set, val, Settings.resolve(mf.config, {"epochs": 1}), trace)
    with covshift.load(trace) as opened:
        frame = opened.scalars(run="nobn", layer="")
    last = frame[frame["step"] == frame["step"].max()].set_index("metric")["value"]
    return model.eval(), train_set, val, last


def se(per_example: torch.Tensor) -> float:
    values = per_example.double().numpy()
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


@pytest.mark.parametrize("loss", ["", "\nloss_fn = nn.CrossEntropyLoss()\n"])
def test_default_and_module_losses(tmp_path, loss):
    model, train_set, val, last = train(tmp_path, CLASSES, loss)
    with torch.no_grad():
        on_val = nn.functional.cross_entropy(model(val.tensors[0]), val.tensors[1], reduction="none")
        on_train = nn.functional.cross_entropy(model(train_set.tensors[0][:40]), train_set.tensors[1][:40],
                                               reduction="none")
    assert last["val_loss_se"] == pytest.approx(se(on_val), rel=1e-5)
    assert last["train_eval_loss_se"] == pytest.approx(se(on_train), rel=1e-5)
    assert last["val_loss"] == pytest.approx(float(on_val.mean()), rel=1e-5)


def test_a_user_function_is_applied_example_by_example(tmp_path):
    """loss_fn(output, target) with no reduction keyword: an example's loss is its mean squared error."""
    loss = "\n\ndef loss_fn(output, target):\n    return ((output - target) ** 2).mean()\n"
    model, _, val, last = train(tmp_path, TARGETS, loss)
    with torch.no_grad():
        per_example = ((model(val.tensors[0]) - val.tensors[1]) ** 2).mean(1)
    assert last["val_loss_se"] == pytest.approx(se(per_example), rel=1e-5)


def test_a_loss_that_is_not_a_mean_over_examples_records_no_standard_error(tmp_path):
    loss = ("\n\ndef loss_fn(output, target):\n"
            "    return nn.functional.cross_entropy(output, target, reduction='sum') / 10\n")
    _, _, _, last = train(tmp_path, CLASSES, loss)
    assert "val_loss" in last and "val_loss_se" not in last and "train_eval_loss_se" not in last
