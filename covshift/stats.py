"""Statistic kernels: pure functions of tensors, plus the table that names every metric.

Device side (called from hooks, no host sync): :func:`moments`, :func:`take_sample`,
:func:`unit_sums`, :func:`unit_max`. Host side (at flush, in float64):
:func:`finish_moments`, :func:`merge_moments`, :func:`sample_stats`, :func:`hist_edges`,
:func:`histogram`.

Means, variances and norms are exact. Percentiles, saturation, gain and the
non-finite count come from a fixed random subsample of ``k`` elements when a tensor
has more than ``k``; :func:`sample_error_bound` gives their guaranteed error.

>>> import torch
>>> x = torch.tensor([1000.0, 1001.0, 1002.0])
>>> c, s1, s2, lo, hi = moments(x, x[0]).tolist()
>>> finish_moments(3, c, s1, s2)
(1001.0, 2.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

#: Layer metrics (forward output and gradient w.r.t. it), per step.
LAYER_METRICS: dict[str, str] = {
    "mean": "mean of the layer's output",
    "var": "population variance of the output",
    "std": "population standard deviation of the output",
    "min": "smallest output value",
    "max": "largest output value",
    "p15": "15th percentile of the output (lower method)",
    "p50": "median of the output (lower method)",
    "p85": "85th percentile of the output (lower method)",
    "saturation": "fraction of values where the nonlinearity's local derivative is below 10% of its maximum"
                  " in absolute value (of the input for GELU and SiLU, else of the output)",
    "gain": "mean local derivative of the nonlinearity, relative to its maximum",
    "calls": "number of times the module was called (and recorded) in the step; its calls are merged",
    "dead": "units (channels) inactive on every element of the step (ReLU family)",
    "nonfinite": "number of NaN or infinite outputs",
    "grad_norm": "L2 norm of the loss gradient w.r.t. the output",
    "grad_rms": "root mean square of the loss gradient w.r.t. the output",
    "unit_count": "detail steps: elements per unit behind the per-unit statistics (batch × positions)",
}
#: Parameter metrics, recorded on the owning layer as ``<param>.<metric>``.
PARAM_METRICS: dict[str, str] = {
    "grad_norm": "L2 norm of the parameter's gradient",
    "norm": "L2 norm of the parameter after the optimizer step",
    "update_ratio": "||W_t - W_(t-1)|| / ||W_(t-1)||, the size of the step's update (no row when ||W_(t-1)|| = 0)",
}
#: Run metrics, recorded with an empty layer name.
RUN_METRICS: dict[str, str] = {
    "loss": "the loss passed to Tracer.step",
    "lr": "learning rate of parameter group 0 used by the step's optimizer.step()",
    "lr.<i>": "learning rate of parameter group i (i >= 1) used by the step's optimizer.step()",
    "grad_norm": "L2 norm of all parameter gradients together",
}
PERCENTILES = (0.15, 0.50, 0.85)
#: A value is saturated when its nonlinearity's local derivative, divided by the
#: derivative's maximum, is below this in absolute value (it passes < 10% of the gradient).
SATURATION_THRESHOLD = 0.1
#: Order of the values :func:`sample_stats` returns.
SAMPLE_FIELDS = ("p15", "p50", "p85", "saturation", "gain", "nonfinite")


@dataclass(frozen=True)
class Nonlinearity:
    """A nonlinearity's local derivative divided by its maximum, as a function of its output
    (``of_input=False``) or, where the output does not determine it (GELU, SiLU), of its
    input (``of_input=True``: the tracer then samples the layer's input too)."""

    name: str
    derivative: Callable[[Tensor], Tensor]
    low: float | None = None  # output range, when the function bounds it
    high: float | None = None
    relu_family: bool = False  # has a zero-gradient region, so units can die
    of_input: bool = False


def _leaky(slope: float) -> Callable[[Tensor], Tensor]:
    top = max(1.0, slope)
    return lambda y: torch.where(y > 0, 1.0 / top, slope / top)


def _elu(alpha: float) -> Callable[[Tensor], Tensor]:
    top = max(1.0, alpha)
    return lambda y: torch.where(y > 0, torch.ones_like(y), y + alpha) / top


def _window(low: float, high: float) -> Callable[[Tensor], Tensor]:
    """1 inside the open interval ``(low, high)``, else 0 (NaN: 0), in ``y``'s dtype;
    compared into float tensors, three times as fast as into bool ones on the CPU."""

    def inside(y: Tensor) -> Tensor:
        above = torch.gt(y, low, out=torch.empty_like(y))
        return above.mul_(torch.lt(y, high, out=torch.empty_like(y)))

    return inside


def _gelu_tanh_prime(x: Tensor) -> Tensor:
    c = math.sqrt(2.0 / math.pi)
    t = torch.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)


