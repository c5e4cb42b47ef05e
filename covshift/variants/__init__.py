"""BatchNorm and no-BatchNorm variants of one model, for training both under equal conditions.

:func:`derive_pair` returns ``(bn_variant, nobn_variant)`` and :func:`derive_variant` one of
them: a model that has BatchNorm is copied and copied again with every BatchNorm replaced by
``nn.Identity``; a model without BatchNorm is copied and copied again with a BatchNorm added,
by module hooks, after each hidden Linear/Conv layer that feeds a nonlinearity
(:mod:`~covshift.variants.insertion`, chosen from one observed forward pass:
:mod:`~covshift.variants.observe`). Every original module keeps its qualified name and its
weights in both variants, so runs compare layer by layer. When a variant cannot be derived
safely a :class:`VariantError` asks the user for ``build_model(batchnorm: bool)``;
:func:`share_weights` (:mod:`~covshift.variants.pairing`) then aligns the two models it
builds. The user's model is never modified: every function works on a deep copy.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .common import VariantError, has_batchnorm
from .insertion import BatchNormLastDim, with_batchnorm, without_batchnorm
from .pairing import share_weights

__all__ = [
    "BatchNormLastDim",
    "VariantError",
    "derive_pair",
    "derive_variant",
    "has_batchnorm",
    "share_weights",
    "with_batchnorm",
    "without_batchnorm",
]


def derive_variant(model: nn.Module, example_input: Any, variant: str) -> nn.Module:
    """The ``"bn"`` or ``"nobn"`` variant of ``model`` alone, a deep copy: only the variant
    that differs from ``model`` is derived, so e.g. ``"nobn"`` of a model without BatchNorm
    never needs a place for one."""
    if variant not in ("bn", "nobn"):
        raise ValueError(f"variant is 'bn' or 'nobn', not {variant!r}")
    if has_batchnorm(model):
        return copy.deepcopy(model) if variant == "bn" else without_batchnorm(model)
    return with_batchnorm(model, example_input) if variant == "bn" else copy.deepcopy(model)


def derive_pair(model: nn.Module, example_input: Any) -> tuple[nn.Module, nn.Module]:
    """``(bn_variant, nobn_variant)`` of ``model``, both deep copies, so the layers they share
    start from identical weights."""
    return derive_variant(model, example_input, "bn"), derive_variant(model, example_input, "nobn")
