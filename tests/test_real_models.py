"""`covshift trace` and the Tracer end to end on the architectures people train: Hugging Face
GPT-2 (the shipped example), BERT and ViT from tiny configs, a ConvNeXt-style network of custom
GELU and LayerNorm2d classes, and `nn.TransformerEncoder`.

With the torch.fx derivation none of the transformers models could be traced by the CLI, the
TransformerEncoder was refused, and the ConvNeXt-style bn run silently skipped the custom
classes. Each case here checks that both runs call the same original modules (the bn run
adds only its BatchNorm layers) in the trace and in an independent forward.
"""

from __future__ import annotations

import contextlib
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import covshift
from covshift import modelfile, runner
from covshift.batches import to_device
from covshift.cli import app
from test_variants_hooks import assert_same_original_calls

ROOT = Path(__file__).resolve().parents[1]

BERT = '''
import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification

config = {"steps": 2, "lr": 1e-3, "batch_size": 8, "optimizer": "adam"}


def build_model():
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


class Tokens(Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(50, (n, 12), generator=g)
        self.labels = self.ids[:, 0] % 3

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long),
                "labels": self.labels[i]}


def data():
    return Tokens(32, 0), Tokens(16, 1)
'''

VIT = '''
import torch
from torch.utils.data import TensorDataset
from transformers import ViTConfig, ViTForImageClassification

config = {"steps": 2, "lr": 1e-3, "batch_size": 8, "optimizer": "adam"}


def build_model():
    return ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, 16, 16, generator=g)
    y = torch.randint(4, (48,), generator=g)
    return TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])
'''

CONVNEXT = '''
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

config = {"steps": 2, "lr": 0.05, "batch_size": 8}


class ErfGELU(nn.Module):
    def forward(self, x):
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = LayerNorm2d(c)
        self.pw1 = nn.Conv2d(c, 4 * c, 1)
        self.act = ErfGELU()
        self.pw2 = nn.Conv2d(4 * c, c, 1)

    def forward(self, x):
        return x + self.pw2(self.act(self.pw1(self.norm(self.dw(x)))))


def build_model():
    return nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), LayerNorm2d(8), Block(8), Block(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, 8, 8, generator=g), torch.randint(5, (48,), generator=g)
    return TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])
'''

ENCODER = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

config = {"steps": 2, "lr": 0.01, "batch_size": 8}


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def build_model():
    return Classifier()


def data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 6, 16, generator=g), torch.randint(3, (48,), generator=g)
    return TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])
'''

TRANSFORMERS = {"bert": BERT, "vit": VIT}
CASES = {"gpt2": None, "bert": BERT, "vit": VIT, "convnext": CONVNEXT, "encoder": ENCODER}
# where the bn run puts its BatchNorm: after each Linear/Conv that feeds a nonlinearity
EXPECTED_BN = {
    "gpt2": {f"transformer.h.{i}.mlp.c_fc_bn" for i in range(4)},
    # transformers 4.x names ViT's as BERT's; 5.x names them vit.layers.<i>.mlp.fc1
    "bert": {f"bert.encoder.layer.{i}.intermediate.dense_bn" for i in range(2)} | {"bert.pooler.dense_bn"},
    "vit": ({f"vit.encoder.layer.{i}.intermediate.dense_bn" for i in range(2)},
            {f"vit.layers.{i}.mlp.fc1_bn" for i in range(2)}),
    "convnext": {"2.pw1_bn", "3.pw1_bn"},
    "encoder": {f"encoder.layers.{i}.linear1_bn" for i in range(2)},
}


def model_file(tmp_path: Path, name: str) -> Path:
    if CASES[name] is None:
        return ROOT / "examples" / f"{name}.py"
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(CASES[name]))
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_covshift_trace_runs_both_variants_on_the_same_original_modules(tmp_path, name):
    if name in ("gpt2", "bert", "vit"):
        pytest.importorskip("transformers")
    path = model_file(tmp_path, name)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["trace", str(path), "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    with covshift.load(out / "trace.covshift") as trace:
        assert trace.runs == ["bn", "nobn"]
        info = trace.layer_info()
        losses = trace.scalars(layer="", metric="loss")
    layers = {run: dict(zip(part["layer"], part["type"])) for run, part in info.groupby("run")}
    extra = set(layers["bn"]) - set(layers["nobn"])
    expected = EXPECTED_BN[name]
    assert extra in expected if isinstance(expected, tuple) else extra == expected
    assert all(layers["bn"][n].startswith("BatchNorm") for n in extra)
    assert {n: t for n, t in layers["bn"].items() if n not in extra} == layers["nobn"]
    assert losses.groupby("run").size().to_dict() == {"bn": 2, "nobn": 2}
    assert torch.isfinite(torch.tensor(losses["value"].to_numpy())).all()

    # an independent forward of the variants the CLI builds: the same modules, as often, in order
    mf = modelfile.load(str(path))
    train = mf.datasets()[0]
    batch = to_device(next(iter(runner.loader(train, 8, 0))), torch.device("cpu"))
    pair = runner.build_pair(mf, batch.inputs, seed=0)
    inputs = runner.forward_input(batch.inputs)
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else (inputs, {})
    for model in pair.values():
        model.eval()
    assert_same_original_calls(pair["bn"], pair["nobn"], *args, **kwargs)


def transformers_model(name: str, tmp_path: Path) -> tuple[nn.Module, object]:
    mf = modelfile.load(str(model_file(tmp_path, name)))
    torch.manual_seed(0)
    return mf.build(), mf.datasets()[0]


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_tracer_in_a_plain_loop_records_without_changing_training(tmp_path, name):
    """The Tracer on BERT and ViT: losses and final weights bitwise equal to an untraced run;
    Hugging Face's GELU is a nonlinearity, every attention block's output is recorded."""
    pytest.importorskip("transformers")
    from torch.utils.data import DataLoader

    def train(traced: bool) -> tuple[list[float], dict[str, torch.Tensor], nn.Module]:
        model, data = transformers_model(name, tmp_path)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses = []
        with contextlib.ExitStack() as stack:
            tracer = (stack.enter_context(covshift.Tracer(model, tmp_path / f"{name}.covshift", optimizer=opt))
                      if traced else None)
            for raw in DataLoader(data, batch_size=8):
                batch = to_device(raw, torch.device("cpu"))
                out = batch.forward(model)
                loss = out.loss if out.loss is not None else nn.functional.cross_entropy(out.logits, batch.target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if tracer is not None:
                    tracer.step(loss)
        return losses, {k: v.clone() for k, v in model.state_dict().items()}, model

    plain, traced = train(False), train(True)
    assert plain[0] == traced[0]
    assert all(torch.equal(plain[1][k], traced[1][k]) for k in plain[1])
    with covshift.load(tmp_path / f"{name}.covshift") as trace:
        info = trace.layer_info().set_index("layer")
        steps = trace.scalars(metric="mean")["step"].nunique()
    model = traced[2]
    gelus = [n for n, m in model.named_modules() if type(m).__name__.endswith("GELUActivation")]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(gelus) == 2 and info.loc[gelus, "nonlinearity"].tolist() == ["gelu", "gelu"]
    assert set(linears) <= set(info.index)  # attention projections included
    assert steps == 4