def _swish_prime(a: float) -> Callable[[Tensor], Tensor]:
    """Derivative of ``x * sigmoid(a x)`` (SiLU: a = 1; QuickGELU: a = 1.702)."""
    return lambda x: torch.sigmoid(a * x) * (1.0 + a * x * (1.0 - torch.sigmoid(a * x)))


#: Inputs on which the peak of an input-based derivative is found (the peaks lie in [-3, 3]).
PEAK_GRID = torch.linspace(-10.0, 10.0, 200_001, dtype=torch.float64)


def _by_input(name: str, prime: Callable[[Tensor], Tensor]) -> Nonlinearity:
    """A :class:`Nonlinearity` whose derivative ``prime`` of the input is divided by its
    maximum, found on :data:`PEAK_GRID` (relative error below 1e-9: the peak is flat)."""
    top = float(prime(PEAK_GRID).max())
    return Nonlinearity(name, lambda x: prime(x) / top, of_input=True)


#: Functions recognised by behaviour (:func:`nonlinearity`), each with its Nonlinearity.
BEHAVIOURS: dict[str, tuple[Callable[[Tensor], Tensor], Nonlinearity]] = {
    "sigmoid": (torch.sigmoid, Nonlinearity("sigmoid", lambda y: 4.0 * y * (1.0 - y), 0.0, 1.0)),
    "tanh": (torch.tanh, Nonlinearity("tanh", lambda y: 1.0 - y * y, -1.0, 1.0)),
    "softsign": (nn.functional.softsign, Nonlinearity("softsign", lambda y: (1.0 - y.abs()) ** 2, -1.0, 1.0)),
    "relu": (torch.relu, Nonlinearity("relu", _window(0.0, math.inf), relu_family=True)),
    "relu6": (nn.functional.relu6, Nonlinearity("relu6", _window(0.0, 6.0), 0.0, 6.0, relu_family=True)),
    "gelu": (nn.functional.gelu,
             _by_input("gelu", lambda x: torch.special.ndtr(x) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi))),
    "gelu_tanh": (partial(nn.functional.gelu, approximate="tanh"), _by_input("gelu_tanh", _gelu_tanh_prime)),
    "silu": (nn.functional.silu, _by_input("silu", _swish_prime(1.0))),
    "quick_gelu": (lambda x: x * torch.sigmoid(1.702 * x), _by_input("quick_gelu", _swish_prime(1.702))),
}
#: The probe input of behaviour recognition: float64, wide enough that a clipped variant
#: (Hugging Face's ``gelu_10``, clipped at 10) does not pass for the unclipped function.
PROBE = torch.linspace(-12.0, 12.0, 97, dtype=torch.float64)
#: Largest difference |module(PROBE) - f(PROBE)| / (1 + |f(PROBE)|) that still counts as f:
#: float32 implementations pass; GELU and its tanh approximation (4.7e-4 apart) differ.
PROBE_TOLERANCE = 1e-5


