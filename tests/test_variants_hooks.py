"""BatchNorm inserted by module hooks (no torch.fx), bias-tolerant pairing, and `--only`.

Every test here failed with the torch.fx derivation: it could not trace Hugging Face models,
saw nn.TransformerEncoder as one opaque module, broke on layer names with quotes or newlines,
inlined modules not from torch.nn, refused bias=False before BatchNorm, and `--only nobn`
still derived the BN variant.
"""

from __future__ import annotations

import copy
import math
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typer.testing import CliRunner

import covshift
from covshift import modelfile, runner
from covshift.cli import app
from covshift.variants import (
    BatchNormLastDim,
    VariantError,
    derive_pair,
    derive_variant,
    share_weights,
    with_batchnorm,
)


def called_modules(model: nn.Module, *args, **kwargs) -> list[str]:
    """Names of the modules a forward calls, in call order (a module once per call)."""
    names: list[str] = []
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: names.append(n)) for n, m in model.named_modules()]
    try:
        model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return names


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}


def assert_same_original_calls(bn: nn.Module, nobn: nn.Module, *args, **kwargs) -> None:
    """The bn variant calls every module the nobn one calls, as often, plus only its `_bn`s."""
    torch.manual_seed(0)
    in_bn = called_modules(bn, *args, **kwargs)
    torch.manual_seed(0)
    in_nobn = called_modules(nobn, *args, **kwargs)
    assert [n for n in in_bn if not n.endswith("_bn")] == in_nobn
    assert sorted(n for n in in_bn if n.endswith("_bn")) == sorted(bn_layers(bn))


# -- Hugging Face GPT-2 -------------------------------------------------------------------


def test_gpt2_gets_batchnorm_on_its_mlp_c_fc_and_calls_every_module() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32,
                                        bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 64, (3, 8))
    bn, nobn = derive_pair(model, ids)
    found = bn_layers(bn)
    # Conv1D (a 2-D weight used in addmm) feeds NewGELUActivation (torch.tanh inside): both by behaviour
    assert set(found) == {"transformer.h.0.mlp.c_fc_bn", "transformer.h.1.mlp.c_fc_bn"}
    assert isinstance(bn.get_submodule("transformer.h.0.mlp.c_fc"), Conv1D)
    assert all(type(m) is BatchNormLastDim and m.num_features == 4 * 32 for m in found.values())
    names = [n for n, _ in bn.named_modules()]
    assert names[names.index("transformer.h.0.mlp.c_fc") + 1] == "transformer.h.0.mlp.c_fc_bn"
    assert_same_original_calls(bn, nobn, ids)
    before = found["transformer.h.0.mlp.c_fc_bn"].num_batches_tracked.item()
    bn.train()
    bn(ids).logits.sum().backward()
    assert found["transformer.h.0.mlp.c_fc_bn"].num_batches_tracked.item() == before + 1
    assert found["transformer.h.0.mlp.c_fc_bn"].weight.grad is not None


def test_last_dim_batchnorm_matches_an_independent_computation() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 5, 6) * 3 + 1
    got = BatchNormLastDim(6)(x)
    flat = x.reshape(-1, 6).double()
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    expected = ((flat - mean) / torch.sqrt(var + 1e-5)).reshape(4, 5, 6)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


# -- nn.TransformerEncoder -----------------------------------------------------------------


def test_transformer_encoder_gets_batchnorm_after_each_linear1() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False), nn.Linear(16, 3))
    x = torch.randn(4, 5, 16)
    bn, nobn = derive_pair(model, x)
    # linear1 -> F.relu (the layer's `activation` is the function) -> dropout -> linear2
    assert {n: m.num_features for n, m in bn_layers(bn).items()} == {
        "0.layers.0.linear1_bn": 32, "0.layers.1.linear1_bn": 32,
    }  # fmt: skip
    assert_same_original_calls(bn, nobn, x)
    # in eval mode without gradients the fused fast path would skip linear1; the hooks turn it off
    bn.eval()
    with torch.no_grad():
        assert "0.layers.0.linear1_bn" in called_modules(bn, x)


# -- custom (non-torch.nn) activation and norm classes ----------------------------------------


class GELU(nn.Module):
    """A GELU class outside torch.nn (timm/Hugging Face style)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


class ErfGELU(nn.Module):
    """The exact GELU written out with erf."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: LayerNorm over the channels of (N, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class Block(nn.Module):
    def __init__(self, c: int, act: nn.Module) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = LayerNorm2d(c)
        self.pw1 = nn.Conv2d(c, 4 * c, 1)
        self.act = act
        self.pw2 = nn.Conv2d(4 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw2(self.act(self.pw1(self.norm(self.dw(x)))))


class ConvNeXtish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), LayerNorm2d(8))
        self.blocks = nn.Sequential(Block(8, GELU()), Block(8, ErfGELU()))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def test_convnext_style_custom_classes_are_called_in_both_variants() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    bn, nobn = derive_pair(ConvNeXtish(), x)
    assert {n: type(m).__name__ for n, m in bn_layers(bn).items()} == {
        "blocks.0.pw1_bn": "BatchNorm2d", "blocks.1.pw1_bn": "BatchNorm2d",
    }  # fmt: skip
    assert_same_original_calls(bn, nobn, x)
    assert type(bn.get_submodule("blocks.1.act")) is ErfGELU


