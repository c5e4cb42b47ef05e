"""BatchNorm and no-BatchNorm variants of one model, for training both under equal conditions.

:func:`derive_pair` returns ``(bn_variant, nobn_variant)``: a model that has BatchNorm is
copied and copied again with every BatchNorm replaced by ``nn.Identity``; a model without
BatchNorm is copied and copied again with a BatchNorm inserted, through ``torch.fx``, between
each hidden Linear/Conv layer and the nonlinearity it feeds. Every original module keeps its
qualified name and its weights in both variants, so runs compare layer by layer. When a
variant cannot be derived safely a :class:`VariantError` asks the user for
``build_model(batchnorm: bool)``; :func:`share_weights` then aligns the two models it builds.
The user's model is never modified: every function works on a deep copy.
"""

from __future__ import annotations

import contextlib
import copy
import io
import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node, Tracer
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "VariantError",
    "derive_pair",
    "has_batchnorm",
    "share_weights",
    "with_batchnorm",
    "without_batchnorm",
]

_HINT = "define build_model(batchnorm: bool) in the model file to build both variants yourself"

# Layers that get a BatchNorm, with the BatchNorm class and the output rank it needs.
_NORMALIZED: dict[type[nn.Module], tuple[type[_BatchNorm], int]] = {
    nn.Linear: (nn.BatchNorm1d, 2),
    nn.Conv1d: (nn.BatchNorm1d, 3),
    nn.Conv2d: (nn.BatchNorm2d, 4),
    nn.Conv3d: (nn.BatchNorm3d, 5),
}
# Weighted layers that make an upstream layer "hidden" (not the output layer).
_WEIGHTED = (nn.Linear, nn.Bilinear, _ConvNd)

_ACTIVATION_MODULES = (
    nn.Sigmoid, nn.Tanh, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
    nn.PReLU, nn.RReLU, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
    nn.Threshold, nn.GLU,
)  # fmt: skip
_ACTIVATION_FUNCTIONS = {
    torch.relu, torch.relu_, torch.sigmoid, torch.sigmoid_, torch.tanh, torch.tanh_,
    torch.selu, torch.celu, torch.prelu, torch.rrelu, torch.special.expit,
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_, F.selu, F.celu,
    F.gelu, F.silu, F.mish, F.softplus, F.softsign, F.hardtanh, F.hardtanh_, F.hardsigmoid,
    F.hardswish, F.prelu, F.rrelu, F.logsigmoid, F.tanhshrink, F.softshrink, F.hardshrink,
    F.threshold, F.glu, F.sigmoid, F.tanh,
}  # fmt: skip
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}

_FUNCTIONAL_LAYERS = {
    F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
}  # fmt: skip
_MATMUL_FUNCTIONS = {
    torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.einsum, operator.matmul,
}  # fmt: skip
_MATMUL_METHODS = {"matmul", "mm", "bmm", "addmm", "__matmul__", "__rmatmul__"}


class VariantError(Exception):
    """A variant cannot be derived safely; the message says why and asks the user to write
    ``build_model(batchnorm: bool)``."""