def behaviour(module: nn.Module) -> Nonlinearity | None:
    """The :data:`BEHAVIOURS` entry that a parameter-free ``module`` computes on :data:`PROBE`,
    or None. The probe calls ``module.forward`` once (no hooks run) under ``no_grad`` on the
    CPU, with the CPU random state restored; a module that fails on it is not a nonlinearity."""
    if next(module.parameters(), None) is not None:
        return None
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = module.forward(PROBE.clone())
        out = out.detach().to("cpu", torch.float64)
    except Exception:  # any failure means "not an elementwise function of a float tensor"
        return None
    if out.shape != PROBE.shape:
        return None
    for function, kind in BEHAVIOURS.values():
        want = function(PROBE)
        if bool(((out - want).abs() <= PROBE_TOLERANCE * (1.0 + want.abs())).all()):
            return kind
    return None


def nonlinearity(module: nn.Module) -> Nonlinearity | None:
    """The :class:`Nonlinearity` of ``module``: by class for the parametrised ``torch.nn``
    activations (Hardtanh, ReLU6, LeakyReLU, ELU, Softplus), otherwise by :func:`behaviour`
    (Sigmoid, Tanh, ReLU, GELU, SiLU, ... of any library, or a user's own class)."""
    if isinstance(module, nn.ReLU6):  # a Hardtanh subclass: test it first
        return BEHAVIOURS["relu6"][1]
    if isinstance(module, nn.Hardtanh):
        lo, hi = float(module.min_val), float(module.max_val)
        return Nonlinearity("hardtanh", _window(lo, hi), lo, hi)
    if isinstance(module, nn.LeakyReLU):
        return Nonlinearity("leaky_relu", _leaky(float(module.negative_slope)), relu_family=True)
    if isinstance(module, nn.ELU):
        return Nonlinearity("elu", _elu(float(module.alpha)))
    if isinstance(module, nn.Softplus):
        beta = float(module.beta)
        return Nonlinearity("softplus", lambda y: 1.0 - torch.exp(-beta * y))
    return behaviour(module)


def flat_float(x: Tensor) -> Tensor:
    """``x`` as a detached 1-D float tensor (a view when possible); half types become float32."""
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return x.reshape(-1)


#: On the CPU, outside a compiled graph, :func:`moments` of more values than this goes
#: through them in pieces of this many (2 MB of float32): a piece stays in the cache from
#: its first pass (min and max) to its last (the squares), where five passes over a whole
#: output of millions of values fresh from a convolution each read it from memory (2M
#: values: 1.5 ms against 2.0, *Overhead*).
MOMENTS_PIECE = 1 << 19


