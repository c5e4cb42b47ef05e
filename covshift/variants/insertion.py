"""Adding BatchNorm to a model without it, and removing it from a model with it.

:func:`with_batchnorm` observes one forward pass (:mod:`covshift.variants.observe`) and gives
every *hidden* layer module that *feeds a nonlinearity* a BatchNorm, on a deep copy:

- the BatchNorm is a child ``<layer>_bn`` of the layer's parent, registered right after the
  layer (so it follows it in ``named_modules``); a Sequential/ModuleList/ModuleDict parent
  does not run or count it as a step of its own (:mod:`covshift.variants.containers`);
- a forward hook on the layer returns ``bn(output)``; a forward pre-hook on the layer moves
  that hook behind every other forward hook of the layer before each call, so hooks on the
  layer (covshift's Tracer, the user's) see the layer's own output and the BatchNorm's hooks
  the normalised one. No ``forward`` is rewritten: every original module, of any class, is
  called as before and keeps its name;
- the class follows the layer's output: a Conv1d/2d/3d output ``(N, C, ...)`` of rank 3/4/5
  gets ``BatchNorm1d/2d/3d(C)``; a Linear-like output ``(N, C)`` gets ``BatchNorm1d(C)``, and
  ``(N, ..., C)`` of rank 3 or more (a transformer's ``(B, T, C)``) gets
  :class:`BatchNormLastDim` ``(C)``: statistics per feature over all the other dimensions
  (every position of every sequence, padding included, is one sample).

It raises :class:`VariantError` when BatchNorm has no sensible place: the model already has
BatchNorm, no hidden layer module feeds a nonlinearity, a functional weighted computation
(``F.linear(x, self.w)``) feeds one (it has no module to hook), such a layer is called more
than once per forward, its output has no batch dimension, or the name ``<layer>_bn`` is taken.
The insertion points are those of the observed batch: a branch the batch does not take
gets no BatchNorm.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .common import fail, has_batchnorm
from .containers import hide_children
from .observe import Site, observe

_CONV_RANK = {nn.Conv1d: (nn.BatchNorm1d, 3), nn.Conv2d: (nn.BatchNorm2d, 4), nn.Conv3d: (nn.BatchNorm3d, 5)}


class BatchNormLastDim(nn.BatchNorm1d):
    """``BatchNorm1d`` over the last dimension of an input ``(N, ..., C)``: the input is seen
    as ``(N·..., C)``, so each feature is normalised over every other dimension."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        flat = input.reshape(-1, input.shape[-1])
        return super().forward(flat).reshape(input.shape)


class _Normalize:
    """The hooks that put a layer's output through its BatchNorm (see the module docstring).

    A callable object, not a closure, so a deep copy of the model gets hooks that call the
    copy's BatchNorm."""

    def __init__(self, bn: nn.Module) -> None:
        self.bn = bn
        self.hook_id = -1

    def last(self, module: nn.Module, args: Any) -> None:
        if self.hook_id in module._forward_hooks:
            module._forward_hooks.move_to_end(self.hook_id)

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return self.bn(output)


def without_batchnorm(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every BatchNorm replaced by ``nn.Identity`` under the
    same qualified name."""
    variant = copy.deepcopy(model)
    if isinstance(variant, _BatchNorm):
        identity = nn.Identity()
        identity.train(variant.training)
        return identity
    targets = [n for n, m in variant.named_modules(remove_duplicate=False) if isinstance(m, _BatchNorm)]
    for name in targets:
        parent_name, _, field = name.rpartition(".")
        parent = variant.get_submodule(parent_name)
        identity = nn.Identity()
        identity.train(getattr(parent, field).training)
        setattr(parent, field, identity)
    return variant


def with_batchnorm(model: nn.Module, example_input: Any) -> nn.Module:
    """A deep copy of ``model`` with a BatchNorm ``<layer>_bn`` after each hidden layer that
    feeds a nonlinearity (see the module docstring).

    ``example_input`` is one batch: a tensor, a tuple/list of the forward's positional
    arguments or a dict of its keyword arguments; it runs once through another copy (RNG
    restored). Raises :class:`VariantError` when BatchNorm has no sensible place."""
    if has_batchnorm(model):
        raise fail("the model already has BatchNorm, so no BatchNorm can be added")
    if any(nn.parameter.is_lazy(p) for p in list(model.parameters()) + list(model.buffers())):
        raise fail("the model has uninitialized lazy parameters (run one forward pass first)")
    try:
        seen = observe(model, example_input)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise fail(f"running the model on a batch failed ({type(exc).__name__}: {text})") from exc
    chosen = [s for s in seen.sites if s.hidden and s.feeds_nonlinearity]
    for site in chosen:
        if site.module is None:
            raise fail(f"{site.name} computes with a parameter functionally and feeds a nonlinearity, so "
                       "there is no layer module to give a BatchNorm")
        if seen.call_counts[site.name] > 1:
            raise fail(f"layer {site.name!r} is called more than once per forward (shared weights), so one "
                       "BatchNorm per layer is ambiguous")
    if not chosen:
        raise fail("no hidden Linear/Conv layer of the model feeds a nonlinearity, so there is nothing to normalize")
    variant = copy.deepcopy(model)
    for site in chosen:
        _insert(variant, site)
    return variant


def _insert(variant: nn.Module, site: Site) -> None:
    """Give the layer of ``site`` (by name, in ``variant``) its BatchNorm and hooks."""
    layer = variant.get_submodule(site.name)
    bn = _batchnorm_for(site)
    bn.to(device=layer.weight.device, dtype=layer.weight.dtype)
    bn.train(layer.training)
    parent_name, _, field = site.name.rpartition(".")
    parent = variant.get_submodule(parent_name)
    name = f"{field}_bn"
    if hasattr(parent, name):
        raise fail(f"the name {site.name + '_bn'!r} for the BatchNorm of {site.name!r} is taken")
    parent.add_module(name, bn)
    keys = list(parent._modules)
    for key in keys[keys.index(field) + 1 : -1]:  # move the later children behind the BatchNorm
        parent._modules[key] = parent._modules.pop(key)
    hide_children(parent, {name})
    hooks = _Normalize(bn)
    hooks.hook_id = layer.register_forward_hook(hooks).id
    layer.register_forward_pre_hook(hooks.last)


def _batchnorm_for(site: Site) -> _BatchNorm:
    """The BatchNorm for the output of ``site`` (see the module docstring)."""
    shape, layer = site.shape, site.module
    conv = next((v for k, v in _CONV_RANK.items() if isinstance(layer, k)), None)
    if conv is not None:
        cls, rank = conv
        if len(shape) != rank:
            raise fail(f"layer {site.name!r} ({type(layer).__name__}) has output shape {shape}, but a "
                       f"{cls.__name__} after it needs a {rank}-D batched output")
        return cls(shape[1])
    if len(shape) < 2:
        raise fail(f"layer {site.name!r} ({type(layer).__name__}) has output shape {shape}, without a "
                   "batch dimension to normalise over")
    return nn.BatchNorm1d(shape[1]) if len(shape) == 2 else BatchNormLastDim(shape[-1])
