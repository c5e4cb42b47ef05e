"""One observed forward pass of a model on one batch: where its weighted computations'
outputs go.

:func:`observe` runs the batch through a deep copy of the model with a forward pre-hook and
a forward hook on every module (the module call stack, each call's inputs and output) and a
``TorchFunctionMode`` that sees every torch function, operator and ``Tensor`` method the
Python code calls (``F.gelu``, ``torch.relu``, ``x.sigmoid_()``, ``0.5 * x``, ...). Tensors
are identified by ``id`` while the pass runs (every tensor is kept alive until it ends, so an
id is never reused). The quantities, all of the observed batch:

- a **site** is a call of a *layer module* (below), or a functional weighted computation
  (``F.linear``, ``conv*``, a matmul, ``multi_head_attention_forward``, an RNN kernel, ...)
  taking a parameter, or a tensor computed from parameters alone, together with data.
  A functional computation inside a layer module is the layer's own and is no site;
- a **layer module** is an ``nn.Linear``/``nn.Conv1d/2d/3d`` (or subclass), or any module with
  no children owning a 2-D parameter ``weight`` that a matmul-type function (``addmm``,
  ``matmul``, ``linear``, ...) takes during its call: transformers' ``Conv1D`` (GPT-2's
  ``c_fc``) is one by this rule. Such a layer is Linear-like: its features are the output's
  last dimension;
- a **consumer** of a site is a function call taking the site's output tensor itself and
  returning a tensor (``x.shape`` or ``x.size()`` read no values and are no consumers). An
  in-place function's result is no longer the site's output;
- a consumer is a **nonlinearity** when its function is one of :data:`ACTIVATION_FUNCTIONS`,
  or when it runs inside the call of an *activation module* that took the site's output;
- an **activation module** is an instance of one of :data:`ACTIVATION_MODULES`, or a module
  without parameters called with one tensor, returning a tensor of the same shape, inside
  whose call one of :data:`NONLINEAR_PRIMITIVES` ran (so transformers' ``NewGELUActivation``,
  written with ``torch.tanh``, and a custom ``class GELU(nn.Module)`` calling ``F.gelu`` both
  count, by behaviour, not by name);
- a site **feeds a nonlinearity** when it has consumers and all of them are nonlinearities;
- a site is **hidden** when a tensor computed from its output (by any chain of functions) is
  an input of a later weighted computation (a site, or ``F.bilinear``/``conv_transpose*`` on
  data): it is not the output layer.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from .common import forward_args

ACTIVATION_FUNCTIONS = frozenset({
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "selu_",
    "celu", "celu_", "gelu", "silu", "mish", "softplus", "softsign", "hardtanh", "hardtanh_",
    "hardsigmoid", "hardswish", "prelu", "rrelu", "rrelu_", "logsigmoid", "tanhshrink",
    "softshrink", "hardshrink", "threshold", "threshold_", "glu", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "special_expit", "expit",
})  # fmt: skip
"""Names (``__name__``) of the elementwise nonlinearities, as torch functions, ``F``
functions and ``Tensor`` methods alike."""

NONLINEAR_PRIMITIVES = ACTIVATION_FUNCTIONS | {"erf", "erf_", "special_erf"}
"""Functions whose call inside a parameter-free, shape-keeping module makes that module an
activation (``erf``: the exact GELU written out)."""

ACTIVATION_MODULES = (
    nn.Sigmoid, nn.Tanh, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
    nn.PReLU, nn.RReLU, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
    nn.Threshold, nn.GLU,
)  # fmt: skip
"""torch.nn's activation classes (PReLU has a parameter, so the behavioural rule misses it)."""

LAYER_CLASSES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Module classes that are layer modules by class."""

MATMUL_FUNCTIONS = frozenset({
    "linear", "matmul", "mm", "bmm", "addmm", "addmv", "baddbmm", "einsum", "__matmul__",
    "__rmatmul__",
})  # fmt: skip
"""Matmul-type functions: one taking a module's own 2-D weight makes the module a layer."""

WEIGHTED_FUNCTIONS = MATMUL_FUNCTIONS | {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "bilinear", "multi_head_attention_forward", "lstm", "gru", "rnn_tanh", "rnn_relu",
}  # fmt: skip
"""Functions that are a weighted computation when they take a parameter and data."""


@dataclass
class ModuleCall:
    """One call of a module during the observed pass."""

    name: str
    module: nn.Module
    inputs: set[int]  # ids of its tensor arguments
    input_shape: tuple[int, ...] | None  # the shape of its one tensor argument, if one
    nonlinear: bool = False  # one of NONLINEAR_PRIMITIVES ran inside it
    weight_matmul: bool = False  # a matmul-type function took its own 2-D weight
    activation: bool = False  # decided when it returns
    layer: bool = False  # decided when it returns


@dataclass
class Site:
    """One weighted computation whose output could be normalised (see the module docstring)."""

    name: str  # the module's name, or the function and the module it ran in
    module: nn.Module | None  # None: a functional computation
    stack: tuple[int, ...]  # the enclosing module calls (indices into Observation.calls)
    shape: tuple[int, ...]
    output: int  # id of the output tensor during the pass
    consumers: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    hidden: bool = False
    feeds_nonlinearity: bool = False  # decided when the pass ends


@dataclass
class Observation:
    """What :func:`observe` saw."""

    calls: list[ModuleCall]
    sites: list[Site]  # in the order their outputs were computed

    @property
    def order(self) -> list[str]:
        """Module names in the order of their first call."""
        return list(dict.fromkeys(c.name for c in self.calls))

    @property
    def call_counts(self) -> Counter[str]:
        return Counter(c.name for c in self.calls)


