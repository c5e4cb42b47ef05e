"""The Tracer under torch.distributed: global statistics, FSDP2, failing ranks, precision."""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import covshift
from covshift import distributed, stats
from covshift.records import Calls

import ddp_worker
from helpers import torchrun

WORKER = Path(__file__).parent / "ddp_worker.py"
#: Metrics computed from every element (not from samples) and the run's scalars.
EXACT = {"mean", "var", "std", "min", "max", "calls", "nonfinite", "dead", "unit_count", "grad_norm", "grad_rms",
         "loss", "lr", "weight.norm", "bias.norm", "weight.grad_norm", "bias.grad_norm", "weight.update_ratio",
         "bias.update_ratio"}


def run(tmp_path: Path, mode: str, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, Path]:
    trace = tmp_path / f"{mode}.covshift"
    return torchrun(WORKER, trace, mode, *args, cwd=tmp_path, timeout=timeout), trace


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> covshift.Trace:
    """One process on the global batch."""
    path = tmp_path_factory.mktemp("reference") / "reference.covshift"
    ddp_worker.main(str(path), "reference", 1024)
    return covshift.load(path)


def joined(trace: covshift.Trace, reference: covshift.Trace) -> pd.DataFrame:
    both = trace.scalars().merge(reference.scalars(), on=["layer", "metric", "step"], how="outer",
                                 suffixes=("", "_ref"))
    assert not both[["value", "value_ref"]].isna().any().any(), "the runs recorded different metrics or steps"
    return both


def assert_exact(both: pd.DataFrame, metrics: set[str]) -> None:
    rows = both[both.metric.isin(metrics)]
    assert set(rows.metric) == metrics
    scale = rows.value_ref.abs()
    std = both[both.metric == "std"].set_index(["layer", "step"]).value_ref
    # a mean is compared to its layer's spread too: a mean near zero has no relative precision
    spread = rows.set_index(["layer", "step"]).index.map(lambda key: std.get(key, 0.0)).to_numpy()
    spread = np.where(rows.metric == "mean", spread, 0.0)
    bad = rows[(rows.value - rows.value_ref).abs() > 1e-5 * (scale + spread) + 1e-12]
    assert bad.empty, bad.head(10).to_string()