def moments(flat: Tensor, shift: Tensor | None, scratch: Tensor | None = None, out: Tensor | None = None,
            scale: float = 1.0) -> Tensor:
    """``[shift, S1, S2, min, max]`` of a non-empty 1-D tensor, with ``c = scale * shift``,
    ``S1 = sum(flat - c)`` and ``S2 = sum((flat - c)**2)``, written into ``out`` (5 elements
    of ``flat``'s dtype, say a view of a preallocated buffer) when given; ``shift=None``
    when ``out[0]`` holds the shift already.

    With ``c`` near the mean (the tracer passes the sum of the layer's sample and
    ``1 / len(sample)``: a sum is one kernel where a mean is two), the variance stays exact
    when ``|mean| >> std`` (a saturated sigmoid sits at 0.999 +- 0.001), where
    ``E[x^2] - E[x]^2`` would cancel. :func:`finish_moments` turns the sums into
    ``(mean, M2)`` on the host. ``scratch`` (``flat``'s dtype, at least
    :func:`scratch_size` values) is working space for the shifted values, sparing an
    allocation of the tensor's size.
    """
    out = torch.empty(5, dtype=flat.dtype, device=flat.device) if out is None else out
    first, s1, s2, lo, hi = out.unbind()
    if shift is None:
        shift = first
    elif shift.dtype != flat.dtype or shift.dim():
        shift = shift.to(flat.dtype).reshape(())
    if shift is not first:
        first.copy_(shift)
    n = flat.numel()
    if n <= MOMENTS_PIECE or not _eager_cpu(flat.device):
        _shifted_sums(flat, shift, scale, None if scratch is None else scratch[:n], (lo, hi, s1, s2))
        return out
    parts = torch.empty(4, -(-n // MOMENTS_PIECE), dtype=flat.dtype)  # per piece: min, max, S1, S2
    for i, at in enumerate(range(0, n, MOMENTS_PIECE)):
        piece = flat[at:at + MOMENTS_PIECE]
        _shifted_sums(piece, shift, scale, None if scratch is None else scratch[:piece.numel()], parts[:, i].unbind())
    torch.amin(parts[0], 0, out=lo), torch.amax(parts[1], 0, out=hi)
    torch.sum(parts[2], 0, out=s1), torch.sum(parts[3], 0, out=s2)
    return out


def scratch_size(n: int, device: torch.device) -> int:
    """The working space :func:`moments` and :func:`sum_of_squares` use for ``n`` values on
    ``device``: ``n``, or a piece on the CPU outside a compiled graph (:data:`MOMENTS_PIECE`),
    where the sum of squares of more values needs none (:data:`ROW_NORMS_FROM`)."""
    return min(n, MOMENTS_PIECE) if _eager_cpu(device) else n


def _eager_cpu(device: torch.device) -> bool:
    """Whether work on ``device`` runs kernel by kernel on the CPU, where :func:`moments`
    goes through pieces and :func:`sum_of_squares` takes rows' norms (a compiled graph fuses
    the passes itself; a GPU keeps one kernel per pass)."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def _shifted_sums(flat: Tensor, shift: Tensor, scale: float, scratch: Tensor | None,
                  into: Sequence[Tensor]) -> None:
    """:func:`moments`' min, max, S1 and S2 of ``flat`` written ``into`` four 0-dim tensors."""
    lo, hi, s1, s2 = into
    # one read: on values fresh from a layer (not in the cache) a fifth faster than amin and
    # amax, on 128K to 512K values (a piece); only on 2M values in the cache is it slower
    torch.aminmax(flat, out=(lo, hi))
    d = torch.add(flat, shift, alpha=-scale, out=scratch) if scratch is not None else torch.add(flat, shift, alpha=-scale)
    torch.sum(d, 0, out=s1)
    # d is scratch or a fresh tensor, so it may be squared in place. A float32 torch.dot
    # accumulates sequentially and loses ~1e-3 of S2 on 2M elements; sum() is pairwise.
    torch.sum(d.square_(), 0, out=s2)


def row_moments(rows: Tensor) -> Tensor:
    """The rows ``[sum, S1, S2, min, max]`` of :func:`moments` for each row of a 2-D tensor,
    shifted by the row's mean ``sum / n`` (shape ``(rows, 5)``, the rows' dtype): the
    moments of the outputs the tracer keeps whole (at most twice ``sample_size`` values),
    computed for all of a step's outputs of one size at once, where per output they would
    cost five kernels. The sums are pairwise, as in :func:`moments`.

    >>> row_moments(torch.tensor([[1000.0, 1001.0, 1002.0]])).tolist()
    [[3003.0, 0.0, 2.0, 1000.0, 1002.0]]
    """
    total = rows.sum(1)
    d = rows - (total / rows.shape[1]).unsqueeze(1)
    lo, hi = rows.amin(1), rows.amax(1)  # torch.aminmax along a dimension is 15x slower on the CPU
    return torch.stack([total, d.sum(1), d.square_().sum(1), lo, hi], dim=1)


def row_derivative_stats(rows: Tensor, kind: Nonlinearity) -> Tensor:
    """Saturation (the fraction with ``|g| < SATURATION_THRESHOLD``) and gain (the mean of
    ``g``, a pairwise sum) of ``g = kind.derivative`` on each row of a 2-D tensor, shape
    ``(rows, 2)``, on the rows' device: the tracer's for the outputs it keeps whole, all
    outputs of one size and nonlinearity at once (:func:`derivative_stats` is the flush's,
    on the host, its gain averaged in float64)."""
    deriv = kind.derivative(rows)
    gain = deriv.sum(1)
    # 1.0 where saturated: a comparison into a float tensor is three times as fast as into a
    # bool one on the CPU, and summing it is exact (to 2**24 values a row)
    flags = torch.abs(deriv)
    torch.lt(flags, SATURATION_THRESHOLD, out=flags)
    return torch.stack([flags.sum(1), gain], dim=1) / rows.shape[1]


#: :func:`sum_of_squares` of at least this many values on the CPU, outside a compiled graph,
#: sums the squared norms of rows of :data:`NORM_ROW` values: one read of the tensor, where
#: squaring it first writes it once more (2M float32 values: 205 µs against 370). Below, the
#: squares fit in the cache and the write costs less than the rows' kernels. (A GPU keeps
#: the two kernels: not measured there.)
ROW_NORMS_FROM = 1 << 18

#: Values per row of :func:`sum_of_squares`'s norms: short enough that a row's norm stays
#: within ~2e-7 of float64 even on constant values (rows of 1024 lose 1e-6 there, the norm
#: of 2M values at once 3e-3), long enough that the rows' norms are one pass.
NORM_ROW = 128


def sum_of_squares(flat: Tensor, scratch: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``sum(flat**2)`` of a 1-D tensor as a 0-dim tensor (written into ``out`` when given),
    within ~2e-7 of float64 on millions of float32 values, where ``torch.dot`` and
    ``torch.linalg.vector_norm`` of the whole tensor lose ~5e-5: summed pairwise, or from the
    norms of short rows (:data:`ROW_NORMS_FROM`). ``scratch`` (``flat``'s dtype, at least
    :func:`scratch_size` values) receives the squares of a smaller tensor, sparing an
    allocation."""
    n = flat.numel()
    if n >= ROW_NORMS_FROM and _eager_cpu(flat.device):
        whole = n - n % NORM_ROW
        squares = torch.linalg.vector_norm(flat[:whole].view(-1, NORM_ROW), dim=1).square_()
        if whole < n:  # the last, shorter row
            squares = torch.cat([squares, torch.linalg.vector_norm(flat[whole:]).square().reshape(1)])
    else:
        squares = torch.mul(flat, flat, out=scratch[:n]) if scratch is not None else flat.square()
    return torch.sum(squares, 0, out=out) if out is not None else squares.sum()


def stacked_sums_of_squares(same: list[Tensor]) -> Tensor:
    """``sum(t**2)`` of each of ``same`` (tensors of one shape, dtype and device) as one
    tensor: one stack and one pairwise sum of the rows, in float32 (float64 for float64),
    where ``torch._foreach_norm`` costs a kernel per tensor (five times as long for 49
    gradients of 2048 values).

    >>> stacked_sums_of_squares([torch.ones(2, 2), torch.full((2, 2), 2.0)])
    tensor([ 4., 16.])
    """
    stacked = torch.stack(same).reshape(len(same), -1)
    if stacked.dtype not in (torch.float32, torch.float64):
        stacked = stacked.float()
    return stacked.square_().sum(1)


#: On the CPU, tensors of at most this many elements and of one shape are normed in one
#: stack (:func:`stacked_sums_of_squares`): there a kernel per tensor costs more than reading it.
STACK_LIMIT = 4096


@dataclass(frozen=True)
class NormPlan:
    """Which tensors of a list of known shapes :func:`norms` takes together: each of
    ``stacks`` (indices, as a list and a tensor) four or more tensors of one shape and
    dtype with at most :data:`STACK_LIMIT` elements, summed in one stack, when every tensor
    is on the CPU; ``rest`` by ``torch._foreach_norm``. Made once per layout by :meth:`of`."""

    stacks: tuple[tuple[list[int], Tensor], ...]
    rest: tuple[list[int], Tensor]

    @classmethod
    def of(cls, tensors: list[Tensor]) -> NormPlan:
        groups: dict[Any, list[int]] = {}
        cpu = all(t.device.type == "cpu" for t in tensors)
        for i, t in enumerate(tensors):
            groups.setdefault((t.shape, t.dtype) if cpu and t.numel() <= STACK_LIMIT else i, []).append(i)
        stacks = [g for g in groups.values() if len(g) >= 4]
        stacked = {i for g in stacks for i in g}
        rest = [i for i in range(len(tensors)) if i not in stacked]
        return cls(tuple((g, torch.tensor(g)) for g in stacks), (rest, torch.tensor(rest, dtype=torch.int64)))


def norms(tensors: list[Tensor], plan: NormPlan | None = None) -> Tensor:
    """The 2-norms of ``tensors`` as one tensor, accumulated and returned in float32, or
    float64 when one of them is float64 (``torch._foreach_norm`` alone returns a bfloat16
    tensor's norm in bfloat16, up to 0.4% off); ``plan`` (:class:`NormPlan`) stacks small
    tensors of one shape.

    >>> norms([torch.ones(4, dtype=torch.bfloat16), torch.ones(9)])
    tensor([2., 3.])
    """
    wide = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if plan is None or not plan.stacks:
        return _foreach_norms(tensors, wide)
    out = torch.empty(len(tensors), dtype=wide)
    for members, at in plan.stacks:
        out.index_copy_(0, at, stacked_sums_of_squares([tensors[i] for i in members]).to(wide).sqrt_())
    if plan.rest[0]:
        out.index_copy_(0, plan.rest[1], _foreach_norms([tensors[i] for i in plan.rest[0]], wide))
    return out


def _foreach_norms(tensors: list[Tensor], wide: torch.dtype) -> Tensor:
    try:
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=wide))
    except TypeError:  # torch < 2.3 has no dtype argument
        return torch.stack([torch.linalg.vector_norm(t, dtype=wide) for t in tensors])


def finish_moments(n: Any, c: Any, s1: Any, s2: Any) -> tuple[Any, Any]:
    """``(mean, M2)`` from the shifted sums of :func:`moments`, in float64: of numbers, or
    elementwise of numpy arrays (many calls, or the units of :func:`unit_sums`)."""
    mean = c + s1 / n
    m2 = np.maximum(s2 - s1 * s1 / n, 0.0)
    return mean, (float(m2) if np.ndim(m2) == 0 else m2)


def merge_moments(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    """Merge two ``(n, mean, M2)`` triples exactly (Chan, Golub and LeVeque 1979)."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    if n == 0:
        return 0, 0.0, 0.0
    delta = mb - ma
    return n, ma + delta * nb / n, m2a + m2b + delta * delta * na * nb / n


def sample_indices(numel: int, k: int, device: torch.device, seed: int = 0) -> Tensor:
    """Fixed positions to sample a tensor of ``numel`` elements: ``k`` uniform random ones
    (with replacement), or when ``numel <= k`` all of them in a random order, so that any
    prefix of a sample is a uniform random sample too (the percentiles use one). Drawn
    from a private generator, so the global RNG and training are untouched."""
    gen = torch.Generator().manual_seed(seed + numel)
    if numel <= k:
        return torch.randperm(numel, generator=gen).to(device)
    return torch.randint(numel, (k,), generator=gen).to(device)


_DRAWN: dict[tuple[int, int, torch.device], Tensor] = {}


def drawn_sample_indices(numel: int, k: int, device: torch.device) -> Tensor:
    """:func:`sample_indices` (seed 0), drawn once per ``(numel, k, device)`` and kept: every
    call returns the same tensor, to read only (every layer of one output size shares it)."""
    key = (numel, k, device)
    if key not in _DRAWN:
        _DRAWN[key] = sample_indices(numel, k, device)
    return _DRAWN[key]


def _fixed_sample_indices(numel: int, k: int, device: torch.device) -> Tensor:
    return drawn_sample_indices(numel, k, device).clone()  # an operator's output is its own tensor


if hasattr(torch.library, "custom_op"):  # torch >= 2.4
    #: :func:`sample_indices` as an operator that torch.compile keeps opaque, so that a
    #: compiled graph takes a sample without a ``torch.Generator`` in it (which breaks the
    #: graph). Before torch 2.4 it is a plain function, and the graph breaks there.
    fixed_sample_indices = torch.library.custom_op("covshift::fixed_sample_indices", mutates_args=())(
        _fixed_sample_indices)

    @fixed_sample_indices.register_fake
    def _(numel: int, k: int, device: torch.device) -> Tensor:
        return torch.empty(min(numel, k), dtype=torch.int64, device=device)
else:
    fixed_sample_indices = _fixed_sample_indices


def take_sample(flat: Tensor, idx: Tensor, out: Tensor | None = None) -> Tensor:
    """The values of ``flat`` at ``idx`` (a copy), written into ``out`` (of ``idx``'s size
    and ``flat``'s dtype) when given."""
    # index_select: advanced indexing (flat[idx]) costs up to 100x more on small CPU tensors
    return torch.index_select(flat, 0, idx, out=out) if out is not None else torch.index_select(flat, 0, idx)


#: Percentiles are the order statistics of the first (at most) this many values of a
#: sample, a uniform random sample themselves (:func:`sample_indices`). Sorting is the one
#: per-value cost that grows faster than the sample, and numpy's vectorised sort
#: (x86-simd-sort) sorts rows of up to 512 values about eight times faster per value than
#: rows of 1024.
PERCENTILE_VALUES = 512


def percentiles(rows: np.ndarray) -> np.ndarray:
    """``PERCENTILES`` of each row of a 2-D array by the lower method (numpy's
    ``method="lower"``: the element of rank ``floor((n-1)q)``, NaN sorting last) of its
    first :data:`PERCENTILE_VALUES` values."""
    ranked = np.sort(rows[:, :PERCENTILE_VALUES], axis=1)
    return ranked[:, [int((ranked.shape[1] - 1) * q) for q in PERCENTILES]]


def derivative_stats(source: np.ndarray, kind: Nonlinearity) -> np.ndarray:
    """Saturation (the fraction with ``|g| < SATURATION_THRESHOLD``) and gain (the mean of
    ``g``) of ``g = kind.derivative`` on each row of ``source``, shape ``(rows, 2)``. The
    derivative is computed in the rows' dtype and averaged in float64."""
    deriv = kind.derivative(torch.from_numpy(np.ascontiguousarray(source))).numpy()
    return np.stack([np.count_nonzero(np.abs(deriv) < SATURATION_THRESHOLD, axis=1) / source.shape[1],
                     deriv.mean(axis=1, dtype=np.float64)], axis=1)


def nonfinite_fraction(rows: np.ndarray) -> np.ndarray:
    """The fraction of NaN or infinite values in each row of a 2-D array."""
    finite = np.isfinite(rows)
    return np.zeros(len(rows)) if finite.all() else np.count_nonzero(~finite, axis=1) / rows.shape[1]


def sample_stats(samples: np.ndarray | Tensor, kind: Nonlinearity | None,
                 inputs: np.ndarray | None = None) -> np.ndarray:
    """``SAMPLE_FIELDS`` of each row of ``samples``, on the host (a 1-D input gives one
    row's values): :func:`percentiles`, saturation and gain (:func:`derivative_stats`) of
    ``samples``, or of ``inputs`` (the layer's input samples, same shape) for a
    ``kind.of_input``, and :func:`nonfinite_fraction`. Saturation and gain are NaN when
    ``kind`` is None or such a kind has no ``inputs``.

    Called at flush time on every buffered step at once, so training pays no per-step
    kernels for these.
    """
    if isinstance(samples, Tensor):
        samples = samples.detach().cpu().numpy()
    rows = np.atleast_2d(np.asarray(samples))
    out = np.full((rows.shape[0], len(SAMPLE_FIELDS)), np.nan)
    out[:, :3] = percentiles(rows)
    source = None if kind is None else (np.atleast_2d(inputs) if kind.of_input and inputs is not None
                                        else None if kind.of_input else rows)
    if source is not None:
        out[:, 3:5] = derivative_stats(source, kind)
    out[:, 5] = nonfinite_fraction(rows)
    return out[0] if np.ndim(samples) == 1 else out


def sample_error_bound(k: int, delta: float = 1e-3) -> float:
    """Largest error, with probability at least ``1 - delta``, of a fraction or percentile
    rank estimated from ``k`` uniform samples: ``sqrt(ln(2/delta) / (2k))``.

    It bounds every threshold fraction and quantile rank at once (Dvoretzky-Kiefer-Wolfowitz,
    with Massart's constant) and the mean of a quantity in [0, 1] such as the gain (Hoeffding).
    """
    return math.sqrt(math.log(2.0 / delta) / (2.0 * k))


#: On the CPU, outside a compiled graph, a per-unit reduction of an output of at least this
#: many values with more than two dimensions reduces the trailing dimensions first, then
#: the batch: one reduction over dimensions (0, 2, 3) of an NCHW tensor is slower (2M
#: float32 values: ``amax`` 422 against 149 µs, ``sum`` 215 against 129 µs; on small
#: tensors the second kernel costs more than it saves).
UNIT_SPLIT_FROM = 1 << 16


def _over_units(x: Tensor, reduce: Callable[..., Tensor]) -> Tensor:
    """``reduce`` (``torch.amax`` or ``torch.sum``) of ``x`` over every dimension but 1."""
    if x.dim() > 2 and x.numel() >= UNIT_SPLIT_FROM and _eager_cpu(x.device):
        return reduce(reduce(x, dim=tuple(range(2, x.dim()))), dim=0)
    return reduce(x, dim=[0, *range(2, x.dim())])


def unit_sums(x: Tensor) -> Tensor:
    """Per-unit (dim 1: features or channels) shifted sums, shape ``(3, units)``: the shift
    ``c_u`` (the unit's first value), ``sum(x_u - c_u)`` and ``sum((x_u - c_u)**2)``."""
    x = x.detach().float() if x.dtype not in (torch.float32, torch.float64) else x.detach()
    c = x.select(0, 0)
    while c.dim() > 1:
        c = c.select(1, 0)
    shape = [1, -1] + [1] * (x.dim() - 2)
    d = x - c.view(shape)
    s1 = _over_units(d, torch.sum)
    return torch.stack([c, s1, _over_units(d.mul_(d), torch.sum)])  # squared in place: one output-sized allocation, not two


def unit_max(x: Tensor) -> Tensor:
    """Per-unit maximum over every dimension but 1; a ReLU unit is dead when it is <= 0."""
    return _over_units(x.detach(), torch.amax)


def hist_edges(lo: float, hi: float, kind: Nonlinearity | None, bins: int) -> np.ndarray:
    """``bins + 1`` fixed bin edges for a layer, chosen from its first recorded step.

    A bounded nonlinearity uses its output range. Otherwise the first step's range
    ``[lo, hi]`` is widened by a quarter of its width on each side, so drift stays
    visible before it reaches the under/overflow bins.
    """
    steps = np.linspace(0.0, 1.0, bins + 1)
    if kind is not None and kind.low is not None and kind.high is not None:
        return kind.low + (kind.high - kind.low) * steps
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = -1.0, 1.0
    width = hi - lo if hi > lo else 1.0
    return (lo - width / 4) + (width * 1.5) * steps


def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``values`` in ``[underflow, bin_1, ..., bin_B, overflow]``; bins are
    closed on the left, the last one on both sides. Non-finite values are left out."""
    values = values[np.isfinite(values)]
    bins = len(edges) - 1
    idx = np.searchsorted(edges, values, side="right")  # 0: below, 1..bins: inside, bins+1: above
    idx[values == edges[-1]] = bins
    return np.bincount(idx, minlength=bins + 2)