class _Recorder(TorchFunctionMode):
    """Records module calls (through hooks) and torch function calls (as a mode)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules()}
        self.calls: list[ModuleCall] = []
        self.sites: list[Site] = []
        self.stack: list[int] = []
        self.site_of: dict[int, int] = {}  # tensor id -> site whose output it is
        self.tags: dict[int, frozenset[int]] = {}  # tensor id -> sites it is computed from
        self.params = {id(p) for p in model.parameters()}  # ids of parameter-only tensors
        self.keep: list[torch.Tensor] = []  # keeps ids unique
        self.busy = False  # in a hook or a record: not the model's own computation

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.busy:
            self.busy = True
            try:
                self._record(getattr(func, "__name__", ""), args, kwargs, out)
            finally:
                self.busy = False
        return out

    def _record(self, name: str, args: Any, kwargs: Any, out: Any) -> None:
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outputs:
            return
        stack = tuple(self.stack)
        if name in NONLINEAR_PRIMITIVES:
            for c in self.stack:
                self.calls[c].nonlinear = True
        for t in inputs:
            if id(t) in self.site_of:
                self.sites[self.site_of[id(t)]].consumers.append((name, stack))
                if any(o is t for o in outputs):  # in place: t now holds the consumer's result
                    del self.site_of[id(t)]
        tags = frozenset().union(*(self.tags.get(id(t), ()) for t in inputs))
        with_param = any(id(t) in self.params for t in inputs)
        only_params = bool(inputs) and all(id(t) in self.params for t in inputs)
        if name in MATMUL_FUNCTIONS and self.stack:
            top = self.calls[self.stack[-1]]
            weight = top.module._parameters.get("weight")
            if weight is not None and weight.dim() == 2 and any(t is weight for t in inputs):
                top.weight_matmul = True
        if name in WEIGHTED_FUNCTIONS and with_param and not only_params:
            for k in tags:
                self.sites[k].hidden = True
            where = self.calls[self.stack[-1]].name if self.stack else ""
            label = f"{name}() in {where!r}" if self.stack else f"{name}() in the model's forward"
            tags = tags | {self._add_site(label, None, outputs[0], stack)}
        for t in outputs:
            self.keep.append(t)
            self.tags[id(t)] = tags
            if only_params:
                self.params.add(id(t))

    def _add_site(self, name: str, module: nn.Module | None, out: torch.Tensor, stack: tuple[int, ...]) -> int:
        self.sites.append(Site(name, module, stack, tuple(out.shape), id(out)))
        self.site_of[id(out)] = len(self.sites) - 1
        self.keep.append(out)
        return len(self.sites) - 1

    def pre_hook(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.busy = True
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        shape = tuple(inputs[0].shape) if len(inputs) == 1 else None
        self.calls.append(ModuleCall(self.names.get(id(module), ""), module, {id(t) for t in inputs}, shape))
        self.keep.extend(inputs)
        self.stack.append(len(self.calls) - 1)
        self.busy = False

    def hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.busy = True
        call = self.calls[self.stack.pop()]
        if isinstance(output, torch.Tensor):
            has_weight = isinstance(module._parameters.get("weight"), torch.Tensor)
            call.layer = isinstance(module, LAYER_CLASSES) or (
                has_weight and call.weight_matmul and not module._modules
            )
            call.activation = isinstance(module, ACTIVATION_MODULES) or (
                call.nonlinear and call.input_shape == tuple(output.shape)
                and not any(True for _ in module.parameters())
            )
            if call.layer:
                k = self._add_site(call.name, module, output, tuple(self.stack))
                self.tags[id(output)] = self.tags.get(id(output), frozenset()) | {k}
        self.busy = False


def observe(model: nn.Module, example_input: Any) -> Observation:
    """Run ``example_input`` (see :func:`~covshift.variants.common.forward_args`) once through
    a deep copy of ``model`` in its current train/eval mode, without gradients (the copy
    keeps the user's hooks, and they can tell this pass from training by that), and the RNG
    state restored afterwards; ``model`` is not touched. Fused paths that skip submodules
    (``nn.TransformerEncoderLayer``'s in eval mode without gradients) stay off: they are not
    taken while a submodule has hooks, and this pass, like the BN variant, has them.
    Exceptions of the forward propagate."""
    scratch = copy.deepcopy(model)
    recorder = _Recorder(scratch)
    handles: list[RemovableHandle] = []
    for m in scratch.modules():
        handles.append(m.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(recorder.hook, always_call=True))
    args, kwargs = forward_args(example_input)
    devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
    devices |= {p.device for p in scratch.parameters()}
    accel = sorted((d for d in devices if d.type not in ("cpu", "meta")), key=str)
    kind = accel[0].type if accel else None
    indices = sorted({d.index or 0 for d in accel if d.type == kind})
    try:
        with torch.random.fork_rng(devices=indices, device_type=kind or "cuda"), torch.no_grad(), recorder:
            scratch(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    calls, sites = recorder.calls, recorder.sites
    for site in sites:
        site.feeds_nonlinearity = bool(site.consumers) and all(
            fn in ACTIVATION_FUNCTIONS or any(calls[c].activation and site.output in calls[c].inputs for c in stack)
            for fn, stack in site.consumers
        )
    kept = [s for s in sites if s.module is not None or not any(calls[c].layer for c in s.stack)]
    return Observation(calls, kept)
