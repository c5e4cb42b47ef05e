"""Tests for covshift.variants: deriving BatchNorm / no-BatchNorm variants of a model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from covshift.variants import (
    VariantError,
    derive_pair,
    has_batchnorm,
    share_weights,
    with_batchnorm,
    without_batchnorm,
)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Sigmoid(),
        nn.Linear(16, 12), nn.Sigmoid(),
        nn.Linear(12, 10), nn.Sigmoid(),
        nn.Linear(10, 3),
    )  # fmt: skip


class Nested(nn.Module):
    """A custom module holding a Sequential and a ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.blocks:
            x = torch.relu(layer(x))
        return self.head(x)


class ConvBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(ConvBlock(4), ConvBlock(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc(x)))


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.layers = nn.ModuleList([ResBlock(4), ResBlock(4)])
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.layers:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))


def bn_names(model: nn.Module) -> dict[str, _BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}


def snapshot(model: nn.Module) -> tuple:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    structure = [(n, type(m), m.training) for n, m in model.named_modules()]
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    return state, structure, hooks, model.training


def assert_same(before: tuple, after: tuple) -> None:
    assert before[1:] == after[1:]
    assert before[0].keys() == after[0].keys()
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k


def make_identity_like(model: nn.Module) -> None:
    for bn in bn_names(model).values():
        bn.eval()
        bn.eps = 0.0
        with torch.no_grad():
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.weight.fill_(1.0)
            bn.bias.zero_()


def test_has_batchnorm() -> None:
    assert not has_batchnorm(mlp())
    assert has_batchnorm(ResNet())
    assert has_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.SyncBatchNorm(2)))
    assert not has_batchnorm(nn.Sequential(nn.Conv1d(2, 2, 1), nn.InstanceNorm1d(2)))


def test_flat_mlp_gets_bn_after_hidden_linears_only() -> None:
    bn = with_batchnorm(mlp(), torch.randn(8, 6))
    found = bn_names(bn)
    assert set(found) == {"0_bn", "2_bn", "4_bn"}
    assert all(type(m) is nn.BatchNorm1d for m in found.values())
    assert [m.num_features for m in found.values()] == [16, 12, 10]
    names = [n for n, _ in bn.named_modules()]
    assert names == ["", "0", "0_bn", "1", "2", "2_bn", "3", "4", "4_bn", "5", "6"]
    assert bn(torch.randn(8, 6)).shape == (8, 3)


def test_nested_containers() -> None:
    bn = with_batchnorm(Nested(), torch.randn(4, 5))
    assert {n: m.num_features for n, m in bn_names(bn).items()} == {
        "stem.0_bn": 8, "blocks.0_bn": 8, "blocks.1_bn": 8,
    }  # fmt: skip
    original = {n for n, _ in Nested().named_modules()}
    assert original <= {n for n, _ in bn.named_modules()}
    assert isinstance(bn.get_submodule("blocks"), nn.ModuleList)


def test_conv_blocks_get_batchnorm2d() -> None:
    bn = with_batchnorm(ConvNet(), torch.randn(2, 3, 6, 6))
    found = bn_names(bn)
    assert set(found) == {"stem_bn", "blocks.0.conv_bn", "blocks.1.conv_bn"}
    assert all(type(m) is nn.BatchNorm2d and m.num_features == 4 for m in found.values())
    assert bn(torch.randn(2, 3, 6, 6)).shape == (2, 2)


def test_functional_nonlinearity() -> None:
    bn = with_batchnorm(Functional(), torch.randn(3, 4))
    assert list(bn_names(bn)) == ["fc_bn"]
    seen = {}
    bn.fc_bn.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o))
    x = torch.randn(3, 4)
    # the forward hook on fc puts fc's output through fc_bn before F.relu sees it
    torch.testing.assert_close(bn(x), bn.out(F.relu(seen["bn"])), rtol=0, atol=0)


class UsesFLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4))
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(F.linear(x, self.w)))


class UsesMatmul(UsesFLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(torch.matmul(x, self.w.t())))


class DataDependent(Functional):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return super().forward(x)


class Sequence(Functional):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, L, 4)
        return self.out(F.gelu(self.fc(x)))


class Shared(Functional):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc(x)) + F.relu(self.fc(x)))


@pytest.mark.parametrize(
    ("model", "x", "words"),
    [
        (UsesFLinear(), torch.randn(3, 4), "linear"),
        (UsesMatmul(), torch.randn(3, 4), "parameter"),
        (Shared(), torch.randn(3, 4), "more than once"),
        (nn.Sequential(nn.Linear(4, 2), nn.ReLU()), torch.randn(3, 4), "nothing to normalize"),
    ],
)
def test_unsafe_models_raise(model: nn.Module, x: torch.Tensor, words: str) -> None:
    before = snapshot(model)
    with pytest.raises(VariantError, match="build_model\\(batchnorm: bool\\)") as info:
        derive_pair(model, x)
    assert words in str(info.value)
    assert_same(before, snapshot(model))


def test_models_torch_fx_refused_now_get_batchnorm() -> None:
    """Data-dependent control flow (torch.fx could not trace it) takes the example batch's
    branch; a Linear on (N, L, C) gets a BatchNorm over its features (torch.fx refused it)."""
    bn = with_batchnorm(DataDependent(), torch.randn(3, 4))
    assert list(bn_names(bn)) == ["fc_bn"]
    bn = with_batchnorm(Sequence(), torch.randn(3, 5, 4))
    assert {n: type(m).__name__ for n, m in bn_names(bn).items()} == {"fc_bn": "BatchNormLastDim"}
    assert bn(torch.randn(2, 7, 4)).shape == (2, 7, 1)


