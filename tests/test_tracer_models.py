"""The Tracer on the modules and setups of real models: attention, library activations,
modules called twice, tied weights, eval forwards, param groups with a scheduler and
activation checkpointing. References are computed here with our own hooks and numpy."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_tracer import batches, check_layer, expected_metrics, layer_row, table, train
from torch import nn
from torch.utils.checkpoint import checkpoint

import covshift
from covshift import stats


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(7)


# ---------------------------------------------------------------------------------------
# 1. nn.MultiheadAttention: its out_proj is applied functionally, yet its output is recorded
# ---------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.head(self.attn(h, h, h)[0]).mean(1)


def test_multihead_attention_is_recorded_by_default(tmp_path):
    model = Attention()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, optimizer=opt) as tracer:
        refs = train(model, tracer, opt, batches(3, (4, 5, 6), (4, 3)), twin, ["attn"])
        assert "attn" in tracer.layers
    trace = covshift.load(path)
    tab = table(trace)
    for step, ref in enumerate(refs):
        assert ref.outs["attn"][0].shape == (4, 5, 8)  # the attention output, not the weights
        check_layer(layer_row(tab, step, "attn"), expected_metrics(ref.outs["attn"], ref.grads["attn"]))
        w = dict(twin.named_parameters())["attn.in_proj_weight"].detach().double()
        assert (step, "attn", "in_proj_weight.grad_norm") in tab
        assert w.norm() > 0
    assert trace.layers[:3] == ["inp", "attn", "head"]  # forward order; out_proj only has parameter rows
    assert tab[(0, "attn.out_proj", "weight.norm")] > 0


def test_transformer_encoder_attention_is_recorded(tmp_path):
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    path = tmp_path / "t.covshift"
    x = torch.randn(3, 5, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with covshift.Tracer(model, path, optimizer=opt) as tracer:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        tracer.step()
    layers = covshift.load(path).layers
    assert "1.layers.0.self_attn" in layers and "1.layers.1.self_attn" in layers
    assert "1.layers.0" not in layers and "1" not in layers  # containers that call their children


# ---------------------------------------------------------------------------------------
# 2. Nonlinearities recognised by behaviour; GELU/SiLU saturation and gain from the input
# ---------------------------------------------------------------------------------------
class UserGELU(nn.Module):
    """A timm-style activation class outside torch.nn."""

    def forward(self, x):
        return F.gelu(x)


def _hf(name):
    activations = pytest.importorskip("transformers.activations")
    return getattr(activations, name)() if name != "ACT2FN" else activations.ACT2FN["silu"]


FUNCTIONS = {  # the functions themselves, for the derivative by autograd
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "quick_gelu": lambda x: x / (1 + torch.exp(-1.702 * x)),
}
ACTIVATIONS = [
    (lambda: nn.GELU(), "gelu"), (lambda: nn.GELU(approximate="tanh"), "gelu_tanh"),
    (lambda: nn.SiLU(), "silu"), (lambda: nn.SiLU(inplace=True), "silu"), (UserGELU, "gelu"),
    (lambda: _hf("GELUActivation"), "gelu"), (lambda: _hf("NewGELUActivation"), "gelu_tanh"),
    (lambda: _hf("FastGELUActivation"), "gelu_tanh"), (lambda: _hf("QuickGELUActivation"), "quick_gelu"),
    (lambda: _hf("ACT2FN"), "silu"),
]


def _derivative(name, x):
    """f'(x) / max f', both by autograd in float64 (the max on a 1e-4 grid over [-10, 10])."""
    def prime(t):
        t = t.clone().requires_grad_(True)
        FUNCTIONS[name](t).sum().backward()
        return t.grad
    top = prime(torch.linspace(-10, 10, 200_001, dtype=torch.float64)).max()
    return (prime(torch.as_tensor(x, dtype=torch.float64)) / top).numpy()


@pytest.mark.parametrize("make, name", ACTIVATIONS)
def test_gelu_and_silu_families_saturation_and_gain_from_the_input(tmp_path, make, name):
    act = make()
    assert stats.nonlinearity(act).name == name
    model = nn.Sequential(nn.Linear(5, 16), act, nn.Linear(16, 2))
    twin = copy.deepcopy(model)
    if getattr(twin[1], "inplace", False):
        twin[1].inplace = False  # the reference keeps the input it captured
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, optimizer=opt) as tracer:
        refs = train(model, tracer, opt, batches(2, (9, 5), (9, 2), scale=3.0), twin, ["0", "1"])
    trace = covshift.load(path)
    tab = table(trace)
    assert trace.layer_info().set_index("layer").loc["1", "nonlinearity"] == name
    for step, ref in enumerate(refs):
        x = np.concatenate([o.ravel() for o in ref.outs["0"]])  # the activation's input
        g = _derivative(name, x)
        exp = expected_metrics(ref.outs["1"], ref.grads["1"])
        exp["saturation"], exp["gain"] = float(np.mean(np.abs(g) < 0.1)), float(np.mean(g))
        assert 0 < exp["saturation"] < 1
        check_layer(layer_row(tab, step, "1"), exp)


@pytest.mark.parametrize("module", [nn.Identity(), nn.Dropout(0.5), nn.Mish(), nn.Softmax(-1), nn.Flatten(),
                                    nn.Linear(3, 3), nn.LayerNorm(3)])
def test_other_modules_are_not_nonlinearities_and_probing_keeps_the_rng(module):
    before = torch.get_rng_state()
    assert stats.nonlinearity(module) is None
    assert torch.equal(torch.get_rng_state(), before)


def test_user_tanh_and_relu_classes_are_recognised():
    class Tanh(nn.Module):
        def forward(self, x):
            return torch.tanh(x)

    class ReLU(nn.Module):
        def forward(self, x):
            return x.clamp_min(0)

    assert stats.nonlinearity(Tanh()).name == "tanh"
    assert stats.nonlinearity(ReLU()).name == "relu"
    assert stats.nonlinearity(ReLU()).relu_family


# ---------------------------------------------------------------------------------------
# 3. calls: a module called twice per forward (torchvision BasicBlock's relu)
# ---------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.conv2(self.relu(self.conv1(x)))
        out += x
        return self.relu(out)


def test_calls_counts_a_module_called_twice(tmp_path):
    model = BasicBlock()
    path = tmp_path / "t.covshift"
    x = torch.randn(2, 3, 5, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with covshift.Tracer(model, path, optimizer=opt) as tracer:
        for _ in range(2):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            tracer.step()
    calls = covshift.load(path).scalars(metric="calls").set_index(["step", "layer"])["value"]
    assert calls.to_dict() == {(s, n): c for s in (0, 1) for n, c in (("conv1", 1.0), ("relu", 2.0), ("conv2", 1.0))}


# ---------------------------------------------------------------------------------------
# 4. Tied weights
# ---------------------------------------------------------------------------------------
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.lm_head = nn.Linear(6, 11, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.mid(self.wte(ids))))


@pytest.mark.parametrize("layers, owner", [(None, "wte"), (["lm_head", "mid"], "lm_head")])
def test_tied_weight_is_recorded_once_on_its_first_hooked_owner(tmp_path, layers, owner):
    model = Tied()
    ids = torch.randint(11, (4, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, optimizer=opt, layers=layers) as tracer:
        opt.zero_grad()
        loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        grad = model.wte.weight.grad.detach().double().clone()
        opt.step()
        tracer.step(loss=loss)
    tab = table(covshift.load(path))
    rows = {layer for (_, layer, metric) in tab if metric == "weight.grad_norm"} - {"mid"}
    assert rows == {owner}
    assert tab[(0, owner, "weight.grad_norm")] == pytest.approx(float(grad.norm()), rel=1e-5)  # both uses
    assert tab[(0, owner, "weight.norm")] == pytest.approx(float(model.wte.weight.detach().double().norm()), rel=1e-5)


def test_gpt2_records_gelu_attention_and_the_tied_head(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=8)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(40, (3, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, optimizer=opt) as tracer:
        for _ in range(2):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            tracer.step(loss=loss)
    trace = covshift.load(path)
    info = trace.layer_info().set_index("layer")
    assert info.loc["transformer.h.0.mlp.act", "nonlinearity"] == "gelu_tanh"  # NewGELUActivation
    tab = table(trace)
    assert (1, "transformer.h.0.mlp.act", "gain") in tab
    assert (0, "transformer.wte", "weight.norm") in tab
    assert not any(layer == "lm_head" and "." in metric for (_, layer, metric) in tab)
    assert not trace.scalars()["value"].isna().any()


# ---------------------------------------------------------------------------------------
# 5. Forwards in eval mode with gradients enabled
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("include_eval", [False, True])
def test_eval_mode_forwards_are_skipped_unless_included(tmp_path, include_eval):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    twin = copy.deepcopy(model)
    names = ["0", "1", "2"]
    val = 5.0 + 3.0 * torch.randn(16, 4)
    evals = {}

    def validate(step):
        model.eval()
        twin.load_state_dict(model.state_dict())
        evals[step] = twin[1](twin[0](val)).detach().double().numpy()
        model(val)  # gradients enabled, as in a careless validation loop
        model.train()

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"
    options = {"include_eval": True} if include_eval else {}  # the default skips them
    with covshift.Tracer(model, path, optimizer=opt, **options) as tracer:
        refs = train(model, tracer, opt, batches(3, (6, 4), (6, 2)), twin, names, between=validate)
    tab = table(covshift.load(path))
    for step, ref in enumerate(refs):
        outs = ref.outs["1"]
        if include_eval:  # validation runs before tracer.step(): in this step
            outs = outs + [evals[step]]
        exp = expected_metrics(outs, None, "tanh")
        got = layer_row(tab, step, "1")
        for metric in ("mean", "var", "min", "max", "saturation", "gain"):
            assert got[metric] == pytest.approx(exp[metric], rel=1e-4, abs=1e-6), metric
        assert got["calls"] == len(outs)


# ---------------------------------------------------------------------------------------
# 6. Every param group's lr, as used by optimizer.step(), with a scheduler
# ---------------------------------------------------------------------------------------
def test_lr_of_every_group_is_the_one_the_step_used(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[2].parameters(), "lr": 0.03}])
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    path = tmp_path / "t.covshift"
    used = []
    with covshift.Tracer(model, path, optimizer=opt) as tracer:
        for x, y in batches(3, (5, 3), (5, 1)):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            w, g = model[2].weight.detach().clone(), model[2].weight.grad.clone()
            opt.step()
            used.append(float(((w - model[2].weight.detach()) / g).mean()))  # the lr SGD applied
            scheduler.step()
            tracer.step(loss=loss)
    tab = table(covshift.load(path))
    for step in range(3):
        assert tab[(step, "", "lr")] == pytest.approx(0.1 * 0.5**step, rel=1e-12)
        assert tab[(step, "", "lr.1")] == pytest.approx(0.03 * 0.5**step, rel=1e-12)
        assert tab[(step, "", "lr.1")] == pytest.approx(used[step], rel=1e-4)


# ---------------------------------------------------------------------------------------
# 7. Forward order unchanged by reentrant activation checkpointing
# ---------------------------------------------------------------------------------------
class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(3, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head = nn.Linear(6, 2)
        self.recompute = True

    def forward(self, x):
        h = self.stem(x)
        h = checkpoint(self.block, h, use_reentrant=True) if self.recompute else self.block(h)
        return self.head(h)


def test_forward_order_and_stats_under_reentrant_checkpointing(tmp_path):
    model = Checkpointed()
    twin = copy.deepcopy(model)
    twin.recompute = False  # the reference: a plain forward
    names = ["stem", "block.0", "block.1", "block.2", "head"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.covshift"
    with covshift.Tracer(model, path, optimizer=opt) as tracer:
        refs = train(model, tracer, opt, batches(2, (5, 3), (5, 2)), twin, names)
    trace = covshift.load(path)
    assert trace.layers == names
    tab = table(trace)
    for step, ref in enumerate(refs):
        for name in names:
            kind = "tanh" if name == "block.1" else None
            check_layer(layer_row(tab, step, name), expected_metrics(ref.outs[name], ref.grads[name], kind))
