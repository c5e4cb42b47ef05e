"""`covshift trace` on models whose outputs are not a plain tensor (dicts, dataclasses, tuples,
Hugging Face ``ModelOutput``s) and on dict batches (Hugging Face style): the rule of
:mod:`covshift.outputs` and :mod:`covshift.batches`.

Every test writes a tiny model file into tmp_path and runs the CLI. With ``--lr 1e-30``
(covshift refuses 0) the updates vanish below float32 resolution and the weights stay at
their initial values, so the recorded validation numbers are recomputed
here, with torch and numpy, from the model the file builds under the same seed.
"""

from __future__ import annotations

import importlib.util
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import covshift
from covshift.cli import app

runner = CliRunner(env={"COLUMNS": "200"})

DATA = '''
import dataclasses
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import TensorDataset

config = {"batch_size": 16}


def make_data():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(96, 4, generator=g)
    y = torch.randint(0, 3, (96,), generator=g)
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


def data():
    return make_data()


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    hidden: torch.Tensor


class Pair(NamedTuple):
    hidden: torch.Tensor
    logits: torch.Tensor


class Net(nn.Module):
    """Linear(4, 8) [BatchNorm1d] Tanh Linear(8, 3), returning its logits as KIND."""

    def __init__(self, batchnorm):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), *([nn.BatchNorm1d(8)] if batchnorm else []), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        hidden = self.body(x)
        logits = self.head(hidden)
        return %s


def build_model(batchnorm):
    return Net(batchnorm)
'''
KINDS = {
    "tensor": "logits",
    "dict": '{"logits": logits, "hidden": hidden}',
    "dataclass": "Out(logits, hidden)",
    "tuple": "(logits, hidden)",
    "namedtuple": "Pair(hidden, logits)",  # a named tuple's `logits` comes before its first tensor
}


