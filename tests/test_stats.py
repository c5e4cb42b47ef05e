"""Tests of the statistic kernels in covshift.stats.

Every kernel is checked against an independent reference: numpy in float64 on the same
values, or torch.autograd in float64 for the local derivatives of the nonlinearities.
No expected value is hard-coded and no expected value comes from covshift itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch import nn

from covshift import stats

CPU = torch.device("cpu")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample_mean_shift(flat: torch.Tensor) -> torch.Tensor:
    """The shift the tracer passes to moments(): the mean of the tensor's fixed subsample."""
    return stats.take_sample(flat, stats.sample_indices(flat.numel(), 4096, CPU)).mean()


SHIFTS = {
    "sample_mean": sample_mean_shift,
    "first": lambda flat: flat[0],
}


def finished(flat: torch.Tensor, shift: torch.Tensor | None = None,
             scratch: torch.Tensor | None = None) -> tuple[float, float, float, float]:
    """(mean, population variance, min, max) through moments + finish_moments."""
    if shift is None:
        shift = sample_mean_shift(flat)
    c, s1, s2, lo, hi = stats.moments(flat, shift, scratch).double().tolist()
    mean, m2 = stats.finish_moments(flat.numel(), c, s1, s2)
    return mean, m2 / flat.numel(), lo, hi


def sample_stats(sample, kind, inputs=None) -> np.ndarray:
    """stats.sample_stats as a float64 numpy array (whether it returns a tensor or an array)."""
    out = stats.sample_stats(sample, kind, inputs)
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().double().numpy()
    return np.asarray(out, dtype=np.float64)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------------- moments


class Written(TorchDispatchMode):
    """The sizes of the tensors that the operators run inside it write: their outputs, less
    views of ``sources``."""

    def __init__(self, *sources: torch.Tensor):
        super().__init__()
        self.sources, self.sizes = {t.untyped_storage().data_ptr() for t in sources}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.sizes += [t.numel() for t in tree_leaves(result)
                       if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.sources]
        return result


MOMENT_CASES = {
    "normal": lambda g: torch.randn(100_000, generator=g),
    "offset_1000": lambda g: 1000.0 + 0.001 * torch.randn(2_000_000, generator=g),
    "saturated_sigmoid": lambda g: 0.999 + 0.001 * torch.randn(2_000_000, generator=g),
    "small": lambda g: torch.randn(7, generator=g) * 3 - 5,
    "relu_2m": lambda g: torch.relu(torch.randn(2_000_000, generator=g)),
}


@pytest.mark.parametrize("case", ["relu", "saturated_sigmoid"])
def test_moments_of_bfloat16_outputs_match_float64(case):
    """A bfloat16 output is converted to float32 (flat_float) and summed there: mean and
    variance within 1e-6 of float64 computed on the very same bfloat16 values."""
    g = gen(3)
    x = torch.randn(2_000_000, generator=g)
    y = (torch.relu(x) if case == "relu" else torch.sigmoid(7.0 + 0.5 * x)).bfloat16()
    ref = y.double().numpy()
    mean, var, lo, hi = finished(stats.flat_float(y))
    assert abs(mean - ref.mean()) < 1e-6 * (abs(ref.mean()) + ref.std())
    assert rel(var, ref.var()) < 1e-6
    assert (lo, hi) == (ref.min(), ref.max())


@pytest.mark.parametrize("use_scratch", [False, True])
@pytest.mark.parametrize("case", ["gradient", "constant", "odd_length", "float64", "below_rows"])
def test_sum_of_squares_matches_float64(use_scratch, case):
    """The gradient's sum of squares (grad_norm, grad_rms) is within 1e-6 of float64 on
    millions of values, from the norms of short rows (a last shorter row when the length is
    not a multiple), or summed pairwise below ROW_NORMS_FROM; constant values are the worst
    case of a norm's accumulation, where the norm of the whole tensor loses 3e-3."""
    n = {"odd_length": 4_000_037, "below_rows": stats.ROW_NORMS_FROM - 1}.get(case, 4_000_000)
    g = 1e-3 * torch.randn(n, generator=gen(4), dtype=torch.float64 if case == "float64" else torch.float32) + 2e-3
    if case == "constant":
        g = torch.full((n,), 1.7)
    ref = float(np.square(g.double().numpy()).sum())
    out = torch.empty((), dtype=g.dtype)
    got = stats.sum_of_squares(g, torch.empty_like(g) if use_scratch else None, out=out)
    assert got is out
    assert rel(float(out), ref) < 1e-6
    assert rel(float(stats.sum_of_squares(g)), ref) < 1e-6
    if case in ("gradient", "constant"):  # the kernels it replaces are not exact here
        assert rel(float(torch.dot(g, g)), ref) > 1e-6
        assert rel(float(torch.linalg.vector_norm(g)) ** 2, ref) > 1e-6


def test_sum_of_squares_of_a_large_tensor_writes_nothing_of_its_size():
    """Above ROW_NORMS_FROM the tensor is read once, by the rows' norms: no kernel writes a
    tensor of its size (squaring it first would), with or without a scratch buffer. Fails
    with the squares summed pairwise at every size."""
    n = stats.ROW_NORMS_FROM + 5
    g = torch.randn(n, generator=gen(6))
    for scratch in (None, torch.empty_like(g)):
        with Written(g) as seen:
            stats.sum_of_squares(g, scratch, out=torch.empty(()))
        assert seen.sizes and max(seen.sizes) <= n // stats.NORM_ROW + 1
    with Written(g) as seen:  # below, the squares are written
        stats.sum_of_squares(g[: stats.ROW_NORMS_FROM - 1])
    assert max(seen.sizes) == stats.ROW_NORMS_FROM - 1