def _fail(reason: str) -> VariantError:
    return VariantError(f"{reason}; {_HINT}")


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` contains a BatchNorm module (BatchNorm1d/2d/3d, SyncBatchNorm, ...)."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def without_batchnorm(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every BatchNorm replaced by ``nn.Identity`` under the
    same qualified name."""
    variant = copy.deepcopy(model)
    if isinstance(variant, _BatchNorm):
        identity = nn.Identity()
        identity.train(variant.training)
        return identity
    targets = [
        n for n, m in variant.named_modules(remove_duplicate=False) if isinstance(m, _BatchNorm)
    ]
    for name in targets:
        parent_name, _, field = name.rpartition(".")
        parent = variant.get_submodule(parent_name)
        identity = nn.Identity()
        identity.train(getattr(parent, field).training)
        setattr(parent, field, identity)
    return variant


def with_batchnorm(model: nn.Module, example_input: Any) -> nn.Module:
    """A deep copy of ``model`` (as a ``torch.fx.GraphModule``) with a BatchNorm named
    ``<layer>_bn`` between each hidden Linear/Conv layer and the nonlinearity it feeds.

    ``example_input`` is one batch: a tensor, or a tuple/list of the forward's positional
    arguments; it is run once (without gradients, RNG and buffers restored) to learn the
    layers' output ranks. Raises :class:`VariantError` when this cannot be done safely.
    """
    if has_batchnorm(model):
        raise _fail("the model already has BatchNorm, so no BatchNorm can be added")
    if any(nn.parameter.is_lazy(p) for p in list(model.parameters()) + list(model.buffers())):
        raise _fail("the model has uninitialized lazy parameters (run one forward pass first)")
    base = copy.deepcopy(model)
    saved = {name: b.detach().clone() for name, b in base.named_buffers()}
    gm = _trace(base)
    for name, b in base.named_buffers():
        if name in saved and not torch.equal(b, saved[name]):
            raise _fail(f"forward changes buffer '{name}' in a way torch.fx cannot record")
    _check_functional_layers(gm)
    layers = _layer_nodes(gm)
    shapes = _output_shapes(gm, base, example_input, saved)
    below = _feeds_weighted_layer(gm)

    chosen: list[tuple[Node, str, _BatchNorm]] = []
    for node, layer in layers:
        if not (below[node] and _feeds_only_nonlinearities(gm, node)):
            continue
        bn_cls, rank = _NORMALIZED[type(layer)]
        shape = shapes.get(node.name)
        if shape is None or len(shape) != rank:
            what = "a Linear" if isinstance(layer, nn.Linear) else type(layer).__name__
            raise _fail(
                f"layer '{node.target}' ({what}) has output shape {tuple(shape or ())}, "
                f"but a {bn_cls.__name__} after it needs a {rank}-D batched output"
            )
        width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        bn = bn_cls(width, device=layer.weight.device, dtype=layer.weight.dtype)
        bn.train(base.training)
        chosen.append((node, f"{node.target}_bn", bn))
    if not chosen:
        raise _fail(
            "no hidden Linear/Conv layer of the model feeds a nonlinearity, so there is "
            "nothing to normalize"
        )

    for node, bn_name, bn in chosen:
        parent_name, _, field = bn_name.rpartition(".")
        if hasattr(gm.get_submodule(parent_name), field):
            raise _fail(f"the name '{bn_name}' for the BatchNorm of '{node.target}' is taken")
        _add_after(gm.get_submodule(parent_name), str(node.target).rpartition(".")[2], field, bn)
        with gm.graph.inserting_after(node):
            bn_node = gm.graph.call_module(bn_name, (node,))
        node.replace_all_uses_with(bn_node, delete_user_cb=lambda user, b=bn_node: user is not b)
    gm.graph.lint()
    gm.recompile()
    return gm


def derive_pair(model: nn.Module, example_input: Any) -> tuple[nn.Module, nn.Module]:
    """``(bn_variant, nobn_variant)`` of ``model``, both deep copies, so the layers they share
    start from identical weights."""
    if has_batchnorm(model):
        return copy.deepcopy(model), without_batchnorm(model)
    return with_batchnorm(model, example_input), copy.deepcopy(model)


def share_weights(source: nn.Module, target: nn.Module) -> list[tuple[str, str]]:
    """Copy the parameters and buffers of every non-BatchNorm layer from ``source`` into
    ``target`` (in place) and return the ``(source_name, target_name)`` pairs.

    Layers are the non-BatchNorm modules owning parameters or buffers directly, paired in
    ``named_modules()`` order; they must agree in number, type and tensor shapes.
    """
    src, dst = _owners(source), _owners(target)
    for i, ((s_name, s_mod), (t_name, t_mod)) in enumerate(zip(src, dst)):
        s_sig, t_sig = _signature(s_mod), _signature(t_mod)
        if type(s_mod) is not type(t_mod) or s_sig != t_sig:
            raise VariantError(
                f"layer {i} differs between the variants: '{s_name}' "
                f"({type(s_mod).__name__} {s_sig}) vs '{t_name}' ({type(t_mod).__name__} "
                f"{t_sig}); build_model(batchnorm) must build the same layers apart from BatchNorm"
            )
    if len(src) != len(dst):
        side, longer = ("source", src) if len(src) > len(dst) else ("target", dst)
        name, module = longer[min(len(src), len(dst))]
        raise VariantError(
            f"the source has {len(src)} layers with weights and the target {len(dst)}: "
            f"'{name}' ({type(module).__name__}) in the {side} has no counterpart; "
            "build_model(batchnorm) must build the same layers apart from BatchNorm"
        )
    pairs = []
    with torch.no_grad():
        for (s_name, s_mod), (t_name, t_mod) in zip(src, dst):
            for (_, s), (_, t) in zip(_tensors(s_mod), _tensors(t_mod)):
                t.copy_(s)
            pairs.append((s_name, t_name))
    return pairs


# -- helpers ---------------------------------------------------------------------------


class _Tracer(Tracer):
    """``symbolic_trace``'s tracer, but recording buffer reads (so in-place buffer updates
    in forward stay in the graph instead of running once at trace time)."""

    proxy_buffer_attributes = True


def _trace(base: nn.Module) -> GraphModule:
    """Trace ``base`` into a GraphModule holding ``base``'s own submodules and tensors."""
    try:
        graph = _Tracer().trace(base)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _fail(
            f"torch.fx cannot trace the model ({type(exc).__name__}: {first}), e.g. because "
            "of data-dependent control flow"
        ) from exc
    gm = GraphModule(base, graph, class_name=type(base).__name__)
    # GraphModule keeps only the used attributes and replaces containers by bare Modules;
    # put back the original children (in order) and root tensors so names, types and
    # unused modules survive.
    for name in list(gm._modules):
        delattr(gm, name)
    for name, child in base.named_children():
        gm.add_module(name, child)
    for name, param in base.named_parameters(recurse=False):
        gm.register_parameter(name, param)
    for name, buf in base.named_buffers(recurse=False):
        gm.register_buffer(name, buf, persistent=name not in base._non_persistent_buffers_set)
    gm.train(base.training)
    return gm


def _add_after(parent: nn.Module, anchor: str, name: str, module: nn.Module) -> None:
    """Register ``module`` as ``parent.<name>``, placed right after child ``anchor``."""
    parent.add_module(name, module)
    children = parent._modules
    keys = list(children)
    for key in keys[keys.index(anchor) + 1 : -1]:
        children[key] = children.pop(key)


def _check_functional_layers(gm: GraphModule) -> None:
    """Raise if a linear/conv computation is done functionally (it could get no BatchNorm)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _FUNCTIONAL_LAYERS:
            raise _fail(
                f"the model calls {node.target.__name__} functionally ('{node.name}'), so "
                "that layer cannot be given a BatchNorm"
            )
        is_matmul = (node.op == "call_function" and node.target in _MATMUL_FUNCTIONS) or (
            node.op == "call_method" and node.target in _MATMUL_METHODS
        )
        if is_matmul and any(_from_attribute(a) for a in node.all_input_nodes):
            raise _fail(
                f"the model multiplies by a parameter functionally ('{node.name}'), so that "
                "layer cannot be given a BatchNorm"
            )


def _from_attribute(node: Node) -> bool:
    """Whether ``node`` is computed from a module attribute (parameter/buffer) alone."""
    seen, stack, found = set(), [node], False
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" or n.op == "call_module":
            return False
        found |= n.op == "get_attr"
        stack.extend(n.all_input_nodes)
    return found


def _layer_nodes(gm: GraphModule) -> list[tuple[Node, nn.Module]]:
    """The Linear/Conv1d/2d/3d call nodes; raise if one module is called more than once."""
    calls: dict[str, int] = {}
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if type(module) in _NORMALIZED or isinstance(module, _WEIGHTED):
            calls[node.target] = calls.get(node.target, 0) + 1
            if calls[node.target] > 1:
                raise _fail(
                    f"layer '{node.target}' is called more than once (shared weights), so one "
                    "BatchNorm per layer is ambiguous"
                )
            if type(module) in _NORMALIZED:
                found.append((node, module))
    return found


def _feeds_weighted_layer(gm: GraphModule) -> dict[Node, bool]:
    """For each node, whether a weighted layer (Linear/Conv/...) is reachable downstream."""
    below: dict[Node, bool] = {}
    for node in reversed(gm.graph.nodes):
        below[node] = any(_is_weighted(gm, u) or below[u] for u in node.users)
    return below


def _is_weighted(gm: GraphModule, node: Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), _WEIGHTED)


def _feeds_only_nonlinearities(gm: GraphModule, node: Node) -> bool:
    """Whether every user of ``node`` is a nonlinearity taking it as its input."""
    if not node.users:
        return False
    for user in node.users:
        first = user.args[0] if user.args else user.kwargs.get("input", user.kwargs.get("self"))
        if first is not node:
            return False
        if user.op == "call_module":
            ok = isinstance(gm.get_submodule(user.target), _ACTIVATION_MODULES)
        elif user.op == "call_function":
            ok = user.target in _ACTIVATION_FUNCTIONS
        else:
            ok = user.op == "call_method" and user.target in _ACTIVATION_METHODS
        if not ok:
            return False
    return True


def _output_shapes(
    gm: GraphModule, base: nn.Module, example_input: Any, saved: dict[str, torch.Tensor]
) -> dict[str, torch.Size]:
    """Run ``example_input`` through ``gm`` and return each tensor node's output shape.

    Gradients are off, and the RNG state and the buffers (to ``saved``) are restored
    afterwards, so the run leaves no trace on the variant or on the random stream.
    """
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    devices = {t.device for t in _leaf_tensors(args)} | {t.device for t in base.parameters()}
    accel = sorted((d for d in devices if d.type not in ("cpu", "meta")), key=str)
    kind = accel[0].type if accel else None
    indices = sorted({d.index or 0 for d in accel if d.type == kind})
    try:
        # ShapeProp prints a traceback of its own before raising: keep it off the terminal
        with torch.random.fork_rng(devices=indices, device_type=kind), torch.no_grad(), \
                contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*args)
    except Exception as exc:
        raise _fail(
            f"running the traced model on example_input failed ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
        ) from exc
    finally:
        with torch.no_grad():
            for name, b in base.named_buffers():
                if name in saved:
                    b.copy_(saved[name])
    shapes = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):
            shapes[node.name] = meta.shape
    return shapes


def _leaf_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _leaf_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _leaf_tensors(item)


def _owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Non-BatchNorm modules owning parameters or buffers directly, in named_modules order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if not isinstance(m, _BatchNorm) and any(True for _ in _tensors(m))
    ]


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(recurse=False)
    yield from module.named_buffers(recurse=False)


def _signature(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(t.shape)) for name, t in _tensors(module)]