def test_ddp_statistics_are_those_of_one_process_on_the_global_batch(tmp_path: Path,
                                                                     reference: covshift.Trace) -> None:
    done, path = run(tmp_path, "ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    trace = covshift.load(path)
    assert trace.layers == reference.layers  # DDP's "module." prefix is not in the names
    assert trace.config("run")["tracer"]["world_size"] == 2
    both = joined(trace, reference)
    assert_exact(both, EXACT)
    # every output was sampled whole: the percentiles and the derivative statistics are exact too
    single = both[both.layer.isin(["0", "1", "3", "4", "5"])]
    assert_exact(single, {"p15", "p50", "p85", "gain"})
    units = trace.units().merge(reference.units(), on=["step", "layer", "unit"])
    assert len(units) == len(reference.units()) > 0
    np.testing.assert_allclose(units.mean_x, units.mean_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(units.var_x, units.var_y, rtol=1e-5)
    hists = trace.histograms().merge(reference.histograms(), on=["step", "layer", "bin"])
    hists = hists[hists.layer.isin(["0", "1", "3", "4", "5"])]
    assert len(hists) and (hists.count_x == hists.count_y).all()


def test_compiled_ddp_statistics_are_those_of_the_global_batch(tmp_path: Path, reference: covshift.Trace) -> None:
    done, path = run(tmp_path, "compiled")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_exact(joined(covshift.load(path), reference), EXACT)


def test_fsdp2_parameter_metrics_are_global(tmp_path: Path, reference: covshift.Trace) -> None:
    done, path = run(tmp_path, "fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_exact(joined(covshift.load(path), reference), EXACT)


def test_samples_stay_the_size_of_one_process(tmp_path: Path, reference: covshift.Trace) -> None:
    done, path = run(tmp_path, "ddp", "64")
    assert done.returncode == 0, done.stderr[-3000:]
    both = joined(covshift.load(path), reference)
    assert_exact(both, EXACT - {"nonfinite"})
    p50 = both[(both.metric == "p50") & (both.layer == "0")]
    assert (p50.value - p50.value_ref).abs().max() < 0.5 * both[(both.metric == "std") & (both.layer == "0")].value.max()
    # each rank sent 32 values of its sample at the detail steps: the histograms count 64
    hists = covshift.load(path).histograms()
    counts = hists[hists.layer.isin(["0", "1", "3", "4", "5"])].groupby(["step", "layer"], observed=True)["count"].sum()
    assert len(counts) and (counts == 64).all()


def test_a_failed_gather_warns_and_stops_distributed_recording() -> None:
    ranks = distributed.Ranks(rank=0, world=2, group=None)  # no process group: the collective fails
    share = distributed.Share(calls_of(np.ones(4)), ["a"])
    with pytest.warns(RuntimeWarning, match="could not gather the other ranks' statistics"):
        assert ranks.gather(share) is None
    assert ranks.failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ranks.gather(share) is None  # given up: no second attempt, no second warning


def test_a_rank_that_raises_ends_the_job_at_once_with_its_own_error(tmp_path: Path) -> None:
    start = time.monotonic()
    done, path = run(tmp_path, "fail", timeout=ddp_worker.TIMEOUT * 3)
    # rank 1 raised inside the Tracer's block while rank 0 waits in DDP's all-reduce: rank 1
    # takes part in no collective (one would wait for rank 0 until dist_timeout), exits, and
    # rank 0's all-reduce then fails at once
    assert done.returncode != 0
    assert time.monotonic() - start < ddp_worker.TIMEOUT / 2
    assert "rank 1 failed on purpose" in done.stdout + done.stderr
    trace = covshift.load(path)  # what rank 0 wrote is a valid trace
    assert trace.config("run")["tracer"]["world_size"] == 2


def test_when_rank_0_cannot_open_the_trace_every_rank_stops_at_start(tmp_path: Path) -> None:
    done, path = run(tmp_path, "ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    again = torchrun(WORKER, path, "ddp", cwd=tmp_path)  # the run exists, and no overwrite
    assert again.returncode != 0
    assert "already exists" in again.stderr and "rank 0 could not open the trace" in again.stderr
    assert covshift.load(path).runs == ["run"]


def test_a_tracer_on_rank_0_alone_records_its_shard(tmp_path: Path, reference: covshift.Trace) -> None:
    done, path = run(tmp_path, "rank0")
    assert done.returncode == 0, done.stderr[-3000:]
    trace = covshift.load(path)
    assert trace.config("run")["tracer"]["world_size"] == 1
    both = joined(trace, reference)
    mean = both[both.metric == "mean"]
    assert (mean.value - mean.value_ref).abs().max() > 1e-3  # half of the batch only


def test_distributed_needs_a_process_group(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="process group"):
        covshift.Tracer(nn.Linear(2, 2), tmp_path / "t.covshift", distributed=True).start()
    with pytest.raises(ValueError, match="distributed must be"):
        covshift.Tracer(nn.Linear(2, 2), tmp_path / "t.covshift", distributed="yes")


# ---- one process: the pieces ------------------------------------------------------------
def calls_of(x: np.ndarray, step: int = 0, layer: int = 0) -> Calls:
    """The record of one call of ``x``, sampled whole, as the Tracer writes it."""
    flat = torch.from_numpy(x.astype(np.float32))
    row = torch.empty(5)
    stats.moments(flat, flat.sum(), out=row, scale=1.0 / flat.numel())
    row[0] = flat.sum()
    n = np.array([x.size])
    return Calls(step=np.array([step]), layer=np.array([layer]), size=n, moments=row.double().numpy()[None],
                 samples=x.astype(np.float32), start=np.array([0]), length=n, inputs={}, maxima={}, units={},
                 grad_step=np.array([step]), grad_layer=np.array([layer]), grad_size=n.astype(float),
                 grad_sumsq=np.array([float(np.sum(x.astype(np.float64) ** 2))]))


def moments_of(calls: Calls) -> tuple[float, float]:
    shift, s1, s2 = calls.moments[0, 0] / calls.length[0], calls.moments[0, 1], calls.moments[0, 2]
    return stats.finish_moments(float(calls.size[0]), shift, s1, s2)


def test_part_keeps_a_prefix_and_the_moments() -> None:
    x = np.random.default_rng(0).normal(3.0, 2.0, 1000)
    calls = calls_of(x)
    ranks = distributed.Ranks(rank=0, world=4, group=None)
    whole = np.array([True])
    cut = ranks.part(calls, 400, whole, set())
    assert cut.length.tolist() == [100] and np.array_equal(cut.samples, calls.samples[:100])
    np.testing.assert_allclose(moments_of(cut), moments_of(calls), rtol=1e-12)
    assert ranks.part(calls, 8000, whole, set()) is calls  # small enough: whole
    # where only the percentiles use the sample, each rank sends its share of their values
    assert ranks.part(calls, 8000, ~whole, set()).length.tolist() == [stats.PERCENTILE_VALUES // 4]
    assert ranks.part(calls, 8000, ~whole, {0}) is calls  # a detail step: histograms
    calls.inputs[0] = calls.samples - 1.0
    assert ranks.part(calls, 8000, ~whole, set()) is calls  # an input sample: derivatives (GELU)
    assert ranks.part(calls, 400, ~whole, set()).inputs[0].tolist() == (calls.samples[:100] - 1.0).tolist()


def test_merge_of_two_halves_is_the_whole() -> None:
    x = np.random.default_rng(1).normal(-1.0, 3.0, (2, 500))
    shares = [distributed.Share(calls_of(half), ["a"]) for half in x]
    merged = distributed.merge(shares, ["a"])
    whole = calls_of(x.reshape(-1))
    n, mean, m2 = 0, 0.0, 0.0
    for i in range(2):
        n, mean, m2 = stats.merge_moments((n, mean, m2), (merged.size[i], *moments_of(calls_of(x[i]))))
    np.testing.assert_allclose([mean, m2], moments_of(whole), rtol=1e-6)
    assert merged.ranks == 2 and merged.size.sum() == 1000
    # the gradient of the rank-averaged loss: each rank's share over the world size
    assert merged.grad_sumsq.sum() == pytest.approx(whole.grad_sumsq[0] / 4)


def test_merge_maps_layers_by_name() -> None:
    share = distributed.Share(calls_of(np.ones(4), layer=1), ["x", "y"])
    assert distributed.merge([share, distributed.Share(calls_of(np.ones(4)), ["y"])], ["x", "y"]).layer.tolist() == [1, 1]
    with pytest.raises(ValueError, match="different layers"):
        distributed.merge([distributed.Share(calls_of(np.ones(4)), ["z"])], ["x", "y"])


def test_combine_norms_of_shards_and_of_replicas() -> None:
    parts = [np.array([3.0, 1.0, 2.0]), np.array([4.0, 1.0, 5.0])]
    combined = distributed.combine_norms(parts, np.array([1, 2, 0]))
    np.testing.assert_allclose(combined, [5.0, 1.0, 2.0])


def test_unwrap_strips_compile_and_ddp_wrappers() -> None:
    net = nn.Linear(2, 2)
    assert distributed.unwrap(torch.compile(net, backend="eager")) is net
    assert distributed.replicas(net.weight) == 0 and distributed.local(net.weight) is net.weight


def test_no_process_group_means_one_process() -> None:
    assert distributed.Ranks.detect() is None


# ---- precision and closing ----------------------------------------------------------------
def test_parameter_norms_of_bfloat16_are_float32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = [torch.randn(1000, 1000).bfloat16(), torch.randn(3000).bfloat16()]
    exact = [np.linalg.norm(w.double().numpy()) for w in weights]
    got = stats.norms(weights)
    assert got.dtype == torch.float32
    # float32 accumulation on the CPU: within 5e-5 on a million values (3e-5 measured)
    np.testing.assert_allclose(got.double().numpy(), exact, rtol=5e-5)
    in_bfloat16 = torch.stack(torch._foreach_norm(weights)).double().numpy()
    assert np.max(np.abs(in_bfloat16 / exact - 1)) > 5e-4  # what a norm kept in bfloat16 loses
    assert stats.norms([torch.ones(4, dtype=torch.float64) / 3]).dtype == torch.float64


def test_a_float64_loss_is_kept_in_float64(tmp_path: Path) -> None:
    model = nn.Linear(3, 1).double()
    path = tmp_path / "t.covshift"
    value = torch.tensor(1.0, dtype=torch.float64) / 3
    with covshift.Tracer(model, path) as tracer:
        model(torch.ones(2, 3, dtype=torch.float64)).sum().backward()
        tracer.step(loss=value)
    assert covshift.load(path).series("run", "", "loss")[1][0] == 1 / 3


def test_an_error_in_closing_does_not_replace_the_training_error(tmp_path: Path) -> None:
    model = nn.Linear(3, 1)
    tracer = covshift.Tracer(model, tmp_path / "t.covshift")
    with pytest.raises(ZeroDivisionError), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracer:
            tracer._saver.close = lambda config: (_ for _ in ()).throw(OSError("disk gone"))  # type: ignore
            model(torch.ones(2, 3)).sum().backward()
            tracer.step()
            raise ZeroDivisionError
    assert any("disk gone" in str(w.message) and "ZeroDivisionError" in str(w.message) for w in caught)
    assert not model._forward_hooks  # the hooks are removed all the same