def write(tmp_path: Path, text: str, name: str = "net.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def trace(tmp_path: Path, model_file: Path, *args: object, out: str = "o"):
    result = runner.invoke(app, ["trace", str(model_file), "--out", str(tmp_path / out), *map(str, args)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / out / "report.md").is_file()
    return covshift.load(tmp_path / out / "trace.covshift")


def last_metrics(opened, run: str) -> dict[str, float]:
    frame = opened.scalars(run=run, layer="")
    return frame[frame["step"] == frame["step"].max()].set_index("metric")["value"].to_dict()


def import_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"outputs_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def se(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


@pytest.mark.parametrize("kind", ["dict", "dataclass", "tuple", "namedtuple"])
def test_structured_outputs_train_exactly_as_the_tensor(tmp_path, kind):
    """The loss is cross-entropy of the logits: every recorded value equals the run of the
    same model returning its logits as a plain tensor."""
    with trace(tmp_path, write(tmp_path, DATA % KINDS[kind]), "--steps", 6, "--eval-every", 3) as got, \
            trace(tmp_path, write(tmp_path, DATA % KINDS["tensor"], "plain.py"), "--steps", 6, "--eval-every", 3,
                  out="plain") as plain:
        assert set(got.runs) == {"bn", "nobn"}
        for run in ("bn", "nobn"):
            mine, theirs = got.scalars(run=run), plain.scalars(run=run)
            assert {"loss", "val_loss", "val_accuracy", "val_loss_se"} <= set(mine["metric"])
            assert mine["metric"].tolist() == theirs["metric"].tolist()
            np.testing.assert_array_equal(mine["value"].to_numpy(), theirs["value"].to_numpy())  # NaN == NaN


@pytest.mark.parametrize("kind", ["dict", "dataclass", "tuple"])
def test_structured_outputs_recorded_metrics_are_the_models(tmp_path, kind):
    path = write(tmp_path, DATA % KINDS[kind])
    with trace(tmp_path, path, "--steps", 2, "--lr", 1e-30, "--only", "nobn") as opened:
        last = last_metrics(opened, "nobn")
    module = import_file(path)
    torch.manual_seed(0)  # covshift seeds before building each variant
    model = module.build_model(False).eval()
    _, val = module.make_data()
    x, y = val.tensors
    with torch.no_grad():
        logits = model.head(model.body(x)).double()
    per_example = -torch.log_softmax(logits, 1).gather(1, y[:, None])[:, 0].numpy()
    assert last["val_loss"] == pytest.approx(per_example.mean(), rel=1e-5)
    assert last["val_loss_se"] == pytest.approx(se(per_example), rel=1e-4)
    assert last["val_accuracy"] == float((logits.argmax(1) == y).double().mean())


def test_a_user_loss_fn_gets_the_structured_output(tmp_path):
    """The case of issue 10: a dict output with a working loss_fn failed at the first validation."""
    body = DATA % KINDS["dict"] + '''

def loss_fn(output, target):
    return 2 * nn.functional.cross_entropy(output["logits"], target)
'''
    path = write(tmp_path, body)
    with trace(tmp_path, path, "--steps", 2, "--lr", 1e-30, "--only", "nobn") as opened:
        last = last_metrics(opened, "nobn")
    module = import_file(path)
    torch.manual_seed(0)
    model = module.build_model(False).eval()
    x, y = module.make_data()[1].tensors
    with torch.no_grad():
        logits = model.head(model.body(x))
    assert last["val_loss"] == pytest.approx(2 * float(nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert last["val_accuracy"] == float((logits.argmax(1) == y).double().mean())
    assert "val_loss_se" not in last  # loss_fn takes no reduction and does not run example by example


def test_an_output_without_loss_or_logits_asks_for_loss_fn(tmp_path):
    path = write(tmp_path, DATA % '{"hidden": logits}')
    result = runner.invoke(app, ["trace", str(path), "--steps", 2, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("error:"))
    assert "loss_fn(output, target)" in line and "logits" in line and "dict(hidden=(16, 3))" in line


TOKENS = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

config = {"batch_size": 8}
VOCAB, CLASSES, LENGTH = 12, 5, 6


def make_data():
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(0, VOCAB, (40, LENGTH), generator=g)
    tags = torch.randint(0, CLASSES, (40, LENGTH), generator=g)
    tags[torch.rand(40, LENGTH, generator=g) < 0.3] = -100  # padding: counts in neither loss nor accuracy
    return TensorDataset(ids[:24], tags[:24]), TensorDataset(ids[24:], tags[24:])


def data():
    return make_data()


def build_model(batchnorm):  # (N, T) ids -> (N, T, classes) scores: a tagger
    return nn.Sequential(nn.Embedding(VOCAB, 8), nn.Tanh(), nn.Linear(8, CLASSES))
'''


def test_per_token_scores_ignore_minus_100(tmp_path):
    path = write(tmp_path, TOKENS)
    with trace(tmp_path, path, "--steps", 2, "--lr", 1e-30, "--only", "nobn") as opened:
        last = last_metrics(opened, "nobn")
        chance = opened.config("nobn")["chance_accuracy"]
    module = import_file(path)
    torch.manual_seed(0)
    model = module.build_model(False).eval()
    ids, tags = module.make_data()[1].tensors
    with torch.no_grad():
        scores = model(ids).double()
    counted = (tags != -100).numpy()
    target = tags.numpy()
    log_p = torch.log_softmax(scores, -1).numpy()
    rows, cols = np.nonzero(counted)
    token_loss = -log_p[rows, cols, target[rows, cols]]
    batch_losses = []  # the recorded loss is the mean over batches of 8 of each batch's mean counted-token loss
    for start in range(0, 16, 8):
        inside = (rows >= start) & (rows < start + 8)
        batch_losses.append(token_loss[inside].mean())
    assert last["val_loss"] == pytest.approx(np.mean(batch_losses), rel=1e-5)
    hits = scores.argmax(-1).numpy() == target
    assert last["val_accuracy"] == hits[counted].mean()
    assert 0.5 < counted.mean() < 0.9 and hits[~counted].sum() == 0  # -100 is never a hit, so ignoring matters
    assert chance == np.bincount(target[counted]).max() / counted.sum()
    # examples have different numbers of counted tokens: their mean loss is not the batch loss
    assert "val_loss_se" not in last


GPT2 = '''
import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

config = {"batch_size": 8}


class Texts(Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_data():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 32, (40, 8), generator=g)
    return Texts(ids[:24]), Texts(ids[24:])


def data():
    return make_data()


def build_model(batchnorm):  # the same model for both runs: BN insertion is not under test here
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16))
'''


def test_hugging_face_model_with_dict_batches(tmp_path):
    """GPT-2's own loss (labels shifted by one inside the model) is the loss; accuracy and the
    per-example losses are taken at the same shifted positions."""
    pytest.importorskip("transformers")
    path = write(tmp_path, GPT2)
    with trace(tmp_path, path, "--steps", 2, "--lr", 1e-30, "--only", "nobn") as opened:
        last = last_metrics(opened, "nobn")
        losses = opened.scalars(run="nobn", layer="", metric="loss")["value"].tolist()
    module = import_file(path)
    torch.manual_seed(0)
    model = module.build_model(False).eval()
    val = module.make_data()[1]
    with torch.no_grad():
        logits = model(input_ids=val.ids).logits.double()
    nxt = val.ids[:, 1:]
    log_p = torch.log_softmax(logits[:, :-1], -1)
    per_example = (-log_p.gather(2, nxt[..., None])[..., 0]).mean(1).numpy()  # 7 predicted tokens each
    assert last["val_loss"] == pytest.approx(per_example.mean(), rel=1e-5)
    assert last["val_loss_se"] == pytest.approx(se(per_example), rel=1e-4)
    assert last["val_accuracy"] == float((logits[:, :-1].argmax(-1) == nxt).double().mean())
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_two_identical_dict_batch_runs_record_the_same_values(tmp_path):
    pytest.importorskip("transformers")
    path = write(tmp_path, GPT2)
    with trace(tmp_path, path, "--steps", 3, "--only", "nobn", out="a") as a, \
            trace(tmp_path, path, "--steps", 3, "--only", "nobn", out="b") as b:
        np.testing.assert_array_equal(a.scalars(run="nobn")["value"].to_numpy(), b.scalars(run="nobn")["value"].to_numpy())
        assert a.scalars(run="nobn", layer="", metric="loss")["value"].nunique() == 3  # it trains


DICT_BATCHES = DATA % "logits" + '''

class Examples(torch.utils.data.Dataset):
    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        x, y = self.pairs[i]
        return {"x": x, "labels": y}


class OwnLoss(nn.Module):
    """Net, called as model(x=..., labels=...), returning its own loss as Hugging Face models do."""

    def __init__(self, batchnorm):
        super().__init__()
        self.net = Net(batchnorm)

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def data():
    train, val = make_data()
    return Examples(train), Examples(val)


def build_model(batchnorm):
    return OwnLoss(batchnorm)
'''


def test_dict_batches_and_the_models_own_loss_train_exactly_as_pairs(tmp_path):
    """Dict batches, the model called with keyword arguments and its own loss, ICS included
    (measured with the same keyword call): every recorded value equals the (x, y) run of the
    same network returning a tensor."""
    options = ("--steps", 4, "--eval-every", 2, "--ics-every", 2)
    with trace(tmp_path, write(tmp_path, DICT_BATCHES), *options) as got, \
            trace(tmp_path, write(tmp_path, DATA % KINDS["tensor"], "plain.py"), *options, out="plain") as plain:
        for run in ("bn", "nobn"):
            mine, theirs = got.scalars(run=run), plain.scalars(run=run)
            assert {"ics_l2", "loss_variation", "val_accuracy", "val_loss_se"} <= set(mine["metric"])
            assert [name.removeprefix("net.") for name in mine["layer"]] == theirs["layer"].tolist()
            assert mine["metric"].tolist() == theirs["metric"].tolist()
            np.testing.assert_array_equal(mine["value"].to_numpy(), theirs["value"].to_numpy())


def test_a_models_own_loss_that_is_not_cross_entropy_of_its_logits_gives_no_accuracy():
    """With the model's own loss, the logits are compared with the labels only in a layout
    whose cross-entropy is that loss; a loss that is something else gives neither accuracy
    nor per-example losses (positive case: the plain cross-entropy gives both)."""
    from covshift.outputs import Criterion

    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(10, 6, 4, generator=g), torch.randint(0, 4, (10, 6), generator=g)
    ce = nn.functional.cross_entropy(logits.reshape(-1, 4), labels.reshape(-1))
    other = Criterion().score({"loss": ce + 0.5, "logits": logits}, labels)
    assert other.loss == pytest.approx(float(ce) + 0.5) and other.targets is None and other.examples is None
    same = Criterion().score({"loss": ce, "logits": logits}, labels)
    assert same.targets is not None and len(same.targets) == 60
    hits = (logits.argmax(-1) == labels).numpy()
    assert float((same.predicted == same.targets).double().mean()) == hits.mean()
    log_p = torch.log_softmax(logits.double(), -1).numpy()
    per_example = -np.take_along_axis(log_p, labels.numpy()[..., None], -1)[..., 0].mean(1)
    np.testing.assert_allclose(same.examples.numpy(), per_example, rtol=1e-5)


def test_float_targets_give_no_accuracy_and_per_example_soft_cross_entropy():
    from covshift.outputs import Criterion

    g = torch.Generator().manual_seed(4)
    logits, soft = torch.randn(8, 3, generator=g), torch.softmax(torch.randn(8, 3, generator=g), 1)
    scored = Criterion().score({"logits": logits}, soft)
    per_example = -(soft.double() * torch.log_softmax(logits.double(), 1)).sum(1).numpy()
    assert scored.targets is None and scored.loss == pytest.approx(per_example.mean(), rel=1e-5)
    np.testing.assert_allclose(scored.examples.numpy(), per_example, rtol=1e-5)