class Scale(nn.Module):
    """Parameter-free and shape-keeping, but linear: not an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * x


def test_a_linear_custom_module_is_not_a_nonlinearity() -> None:
    model = nn.Sequential(nn.Linear(4, 8), Scale(), nn.Linear(8, 2))
    with pytest.raises(VariantError, match="nothing to normalize"):
        with_batchnorm(model, torch.randn(3, 4))


# -- names, containers, hooks, copies ---------------------------------------------------------


def test_layer_names_with_quotes_and_newlines() -> None:
    name = 'fc "a"\n\'1\''
    model = nn.Sequential()
    model.add_module(name, nn.Linear(4, 8))
    model.add_module("act", nn.ReLU())
    model.add_module("out", nn.Linear(8, 2))
    x = torch.randn(3, 4)
    bn, nobn = derive_pair(model, x)
    assert [n for n, _ in bn.named_modules()] == ["", name, name + "_bn", "act", "out"]
    assert len(bn) == 3  # the Sequential runs its own three steps, not the BatchNorm as a fourth
    assert_same_original_calls(bn, nobn, x)


def test_every_batchnorm_runs_once_per_forward_in_containers() -> None:
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Linear(5, 5), nn.Linear(5, 5)])

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = blocks
            self.heads = nn.ModuleDict({"a": nn.Linear(5, 2)})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.blocks:
                x = torch.tanh(layer(x))
            return sum(h(x) for h in self.heads.values())

    bn = with_batchnorm(Net(), torch.randn(4, 5))
    assert set(bn_layers(bn)) == {"blocks.0_bn", "blocks.1_bn"}
    assert len(bn.blocks) == 2 and [type(m) for m in bn.blocks] == [nn.Linear, nn.Linear]
    assert type(bn.blocks).__name__ == "ModuleList" and isinstance(bn.blocks, nn.ModuleList)
    bn.train()
    bn(torch.randn(4, 5))
    assert [m.num_batches_tracked.item() for m in bn_layers(bn).values()] == [1, 1]


def test_hooks_on_the_layer_see_its_own_output_and_copies_use_their_own_batchnorm() -> None:
    torch.manual_seed(0)
    bn = with_batchnorm(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4))
    seen = {}
    bn[0].register_forward_hook(lambda m, i, o: seen.__setitem__("layer", o))
    bn.get_submodule("0_bn").register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o))
    x = torch.randn(6, 4)
    out = bn(x)
    torch.testing.assert_close(seen["layer"], F.linear(x, bn[0].weight, bn[0].bias), rtol=0, atol=0)
    mean = seen["bn"].mean(0)
    torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, bn[2](F.relu(seen["bn"])), rtol=0, atol=0)
    twin = copy.deepcopy(bn)
    twin(x)
    assert twin.get_submodule("0_bn").num_batches_tracked.item() == 2
    assert bn.get_submodule("0_bn").num_batches_tracked.item() == 1  # not 2: the copy's hook is the copy's


# -- pairing -------------------------------------------------------------------------------


def build_model(batchnorm: bool) -> nn.Sequential:
    norm = [nn.BatchNorm1d(8)] if batchnorm else []
    return nn.Sequential(nn.Linear(4, 8, bias=not batchnorm), *norm, nn.ReLU(), nn.Linear(8, 2))


def test_share_weights_tolerates_a_missing_bias() -> None:
    for source, target in [(build_model(False), build_model(True)), (build_model(True), build_model(False))]:
        target_bias = target[0].bias.detach().clone() if target[0].bias is not None else None
        pairs = share_weights(source, target)
        assert [t for _, t in pairs] == (["0", "3"] if isinstance(target[1], nn.BatchNorm1d) else ["0", "2"])
        assert torch.equal(source[0].weight, target[0].weight)
        assert torch.equal(source[-1].weight, target[-1].weight) and torch.equal(source[-1].bias, target[-1].bias)
        if target_bias is not None:  # the bias only the target has is left as it was
            assert torch.equal(target[0].bias, target_bias)


def test_share_weights_still_refuses_other_differences() -> None:
    wider = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 2))
    with pytest.raises(VariantError, match="layer 0 differs"):
        share_weights(build_model(False), wider)


class Backwards(nn.Module):
    """Registers its head before its body but calls the body first."""

    def __init__(self, batchnorm: bool) -> None:
        super().__init__()
        if batchnorm:
            self.head = nn.Linear(8, 2)
            self.body = nn.Linear(4, 8, bias=False)
            self.norm = nn.BatchNorm1d(8)
        else:
            self.body = nn.Linear(4, 8)
            self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        return self.head(torch.relu(self.norm(x) if hasattr(self, "norm") else x))


def test_share_weights_pairs_in_forward_order_given_a_batch() -> None:
    source, target = Backwards(False), Backwards(True)
    with pytest.raises(VariantError):  # registration order pairs body with head
        share_weights(source, copy.deepcopy(target))
    assert share_weights(source, target, (torch.randn(3, 4),)) == [("body", "body"), ("head", "head")]
    assert torch.equal(source.body.weight, target.body.weight)
    assert torch.equal(source.head.weight, target.head.weight)


# -- building only what is trained --------------------------------------------------------------


NO_PLACE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


def build_model():
    return nn.Sequential(nn.Linear(4, 3))  # no hidden layer: BatchNorm has no place


def data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g)
    return TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])
'''


def test_only_nobn_builds_no_bn_variant(tmp_path: Path) -> None:
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent(NO_PLACE))
    mf = modelfile.load(str(path))
    x = torch.randn(5, 4)
    assert set(runner.build_pair(mf, x, 0, only="nobn")) == {"nobn"}
    with pytest.raises(VariantError, match="nothing to normalize"):
        runner.build_pair(mf, x, 0, only="bn")
    with pytest.raises(VariantError):
        derive_variant(nn.Sequential(nn.Linear(4, 3)), x, "bn")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["trace", str(path), "--only", "nobn", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert covshift.load(out / "trace.covshift").runs == ["nobn"]