@pytest.mark.parametrize("use_scratch", [False, True], ids=["no_scratch", "scratch"])
@pytest.mark.parametrize("shift", list(SHIFTS))
@pytest.mark.parametrize("case", list(MOMENT_CASES))
def test_moments_match_numpy(case, shift, use_scratch):
    x = MOMENT_CASES[case](gen(1))
    ref = x.double().numpy()
    c = SHIFTS[shift](x)
    scratch = torch.empty_like(x) if use_scratch else None
    mean, var, lo, hi = finished(x, c, scratch)
    assert abs(mean - ref.mean()) < 1e-6 * (abs(ref.mean()) + ref.std())
    assert rel(var, ref.var()) < 1e-6
    # min and max are values of the tensor: exact
    assert lo == ref.min()
    assert hi == ref.max()
    if use_scratch:  # the shifted values go into the scratch buffer: only the results are allocated
        with Written(x, scratch) as seen:
            stats.moments(x, c, scratch)
        assert max(seen.sizes) <= 4 * math.ceil(x.numel() / stats.MOMENTS_PIECE) + 1  # a piece's 4, and 5 at most


@pytest.mark.parametrize("case", ["offset_1000", "saturated_sigmoid"])
def test_naive_float32_variance_fails_where_shift_succeeds(case):
    """The cases above are hard: E[x^2] - E[x]^2 in float32 is far off on them, so the
    < 1e-3 accuracy of moments() really comes from the shift.

    With a one-pass float32 accumulator (numpy's cumsum adds sequentially) the naive
    variance is off by far more than 10%. Even with torch's pairwise sums the final
    E[x^2] - E[x]^2 of two numbers near 0.998 keeps only a few float32 ulps (6e-8 each)
    of a 1e-6 variance, so it misses the 1e-3 accuracy that the shift achieves.
    """
    x = MOMENT_CASES[case](gen(1))
    ref = x.double().numpy().var()
    a = x.numpy()
    n32 = np.float32(a.size)
    seq_mean = np.cumsum(a, dtype=np.float32)[-1] / n32
    seq_sq = np.cumsum(a * a, dtype=np.float32)[-1] / n32
    assert rel(float(seq_sq - seq_mean * seq_mean), ref) > 0.1
    pairwise = float((x * x).mean() - x.mean() ** 2)
    assert rel(pairwise, ref) > 1e-2
    _, var, _, _ = finished(x)
    assert rel(var, ref) < 1e-3


def test_moments_float64_input():
    g = gen(2)
    x = (1e6 + 1e-3 * torch.randn(50_000, generator=g, dtype=torch.float64))
    out = stats.moments(x, sample_mean_shift(x))
    assert out.dtype == torch.float64
    ref = x.numpy()
    mean, var, lo, hi = finished(x)
    assert rel(mean, ref.mean()) < 1e-14
    assert rel(var, ref.var()) < 1e-6
    assert lo == ref.min() and hi == ref.max()


@pytest.mark.parametrize("shift", [0.0, 7.25, -3.0])
def test_moments_shift_sums_definition(shift):
    """[c, S1, S2, min, max] with the given shift c, against float64 numpy sums."""
    x = torch.randn(1000, generator=gen(3), dtype=torch.float64) + 7.0
    c, s1, s2, lo, hi = stats.moments(x, torch.tensor(shift)).tolist()
    ref = x.numpy()
    d = ref - shift
    assert c == shift
    assert s1 == pytest.approx(d.sum(), rel=1e-12, abs=1e-9)
    assert s2 == pytest.approx((d * d).sum(), rel=1e-12)
    assert (lo, hi) == (ref.min(), ref.max())
    mean, m2 = stats.finish_moments(len(ref), c, s1, s2)
    assert mean == pytest.approx(ref.mean(), rel=1e-13)
    assert m2 / len(ref) == pytest.approx(ref.var(), rel=1e-11)


def test_finish_moments_exact_small():
    vals = np.array([3.5, -1.25, 10.0, 2.0])
    x = torch.tensor(vals, dtype=torch.float64)
    mean, var, _, _ = finished(x)
    assert mean == pytest.approx(vals.mean(), rel=1e-15)
    assert var == pytest.approx(vals.var(), rel=1e-14)


def test_flat_float():
    x = torch.randn(3, 4, 5, generator=gen(4)).to(torch.float16).transpose(0, 2)  # non-contiguous half
    f = stats.flat_float(x)
    assert f.dtype == torch.float32 and f.dim() == 1
    np.testing.assert_array_equal(f.numpy(), x.numpy().astype(np.float32).reshape(-1))
    y = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    fy = stats.flat_float(y * 2)
    assert fy.dtype == torch.float64 and not fy.requires_grad
    np.testing.assert_array_equal(fy.numpy(), (y.detach().numpy() * 2).reshape(-1))


# --------------------------------------------------------------------------- merge


def np_triple(a: np.ndarray) -> tuple[int, float, float]:
    return len(a), float(a.mean()), float(((a - a.mean()) ** 2).sum())


