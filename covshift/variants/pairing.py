"""Starting the two variants a user builds (``build_model(batchnorm)``) from equal weights.

The *layers* of a model are its non-BatchNorm modules owning parameters or buffers directly.
:func:`share_weights` pairs the layers of two models one to one, in forward order (the order
of their first call on an example batch, when one is given; layers it does not call follow
in ``named_modules`` order) or else in ``named_modules`` order. Paired layers must have the
same type and the same shape for every tensor both have; a tensor only one of them has is
allowed only when it is a ``bias``: a Linear/Conv with ``bias=False`` before a BatchNorm in
one variant pairs with the same layer with a bias in the other, the weight is copied and the
bias left as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .common import VariantError
from .observe import observe

_TOLERATED = frozenset({"bias"})
"""Names of the tensors a layer may have in one variant only."""

_ASK = "build_model(batchnorm) must build the same layers apart from BatchNorm"


def share_weights(source: nn.Module, target: nn.Module, example_input: Any = None) -> list[tuple[str, str]]:
    """Copy every parameter and buffer that paired layers both have from ``source`` into
    ``target`` (in place) and return the ``(source_name, target_name)`` pairs (see the module
    docstring). ``example_input``, one batch, orders the layers by a forward pass of each
    model (on copies). Raises :class:`VariantError` naming the first layer that differs."""
    src, dst = _layers(source, example_input), _layers(target, example_input)
    for i, ((s_name, s_mod), (t_name, t_mod)) in enumerate(zip(src, dst)):
        s_sig, t_sig = _signature(s_mod), _signature(t_mod)
        only = s_sig.keys() ^ t_sig.keys()
        differs = type(s_mod) is not type(t_mod) or not only <= _TOLERATED or any(
            s_sig[k] != t_sig[k] for k in s_sig.keys() & t_sig.keys()
        )
        if differs:
            raise VariantError(
                f"layer {i} differs between the variants: {s_name!r} ({type(s_mod).__name__} "
                f"{sorted(s_sig.items())}) vs {t_name!r} ({type(t_mod).__name__} {sorted(t_sig.items())}); {_ASK}"
            )
    if len(src) != len(dst):
        side, longer = ("source", src) if len(src) > len(dst) else ("target", dst)
        name, module = longer[min(len(src), len(dst))]
        raise VariantError(
            f"the source has {len(src)} layers with weights and the target {len(dst)}: {name!r} "
            f"({type(module).__name__}) in the {side} has no counterpart; {_ASK}"
        )
    with torch.no_grad():
        for (_, s_mod), (_, t_mod) in zip(src, dst):
            t_tensors = dict(_tensors(t_mod))
            for key, s in _tensors(s_mod):
                if key in t_tensors:
                    t_tensors[key].copy_(s)
    return [(s_name, t_name) for (s_name, _), (t_name, _) in zip(src, dst)]


def _layers(model: nn.Module, example_input: Any) -> list[tuple[str, nn.Module]]:
    """The layers of ``model`` in forward order (see the module docstring)."""
    owners = {
        name: m
        for name, m in model.named_modules()
        if not isinstance(m, _BatchNorm) and any(True for _ in _tensors(m))
    }
    if example_input is None:
        return list(owners.items())
    order = [n for n in observe(model, example_input).order if n in owners]
    rest = [n for n in owners if n not in set(order)]
    return [(n, owners[n]) for n in order + rest]


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(recurse=False)
    yield from module.named_buffers(recurse=False)


def _signature(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in _tensors(module)}
