"""Registering an extra child on a torch container without changing what the container does.

``nn.Sequential`` runs, and ``nn.ModuleList``/``nn.ModuleDict`` iterate over, every registered
child, so an inserted ``<layer>_bn`` child of one would run twice (once from the layer's hook
and once as a step of its own) or shift the list's indices. :func:`hide_children` therefore
gives such a container (of any subclass) a subclass of its own class, with the same name, whose
``__iter__``, ``__len__``, ``__getitem__`` (Sequential, ModuleList) and ``keys``/``values``/
``items`` (ModuleDict) skip the hidden children. ``named_modules``, ``state_dict``,
``parameters`` and ``.to()`` still see them: they are ordinary registered modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

_SUBCLASSES: dict[type[nn.Module], type[nn.Module]] = {}


class _SkipsHidden:
    """Mixin: the container's own views leave out the children named in ``_covshift_hidden``."""

    _modules: dict[str, nn.Module]
    _covshift_hidden: frozenset[str]

    def _visible(self) -> dict[str, nn.Module]:
        return {k: m for k, m in self._modules.items() if k not in self._covshift_hidden}

    def __len__(self) -> int:
        return len(self._visible())


class _SequenceSkipsHidden(_SkipsHidden):
    """For ``nn.Sequential`` and ``nn.ModuleList``."""

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._visible().values())

    def __getitem__(self, idx: Any) -> Any:
        children = list(self._visible().values())
        if isinstance(idx, slice):
            return nn.Sequential(*children[idx]) if isinstance(self, nn.Sequential) else nn.ModuleList(children[idx])
        return children[idx]


class _DictSkipsHidden(_SkipsHidden):
    """For ``nn.ModuleDict``."""

    def __iter__(self) -> Iterator[str]:
        return iter(self._visible())

    def keys(self) -> Any:
        return self._visible().keys()

    def values(self) -> Any:
        return self._visible().values()

    def items(self) -> Any:
        return self._visible().items()


def hide_children(parent: nn.Module, names: set[str]) -> None:
    """Make a Sequential/ModuleList/ModuleDict ``parent`` skip its children ``names`` in its
    own iteration, length and indexing (see the module docstring); other parents are left as
    they are (their ``forward`` names the children it calls)."""
    if isinstance(parent, (nn.Sequential, nn.ModuleList)):
        mixin: type = _SequenceSkipsHidden
    elif isinstance(parent, nn.ModuleDict):
        mixin = _DictSkipsHidden
    else:
        return
    base = type(parent)
    if not isinstance(parent, _SkipsHidden):
        if base not in _SUBCLASSES:
            _SUBCLASSES[base] = type(base.__name__, (mixin, base), {})
        parent.__class__ = _SUBCLASSES[base]
        parent._covshift_hidden = frozenset()
    parent._covshift_hidden = parent._covshift_hidden | frozenset(names)