def test_removal_in_nested_resnet() -> None:
    model = ResNet()
    nobn = without_batchnorm(model)
    assert not has_batchnorm(nobn)
    before = dict(model.named_modules())
    after = dict(nobn.named_modules())
    assert before.keys() == after.keys()
    for name, module in before.items():
        expected = nn.Identity if isinstance(module, _BatchNorm) else type(module)
        assert type(after[name]) is expected, name
    assert sum(isinstance(m, nn.Identity) for m in after.values()) == 5
    nobn(torch.randn(2, 3, 5, 5)).sum().backward()


@pytest.mark.parametrize(
    ("factory", "x"),
    [(mlp, torch.randn(8, 6)), (Nested, torch.randn(4, 5)), (ResNet, torch.randn(2, 3, 5, 5))],
)
def test_original_never_mutated(factory, x: torch.Tensor) -> None:
    model = factory()
    model.eval()
    model.register_forward_hook(lambda *_: None)
    before = snapshot(model)
    for fn in (lambda: derive_pair(model, x), lambda: without_batchnorm(model)):
        fn()
    if not has_batchnorm(model):
        with_batchnorm(model, x)
    assert_same(before, snapshot(model))


def test_derive_pair_bn_equals_nobn_when_bn_is_identity() -> None:
    for model, x in [(mlp(), torch.randn(8, 6)), (ConvNet(), torch.randn(2, 3, 6, 6))]:
        bn, nobn = derive_pair(model, x)
        assert has_batchnorm(bn) and not has_batchnorm(nobn)
        make_identity_like(bn)
        before = bn(x)
        torch.testing.assert_close(before, nobn(x), rtol=0, atol=1e-6)
        # a non-identity BatchNorm changes the output, so the check above can fail
        with torch.no_grad():
            next(iter(bn_names(bn).values())).bias.fill_(1.0)
        assert not torch.allclose(bn(x), nobn(x))


def test_bn_sits_between_layer_and_nonlinearity() -> None:
    bn, _ = derive_pair(mlp(), torch.randn(8, 6))
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in ("2", "2_bn", "3"):
        bn.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o))
        )
    bn(torch.randn(8, 6))
    assert seen["2_bn"][0] is seen["2"][1]
    assert seen["3"][0] is seen["2_bn"][1]


def test_derive_pair_shared_weights_bitwise_equal() -> None:
    for model, x in [(mlp(), torch.randn(8, 6)), (ResNet(), torch.randn(2, 3, 5, 5))]:
        bn, nobn = derive_pair(model, x)
        bn_state, nobn_state = bn.state_dict(), nobn.state_dict()
        shared = [k for k in nobn_state if k in bn_state]
        assert len(shared) >= 4
        for k in shared:
            assert torch.equal(bn_state[k], nobn_state[k]), k
            assert bn_state[k].data_ptr() != model.state_dict()[k].data_ptr()


class Stateful(Functional):
    """Updates a buffer and draws random numbers in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return super().forward(self.drop(x))


def test_example_run_leaves_no_state_or_rng_trace() -> None:
    model, x = Stateful(), torch.randn(3, 4)
    rng = torch.get_rng_state()
    bn, nobn = derive_pair(model, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert bn.get_buffer("calls").item() == nobn.get_buffer("calls").item() == 0
    assert list(bn_names(bn)) == ["fc_bn"]
    bn(x)  # the traced forward still updates the buffer
    assert bn.get_buffer("calls").item() == 1


def test_bn_variant_trains() -> None:
    torch.manual_seed(1)
    bn, _ = derive_pair(ConvNet(), torch.randn(2, 3, 6, 6))
    bn = copy.deepcopy(bn)
    opt = torch.optim.SGD(bn.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 2, (4,))
    w0 = bn.get_submodule("stem").weight.detach().clone()
    loss = F.cross_entropy(bn(x), y)
    loss.backward()
    assert bn.get_submodule("stem_bn").weight.grad is not None
    opt.step()
    assert not torch.equal(w0, bn.get_submodule("stem").weight)
    assert bn.get_submodule("stem_bn").num_batches_tracked.item() == 1


def build_model(batchnorm: bool) -> nn.Sequential:
    norm = [nn.BatchNorm1d(8)] if batchnorm else []
    return nn.Sequential(nn.Linear(4, 8), *norm, nn.ReLU(), nn.Linear(8, 2))


def test_share_weights_copies_and_pairs() -> None:
    source, target = build_model(True), build_model(False)
    source_before = snapshot(source)
    assert not torch.equal(source[0].weight, target[0].weight)
    pairs = share_weights(source, target)
    assert pairs == [("0", "0"), ("3", "2")]
    assert torch.equal(source[0].weight, target[0].weight)
    assert torch.equal(source[3].bias, target[2].bias)
    assert_same(source_before, snapshot(source))


def test_share_weights_raises_on_mismatch() -> None:
    with pytest.raises(VariantError, match="'1'"):
        share_weights(build_model(True), nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)))
    with pytest.raises(VariantError, match="Conv1d"):
        share_weights(build_model(True), nn.Sequential(nn.Linear(4, 8), nn.Conv1d(8, 2, 1)))
    with pytest.raises(VariantError, match="no counterpart"):
        share_weights(build_model(True), nn.Sequential(nn.Linear(4, 8)))