def test_merge_moments_chunks():
    rng = np.random.default_rng(5)
    chunks = [
        rng.normal(0.0, 1.0, 13),
        rng.normal(1e4, 0.5, 1000),
        rng.normal(-300.0, 20.0, 1),
        rng.exponential(2.0, 257),
        rng.normal(1e-3, 1e-6, 4096),
    ]
    merged = (0, 0.0, 0.0)
    for ch in chunks:
        merged = stats.merge_moments(merged, np_triple(ch))
    full = np.concatenate(chunks)
    n, mean, m2 = merged
    assert n == len(full)
    assert mean == pytest.approx(full.mean(), rel=1e-12)
    assert m2 / n == pytest.approx(full.var(), rel=1e-10)
    # a different merge order (tree instead of left fold) agrees too
    left = stats.merge_moments(np_triple(chunks[0]), np_triple(chunks[1]))
    right = stats.merge_moments(np_triple(chunks[2]), stats.merge_moments(np_triple(chunks[3]), np_triple(chunks[4])))
    n2, mean2, m22 = stats.merge_moments(left, right)
    assert n2 == len(full)
    assert mean2 == pytest.approx(full.mean(), rel=1e-12)
    assert m22 / n2 == pytest.approx(full.var(), rel=1e-10)


def test_merge_moments_through_moments_kernel():
    """Per-chunk moments() (float32) + finish_moments + merge_moments == numpy on the concatenation."""
    g = gen(6)
    chunks = [
        torch.randn(5000, generator=g) + 100.0,
        0.01 * torch.randn(123, generator=g) - 40.0,
        torch.rand(70_000, generator=g),
    ]
    merged = (0, 0.0, 0.0)
    for ch in chunks:
        c, s1, s2, _, _ = stats.moments(ch, sample_mean_shift(ch)).double().tolist()
        merged = stats.merge_moments(merged, (ch.numel(), *stats.finish_moments(ch.numel(), c, s1, s2)))
    full = torch.cat(chunks).double().numpy()
    n, mean, m2 = merged
    assert n == len(full)
    assert rel(mean, full.mean()) < 1e-6
    assert rel(m2 / n, full.var()) < 1e-5


def test_merge_moments_empty():
    rng = np.random.default_rng(7)
    t = np_triple(rng.normal(3.0, 2.0, 50))
    assert stats.merge_moments((0, 0.0, 0.0), t) == pytest.approx(t, rel=1e-15)
    assert stats.merge_moments(t, (0, 0.0, 0.0)) == pytest.approx(t, rel=1e-15)
    assert stats.merge_moments((0, 0.0, 0.0), (0, 0.0, 0.0)) == (0, 0.0, 0.0)


# --------------------------------------------------------------------------- percentiles


