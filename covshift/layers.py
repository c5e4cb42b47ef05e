"""Which modules the Tracer hooks, and what of their output it describes.

By default (``layers=None``) the Tracer hooks every leaf module and, found during the first
step, every non-leaf module that computes with a child's parameters without calling that
child (:func:`functional_candidates`, :func:`calls_children_functionally`):
``nn.MultiheadAttention`` applies its ``out_proj`` through ``F.multi_head_attention_forward``,
so ``out_proj`` is never called and the attention output would be recorded nowhere.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from torch import Tensor, nn

#: Name given to the model itself when it is hooked (its qualified name is empty).
ROOT = "(model)"


def select_layers(model: nn.Module, layers: Any = None) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs to hook, in ``named_modules`` order.

    ``layers=None`` picks every leaf module. Otherwise ``layers`` is a module type, a glob on
    qualified names (``"features.*"``), or a list of both; a module matching any is hooked.

    >>> select_layers(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), [nn.Tanh])
    [('1', Tanh())]
    """
    if layers is not None and not isinstance(layers, (list, tuple, set)):
        layers = [layers]
    types = tuple(x for x in layers or () if isinstance(x, type))
    globs = [x for x in layers or () if isinstance(x, str)]
    if layers is not None and len(types) + len(globs) != len(layers):
        raise TypeError("layers= takes module types and name globs (str)")
    chosen = []
    for name, module in model.named_modules():
        if layers is None:
            hit = _is_leaf(module)
        else:
            hit = isinstance(module, types) or any(fnmatch.fnmatchcase(name, g) for g in globs)
        if hit:
            chosen.append((name or ROOT, module))
    return chosen


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def functional_candidates(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Module]]]:
    """``(name, module, children)`` for every non-leaf module with leaf children that hold
    parameters (``children``): the modules that may use a child's weights functionally."""
    out = []
    for name, module in model.named_modules():
        children = [c for c in module.children() if _is_leaf(c) and next(c.parameters(), None) is not None]
        if children and not _is_leaf(module):
            out.append((name or ROOT, module, children))
    return out


def calls_children_functionally(children: list[nn.Module], called: set[int]) -> bool:
    """Whether one of ``children`` (leaf modules holding parameters) was not called as a
    module (``id`` not in ``called``) by the time its parent's forward returned."""
    return any(id(c) not in called for c in children)


def first_tensor(output: Any) -> Tensor | None:
    """The tensor a layer's statistics describe: the output itself, or the first floating
    tensor inside a tuple, list or dict output (an LSTM's output sequence)."""
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            found = first_tensor(item)
            if found is not None:
                return found
    return None