@pytest.mark.parametrize("n", [1, 2, 3, 7, 20, 21, 100, 101, 513, 1000, 1024, 1025, 2048, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_percentiles_whole_tensor_equal_numpy_lower(n, dtype):
    """A tensor of up to sample_size elements is sampled whole, in a fixed random order:
    its percentiles are exact up to PERCENTILE_VALUES elements, and beyond they are exact
    on the sample's first PERCENTILE_VALUES values, a random subset."""
    g = gen(100 + n)
    x = torch.randn(n, generator=g, dtype=dtype)
    if n >= 20:  # with ties
        x[: n // 4] = 0.5
    idx = stats.sample_indices(n, 4096, CPU)
    assert sorted(idx.tolist()) == list(range(n))  # every element once
    sample = stats.take_sample(x, idx)
    out = sample_stats(sample, None)
    ref = x.double().numpy()[idx.numpy()[: stats.PERCENTILE_VALUES]]
    if n <= stats.PERCENTILE_VALUES:
        assert sorted(ref) == sorted(x.double().tolist())
    for i, q in enumerate(stats.PERCENTILES):
        assert out[i] == np.percentile(ref, 100 * q, method="lower"), (n, q)


def test_percentiles_all_small_sizes():
    rng = np.random.default_rng(8)
    for n in range(1, 300):
        ref = rng.normal(size=n)
        out = sample_stats(torch.tensor(ref), None)
        expect = np.percentile(ref, [15, 50, 85], method="lower")
        np.testing.assert_array_equal(out[:3], expect, err_msg=f"n={n}")


def test_sample_stats_rows_are_independent_samples():
    """A 2-D input (one pooled sample per step) gives each row's fields, as numpy does per row."""
    g = gen(40)
    x = 3.0 * torch.randn(6, 301, generator=g, dtype=torch.float64)
    x[2] += 50.0
    x[4, :7] = math.nan
    module = nn.Sigmoid()
    y = module(x)
    kind = stats.nonlinearity(module)
    out = np.asarray(stats.sample_stats(y.numpy(), kind), dtype=np.float64)
    assert out.shape == (6, len(stats.SAMPLE_FIELDS))
    yn = y.numpy()
    deriv_rel = reference_derivative(module, x) / 0.25
    for r in range(6):
        fin = np.isfinite(yn[r])
        if fin.all():
            np.testing.assert_array_equal(out[r, :3], np.percentile(yn[r], [15, 50, 85], method="lower"))
            assert abs(out[r, 3] - (deriv_rel[r] < 0.1).mean()) <= 1e-12
            assert abs(out[r, 4] - deriv_rel[r].mean()) <= 1e-12
        assert out[r, 5] == (~fin).mean()
        np.testing.assert_array_equal(out[r], sample_stats(y[r], kind))  # same as the row alone


def _bimodal(g: torch.Generator, n: int) -> torch.Tensor:
    side = torch.rand(n, generator=g) < 0.3
    return torch.where(side, -5.0 + 0.5 * torch.randn(n, generator=g), 4.0 + torch.randn(n, generator=g))


LARGE_CASES = {
    "normal": lambda g, n: torch.randn(n, generator=g),
    "exponential": lambda g, n: torch.empty(n).exponential_(1.0, generator=g),
    "relu_half_zero": lambda g, n: torch.relu(torch.randn(n, generator=g)),
    "bimodal": _bimodal,
}


@pytest.mark.parametrize("case", list(LARGE_CASES))
def test_sampled_percentile_rank_within_bound(case):
    n, k = 1_000_000, 4096
    x = LARGE_CASES[case](gen(9), n)
    idx = stats.sample_indices(n, k, CPU)
    assert idx is not None and idx.shape == (k,)
    sample = stats.take_sample(x, idx)
    out = sample_stats(sample, None)
    full = np.sort(x.double().numpy())
    m = stats.PERCENTILE_VALUES  # the percentiles come from this many of the sample's values
    eps = stats.sample_error_bound(m) + 1.0 / n + 1.0 / m
    for i, q in enumerate(stats.PERCENTILES):
        v = out[i]
        # rank of v in the full tensor; with ties (ReLU zeros) it is the interval
        # [fraction < v, fraction <= v], which must come within eps of q
        below = np.searchsorted(full, v, side="left") / n
        at_or_below = np.searchsorted(full, v, side="right") / n
        assert below - eps <= q <= at_or_below + eps, (case, q, v, below, at_or_below, eps)
    if case == "relu_half_zero":  # the tie case really is a tie: p15 is the zero
        assert out[0] == 0.0


def test_sampled_saturation_and_gain_within_bound():
    """Saturation and gain of the subsample estimate those of the full tensor."""
    n, k = 1_000_000, 4096
    x = 3.0 * torch.randn(n, generator=gen(10), dtype=torch.float64)
    module = nn.Sigmoid()
    deriv_rel = reference_derivative(module, x) / 0.25
    y = module(x).float()
    idx = stats.sample_indices(n, k, CPU)
    out = sample_stats(stats.take_sample(y, idx), stats.nonlinearity(module))
    eps = stats.sample_error_bound(k) + 1.0 / n
    assert abs(out[3] - (deriv_rel < 0.1).mean()) <= eps
    assert abs(out[4] - deriv_rel.mean()) <= eps


def test_sampled_nonfinite_within_bound():
    n, k = 1_000_000, 4096
    g = gen(31)
    y = torch.randn(n, generator=g)
    bad = torch.randperm(n, generator=g)[:30_000]
    y[bad[:10_000]] = math.nan
    y[bad[10_000:20_000]] = math.inf
    y[bad[20_000:]] = -math.inf
    ref = float((~np.isfinite(y.numpy())).mean())
    idx = stats.sample_indices(n, k, CPU)
    out = sample_stats(stats.take_sample(y, idx), None)
    assert abs(out[5] - ref) <= stats.sample_error_bound(k) + 1.0 / n
    assert out[5] > 0


def test_sample_error_bound_formula():
    for k in (1, 10, 4096, 100_000):
        for delta in (1e-3, 0.05, 0.5):
            expect = np.sqrt(np.log(2.0 / delta) / (2.0 * k))
            assert stats.sample_error_bound(k, delta) == pytest.approx(expect, rel=1e-12)
        assert stats.sample_error_bound(k) == pytest.approx(np.sqrt(np.log(2.0 / 1e-3) / (2.0 * k)), rel=1e-12)
    assert stats.sample_error_bound(4096) < stats.sample_error_bound(1024)


def test_sample_indices_deterministic_and_private_rng():
    torch.manual_seed(1234)
    before = torch.random.get_rng_state().clone()
    a = stats.sample_indices(1_000_000, 4096, CPU)
    b = stats.sample_indices(1_000_000, 4096, CPU)
    after = torch.random.get_rng_state()
    assert torch.equal(before, after)
    assert torch.equal(a, b)
    assert a.shape == (4096,) and a.dtype == torch.int64
    assert int(a.min()) >= 0 and int(a.max()) < 1_000_000
    # the next global draw is what it would have been without sample_indices
    r1 = torch.rand(5)
    torch.random.set_rng_state(before)
    r2 = torch.rand(5)
    assert torch.equal(r1, r2)
    # positions spread over the tensor (uniform): each tenth holds about a tenth of them
    counts = np.bincount(a.numpy() // 100_000, minlength=10)
    assert counts.min() > 300 and counts.max() < 520
    whole = stats.sample_indices(4096, 4096, CPU)  # a fixed permutation: the whole tensor, shuffled
    assert sorted(whole.tolist()) == list(range(4096)) and whole.tolist() != list(range(4096))
    assert whole.tolist() == stats.sample_indices(4096, 4096, CPU).tolist()
    assert sorted(stats.sample_indices(10, 4096, CPU).tolist()) == list(range(10))
    assert stats.sample_indices(4097, 4096, CPU).shape == (4096,)


def test_take_sample():
    x = torch.randn(100, generator=gen(11))
    idx = torch.tensor([5, 5, 99, 0, 42])
    sample = stats.take_sample(x, idx)
    np.testing.assert_array_equal(sample.numpy(), x.numpy()[idx.numpy()])
    sample[0] = 123.0  # a copy: the tensor is untouched
    assert x[5] != 123.0
    buffer = torch.zeros(8)
    assert stats.take_sample(x, idx, out=buffer[2:7]).data_ptr() == buffer[2:7].data_ptr()
    np.testing.assert_array_equal(buffer.numpy(), [0, 0, *x.numpy()[idx.numpy()], 0])


# --------------------------------------------------------------------------- saturation and gain


NONLINEARITIES = [
    # (id, module, max derivative, scale and offset of x, kinks to keep x away from)
    ("sigmoid", nn.Sigmoid(), 0.25, 4.0, 0.0, []),
    ("tanh", nn.Tanh(), 1.0, 2.0, 0.0, []),
    ("softsign", nn.Softsign(), 1.0, 5.0, 0.0, []),
    ("relu", nn.ReLU(), 1.0, 1.0, 0.0, [0.0]),
    ("relu6", nn.ReLU6(), 1.0, 4.0, 3.0, [0.0, 6.0]),
    ("hardtanh", nn.Hardtanh(), 1.0, 1.5, 0.0, [-1.0, 1.0]),
    ("hardtanh_m2_3", nn.Hardtanh(-2.0, 3.0), 1.0, 3.0, 0.0, [-2.0, 3.0]),
    ("leaky_0.01", nn.LeakyReLU(0.01), 1.0, 1.0, 0.0, [0.0]),
    ("leaky_0.2", nn.LeakyReLU(0.2), 1.0, 1.0, 0.0, [0.0]),
    ("elu_1", nn.ELU(1.0), 1.0, 3.0, 0.0, [0.0]),
    ("elu_0.5", nn.ELU(0.5), 1.0, 3.0, 0.0, [0.0]),
    ("softplus_1", nn.Softplus(1.0), 1.0, 4.0, 0.0, []),
    ("softplus_2", nn.Softplus(2.0), 1.0, 4.0, 0.0, []),
]


def reference_derivative(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    """dy/dx of an elementwise module by autograd in float64, at the points x."""
    xx = x.detach().double().clone().requires_grad_(True)
    (d,) = torch.autograd.grad(module(xx).sum(), xx)
    return d.numpy()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "name,module,top,scale,offset,kinks", NONLINEARITIES, ids=[c[0] for c in NONLINEARITIES]
)
def test_saturation_and_gain_match_autograd(name, module, top, scale, offset, kinks, dtype):
    n = 3000
    x = offset + scale * torch.randn(n, generator=gen(12), dtype=dtype)
    for kink in kinks:
        assert not bool((x == kink).any())
    y = module(x)
    idx = stats.sample_indices(y.numel(), 4096, CPU)
    assert sorted(idx.tolist()) == list(range(y.numel()))  # used whole
    kind = stats.nonlinearity(module)
    assert kind is not None
    out = sample_stats(stats.take_sample(y.reshape(-1), idx), kind)
    deriv_rel = reference_derivative(module, x) / top
    ref_sat = float((deriv_rel < 0.1).mean())
    ref_gain = float(deriv_rel.mean())
    assert abs(out[3] - ref_sat) <= 1e-5, (out[3], ref_sat)
    assert abs(out[4] - ref_gain) <= 1e-5, (out[4], ref_gain)
    # the data exercise both sides of the threshold where the function has them
    if name not in ("leaky_0.2",):
        assert 0.0 < ref_sat < 1.0


def test_leaky_relu_large_slope():
    """max derivative is max(1, slope): for slope 3 the negative side is the top."""
    module = nn.LeakyReLU(3.0)
    x = torch.randn(2000, generator=gen(13), dtype=torch.float64)
    out = sample_stats(module(x), stats.nonlinearity(module))
    deriv_rel = reference_derivative(module, x) / 3.0
    assert abs(out[3] - (deriv_rel < 0.1).mean()) <= 1e-5
    assert abs(out[4] - deriv_rel.mean()) <= 1e-5


def test_elu_large_alpha():
    module = nn.ELU(2.0)
    x = 3.0 * torch.randn(2000, generator=gen(14), dtype=torch.float64)
    out = sample_stats(module(x), stats.nonlinearity(module))
    deriv_rel = reference_derivative(module, x) / 2.0
    assert abs(out[3] - (deriv_rel < 0.1).mean()) <= 1e-5
    assert abs(out[4] - deriv_rel.mean()) <= 1e-5


def test_glorot_bengio_sigmoid_near_003():
    """Sigmoid outputs all near 0.03 (Glorot & Bengio 2010): barely any unit is saturated
    by the 10% rule, yet the mean gain is only about 0.11."""
    g = gen(15)
    target = 0.03 + 0.002 * (2 * torch.rand(2000, generator=g, dtype=torch.float64) - 1)
    x = torch.log(target / (1 - target))  # logit
    module = nn.Sigmoid()
    y = module(x)
    out = sample_stats(y, stats.nonlinearity(module))
    deriv_rel = reference_derivative(module, x) / 0.25
    assert abs(out[3] - (deriv_rel < 0.1).mean()) <= 1e-5
    assert abs(out[4] - deriv_rel.mean()) <= 1e-5
    assert out[3] < 0.05
    assert 0.10 < out[4] < 0.13


INPUT_NONLINEARITIES = [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()]


@pytest.mark.parametrize("module", INPUT_NONLINEARITIES, ids=lambda m: repr(m))
def test_gelu_and_silu_saturation_and_gain_from_the_input_match_autograd(module):
    """g = f'(x) / max f' by autograd (the max on a 1e-4 grid); saturation counts |g| < 0.1."""
    x = 2.0 * torch.randn(3000, generator=gen(17), dtype=torch.float64)
    kind = stats.nonlinearity(module)
    assert kind.of_input and kind.low is None and not kind.relu_family
    top = reference_derivative(module, torch.linspace(-10, 10, 200_001, dtype=torch.float64)).max()
    deriv_rel = reference_derivative(module, x) / top
    assert deriv_rel.min() < 0  # GELU and SiLU dip below zero: saturation is on |g|
    out = sample_stats(module(x), kind, x.numpy())
    assert abs(out[3] - (np.abs(deriv_rel) < 0.1).mean()) <= 1e-9
    assert abs(out[4] - deriv_rel.mean()) <= 1e-9
    assert 0.0 < out[3] < 1.0
    without = sample_stats(module(x), kind)  # no input sample: not computed
    assert math.isnan(without[3]) and math.isnan(without[4])


@pytest.mark.parametrize("module", [nn.Linear(2, 2), nn.Mish(), nn.Hardswish(), nn.Identity()], ids=lambda m: type(m).__name__)
def test_unknown_nonlinearity_gives_nan(module):
    assert stats.nonlinearity(module) is None
    x = torch.randn(500, generator=gen(16))
    out = sample_stats(x, None)
    assert math.isnan(out[3]) and math.isnan(out[4])
    assert out[5] == 0.0
    np.testing.assert_array_equal(out[:3], np.percentile(x.double().numpy(), [15, 50, 85], method="lower"))


def test_nonlinearity_metadata():
    assert stats.nonlinearity(nn.ReLU6()).name == "relu6"  # not taken for its Hardtanh base
    assert stats.nonlinearity(nn.ReLU()).relu_family
    assert stats.nonlinearity(nn.ReLU6()).relu_family
    assert stats.nonlinearity(nn.LeakyReLU()).relu_family
    assert not stats.nonlinearity(nn.Sigmoid()).relu_family
    ht = stats.nonlinearity(nn.Hardtanh(-2.0, 3.0))
    assert (ht.low, ht.high) == (-2.0, 3.0)


# --------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nonfinite_fraction(dtype):
    n = 1000
    x = torch.randn(n, generator=gen(17), dtype=dtype)
    pos = torch.randperm(n, generator=gen(18))
    x[pos[:7]] = math.nan
    x[pos[7:12]] = math.inf
    x[pos[12:15]] = -math.inf
    ref = float((~np.isfinite(x.numpy())).sum()) / n
    out = sample_stats(x, stats.nonlinearity(nn.Tanh()))
    assert out[5] == pytest.approx(ref, rel=1e-6)
    assert ref == pytest.approx(15 / n)
    clean = torch.randn(n, generator=gen(19), dtype=dtype)
    assert sample_stats(clean, None)[5] == 0.0


# --------------------------------------------------------------------------- histogram


def reference_histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    fin = values[np.isfinite(values)].astype(np.float64)
    inner, _ = np.histogram(fin, bins=edges.astype(np.float64))
    return np.concatenate([[np.sum(fin < edges[0])], inner, [np.sum(fin > edges[-1])]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_histogram_matches_numpy(dtype):
    edges = np.linspace(-1.0, 1.0, 9)
    x = (0.8 * torch.randn(5000, generator=gen(20), dtype=torch.float64)).numpy().astype(dtype)
    # values exactly on every edge (twice), and non-finite ones that must be left out
    special = np.concatenate([edges, edges, [math.nan, math.inf, -math.inf, math.nan]]).astype(dtype)
    x = np.concatenate([x, special])
    counts = np.asarray(stats.histogram(x, edges))
    assert np.issubdtype(counts.dtype, np.integer) and counts.shape == (len(edges) + 1,)
    ref = reference_histogram(x, edges)
    np.testing.assert_array_equal(counts, ref)
    assert int(counts.sum()) == int(np.isfinite(x).sum())
    assert ref[0] > 0 and ref[-1] > 0  # under- and overflow are exercised


def test_histogram_edge_values_closed_left_last_closed():
    edges = np.array([0.0, 1.0, 2.0, 3.0])
    x = np.array([0.0, 1.0, 2.0, 3.0, -1e-7, 3.0000002, 0.5, np.nextafter(3.0, 4.0), np.nextafter(0.0, -1.0)])
    counts = np.asarray(stats.histogram(x, edges))
    np.testing.assert_array_equal(counts, reference_histogram(x, edges))


def test_histogram_with_hist_edges_sigmoid():
    """Saturated sigmoid outputs (exactly 0 and 1 in float32) land in the end bins, not in
    under/overflow, since the last bin is closed."""
    x = torch.cat([10.0 * torch.randn(4000, generator=gen(21)), torch.tensor([-200.0, 200.0])])
    y = torch.sigmoid(x)
    assert bool((y == 1.0).any()) and bool((y == 0.0).any())
    kind = stats.nonlinearity(nn.Sigmoid())
    _, _, _, lo, hi = stats.moments(y, sample_mean_shift(y)).tolist()
    edges = np.asarray(stats.hist_edges(lo, hi, kind, 20), dtype=np.float64)
    counts = np.asarray(stats.histogram(y.numpy(), edges))
    ref = reference_histogram(y.numpy(), edges)
    np.testing.assert_array_equal(counts, ref)
    assert counts[0] == 0 and counts[-1] == 0


def edges_of(lo: float, hi: float, kind, bins: int) -> np.ndarray:
    return np.asarray(stats.hist_edges(lo, hi, kind, bins), dtype=np.float64)


@pytest.mark.parametrize(
    "module,low,high",
    [(nn.Sigmoid(), 0.0, 1.0), (nn.Tanh(), -1.0, 1.0), (nn.Softsign(), -1.0, 1.0),
     (nn.ReLU6(), 0.0, 6.0), (nn.Hardtanh(-2.0, 3.0), -2.0, 3.0)],
    ids=["sigmoid", "tanh", "softsign", "relu6", "hardtanh"],
)
def test_hist_edges_bounded(module, low, high):
    bins = 16
    edges = edges_of(0.3, 0.4, stats.nonlinearity(module), bins)
    np.testing.assert_allclose(edges, np.linspace(low, high, bins + 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind_module", [None, nn.ReLU(), nn.ELU(), nn.LeakyReLU(), nn.Softplus()],
                         ids=["none", "relu", "elu", "leaky", "softplus"])
@pytest.mark.parametrize("lo,hi", [(-2.0, 3.0), (0.0, 7.5), (100.0, 100.5), (-1e-3, -5e-4)])
def test_hist_edges_widened_range(kind_module, lo, hi):
    bins = 12
    kind = None if kind_module is None else stats.nonlinearity(kind_module)
    edges = edges_of(lo, hi, kind, bins)
    w = hi - lo
    expect = np.linspace(lo - w / 4, hi + w / 4, bins + 1)
    assert edges.shape == (bins + 1,)
    np.testing.assert_allclose(edges, expect, rtol=1e-6, atol=1e-6 * max(abs(lo), abs(hi)))


@pytest.mark.parametrize(
    "lo,hi",
    [(2.5, 2.5), (0.0, 0.0), (-40.0, -40.0), (math.nan, math.nan), (math.nan, 1.0), (-3.0, math.nan),
     (-math.inf, math.inf), (math.inf, math.inf), (-3.0, math.inf), (-math.inf, 5.0)],
)
def test_hist_edges_degenerate(lo, hi):
    bins = 10
    edges = edges_of(lo, hi, None, bins)
    assert edges.shape == (bins + 1,)
    assert np.all(np.isfinite(edges))
    assert np.all(np.diff(edges) > 0)
    if lo == hi and math.isfinite(lo):  # the one value lies inside the range
        assert edges[0] < lo < edges[-1]


# --------------------------------------------------------------------------- per-unit


def finish_units(sums: torch.Tensor, count: int) -> tuple[np.ndarray, np.ndarray]:
    """As records.StepRecord.unit_rows: mean = c + s1/count, M2 = s2 - s1^2/count."""
    c, s1, s2 = sums.double().numpy()
    return c + s1 / count, np.maximum(s2 - s1 * s1 / count, 0.0)


def assert_unit_moments(mean, var, ref, axes, dtype):
    """Per-unit mean (error relative to |mean| + std) and variance (relative) against numpy."""
    ref_mean, ref_var = ref.mean(axis=axes), ref.var(axis=axes)
    tol_mean, tol_var = (1e-6, 1e-4) if dtype == torch.float32 else (1e-13, 1e-10)
    assert np.all(np.abs(mean - ref_mean) <= tol_mean * (np.abs(ref_mean) + np.sqrt(ref_var))), (mean, ref_mean)
    np.testing.assert_allclose(var, ref_var, rtol=tol_var)


def _units_input(shape, dtype, seed):
    g = gen(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype) * 2.0
    x[:, 1] += 500.0  # a unit with a large offset
    if shape[1] > 3:
        x[:, 3] = 0.999 + 0.001 * torch.randn(x[:, 3].shape, generator=g, dtype=dtype)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 10), (8, 5, 6, 7), (16, 4, 33)], ids=["2d", "4d", "3d"])
def test_unit_sums_match_numpy(shape, dtype):
    x = _units_input(shape, dtype, 22)
    sums = stats.unit_sums(x)
    assert sums.shape == (3, shape[1])
    # the shift of each unit is its first value, x[0, u, 0, ...]
    np.testing.assert_array_equal(sums[0].numpy(), x.numpy()[(0, slice(None)) + (0,) * (x.dim() - 2)])
    count = x.numel() // shape[1]
    mean, m2 = finish_units(sums, count)
    ref = x.double().numpy()
    axes = tuple(i for i in range(ref.ndim) if i != 1)
    assert_unit_moments(mean, m2 / count, ref, axes, dtype)


def test_unit_sums_merged_over_calls():
    """Two calls of a module (different batch sizes and shifts) merged per unit == numpy on both."""
    a = _units_input((6, 5, 4, 4), torch.float32, 23)
    b = _units_input((11, 5, 4, 4), torch.float32, 24) - 3.0
    merged = None
    for x in (a, b):
        count = x.numel() // x.shape[1]
        part = (count, *finish_units(stats.unit_sums(x), count))
        merged = part if merged is None else stats.merge_moments(merged, part)
    n, mean, m2 = merged
    ref = torch.cat([a, b]).double().numpy()
    assert n == ref.size // ref.shape[1]
    assert_unit_moments(mean, m2 / n, ref, (0, 2, 3), torch.float32)


def test_unit_sums_half_and_noncontiguous():
    x = _units_input((9, 6, 5), torch.float32, 25).to(torch.bfloat16)
    sums = stats.unit_sums(x)
    assert sums.dtype == torch.float32
    base = _units_input((7, 6, 8), torch.float32, 26)
    for t in (x, base[:, :, ::2], base.permute(2, 1, 0), base.transpose(0, 2).contiguous().transpose(0, 2)):
        count = t.numel() // t.shape[1]
        mean, m2 = finish_units(stats.unit_sums(t), count)
        ref = t.double().numpy()
        assert_unit_moments(mean, m2 / count, ref, (0, 2), torch.float32)


@pytest.mark.parametrize("shape", [(64, 10), (8, 5, 6, 7), (16, 4, 33)], ids=["2d", "4d", "3d"])
def test_unit_max_matches_numpy(shape):
    x = _units_input(shape, torch.float32, 27)
    x[:, 0] = -torch.rand(x[:, 0].shape, generator=gen(28))  # a dead ReLU-like unit: max <= 0
    out = stats.unit_max(x).numpy()
    ref = x.numpy()
    axes = tuple(i for i in range(ref.ndim) if i != 1)
    np.testing.assert_array_equal(out, ref.max(axis=axes))
    assert out[0] <= 0


LARGE_UNITS = [((64, 32, 32, 32), False), ((64, 32, 32, 32), True), ((64, 16, 4096), False)]


@pytest.mark.parametrize("shape,channels_last", LARGE_UNITS, ids=["nchw", "channels_last", "3d"])
def test_unit_statistics_of_millions_of_values_match_float64(shape, channels_last):
    """At the sizes that reduce in two stages (``UNIT_SPLIT_FROM``): maxima exact, NaN
    kept; per-unit moments within float32's error of float64; bfloat16 too."""
    x = _units_input(shape, torch.float32, 29)
    assert x.numel() >= stats.UNIT_SPLIT_FROM
    x[:, 0] = -x[:, 0].abs()  # a dead unit
    x[3, 2].view(-1)[7] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = x.double().numpy()
    axes = tuple(i for i in range(ref.ndim) if i != 1)
    out = stats.unit_max(x).numpy()
    assert np.isnan(out[2]) and out[0] <= 0
    np.testing.assert_array_equal(np.delete(out, 2), np.delete(ref.max(axis=axes), 2))
    finite = torch.nan_to_num(x, nan=0.0)
    for t, dtype in ((finite, torch.float32), (finite.to(torch.bfloat16), torch.float32)):
        count = t.numel() // t.shape[1]
        mean, m2 = finish_units(stats.unit_sums(t), count)
        assert_unit_moments(mean, m2 / count, t.double().numpy(), axes, dtype)


def test_large_per_unit_reductions_leave_the_batch_for_last():
    """One reduction over the batch and the trailing dimensions at once is 2-3x slower on the
    CPU than the trailing dimensions first (``UNIT_SPLIT_FROM``); small outputs keep one."""
    from torch.overrides import TorchFunctionMode

    reduced: list[tuple[int, ...]] = []

    class Reductions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") in ("amax", "sum") and "dim" in kwargs:
                dim = kwargs["dim"]
                reduced.append(tuple(dim) if isinstance(dim, (list, tuple)) else (dim,))
            return func(*args, **kwargs)

    big, small = torch.rand(64, 32, 32, 32), torch.rand(8, 4, 5, 5)
    with Reductions():
        stats.unit_max(big), stats.unit_sums(big)
    assert reduced and not any(0 in dims and len(dims) > 1 for dims in reduced), reduced
    reduced.clear()
    with Reductions():
        stats.unit_max(small)
    assert reduced == [(0, 2, 3)]


# --------------------------------------------------------------------------- metric names


def test_metric_names():
    assert set(stats.LAYER_METRICS) == {
        "mean", "var", "std", "min", "max", "p15", "p50", "p85",
        "saturation", "gain", "calls", "dead", "nonfinite", "grad_norm", "grad_rms", "unit_count",
    }
    assert len(stats.LAYER_METRICS) == 16
    assert set(stats.PARAM_METRICS) == {"grad_norm", "norm", "update_ratio"}
    assert len(stats.PARAM_METRICS) == 3
    assert set(stats.RUN_METRICS) == {"loss", "lr", "lr.<i>", "grad_norm"}
    assert len(stats.RUN_METRICS) == 4
    assert stats.SAMPLE_FIELDS == ("p15", "p50", "p85", "saturation", "gain", "nonfinite")
    assert all(isinstance(v, str) and v for d in (stats.LAYER_METRICS, stats.PARAM_METRICS, stats.RUN_METRICS)
               for v in d.values())
