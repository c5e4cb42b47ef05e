"""covshift sweep: the grid of jobs, parallel workers writing one trace, init scaling, the CLI."""

import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import covshift
from covshift.cli import app
from covshift.modelfile import load as load_model_file
from covshift.runner import prepare, scale_init
from covshift.sweep import jobs, parse_list, run_sweep

MODEL = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

config = {"batch_size": 16, "seed": 0}


def build_model():
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


def build_relu():
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(112, 5, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x[:96], y[:96]), TensorDataset(x[96:], y[96:])
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(MODEL)
    return path


def test_grid_of_jobs(tmp_path):
    todo = jobs("m.py", [0.1, 1.0], [0.5, 2.0], [0, 1], {"steps": 3, "lr": 9.0}, tmp_path / "t.covshift", 1)
    assert len(todo) == 2 * 2 * 2 * 2
    assert todo[0].run == "bn lr=0.1 init=0.5 seed=0" and todo[1].run == "nobn lr=0.1 init=0.5 seed=0"
    assert len({job.run for job in todo}) == len(todo)
    assert all(job.settings()["steps"] == 3 for job in todo)
    assert {job.settings()["lr"] for job in todo} == {0.1, 1.0}  # the grid's lr wins over an override


def test_parse_list():
    assert parse_list("0.1, 1,0.1", float, "--lr") == [0.1, 1.0]
    assert parse_list("3,1", int, "--seeds") == [3, 1]
    for bad in ("a,b", "", "0,1", "-1"):
        with pytest.raises(ValueError, match="--lr"):
            parse_list(bad, float, "--lr")


def test_init_scale_multiplies_linear_and_conv_weights_only():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scale_init(model, 4.0)
    after = model.state_dict()
    for key in before:
        factor = 4.0 if key in ("0.weight", "3.weight") else 1.0
        torch.testing.assert_close(after[key], before[key] * factor if before[key].is_floating_point() else before[key])


def test_prepare_scales_both_variants_alike(model_file):
    mf = load_model_file(str(model_file))
    _, _, _, plain = prepare(mf, {"seed": 0})
    _, _, _, scaled = prepare(mf, {"seed": 0, "init_scale": 3.0})
    for variant in ("bn", "nobn"):
        for name in ("0", "2", "4"):
            module = dict(scaled[variant].named_modules())[name]
            reference = dict(plain[variant].named_modules())[name]
            torch.testing.assert_close(module.weight, reference.weight * 3.0)
            torch.testing.assert_close(module.bias, reference.bias)
    torch.testing.assert_close(dict(scaled["bn"].named_modules())["2"].weight,
                               dict(scaled["nobn"].named_modules())["2"].weight)


def test_parallel_workers_write_every_row_once(model_file, tmp_path):
    """Two worker processes writing one trace give exactly what one process writes."""
    grid = ([0.05, 0.5], [1.0, 2.0], [0])
    traces = {}
    for workers in (1, 2):
        path = tmp_path / f"w{workers}" / "trace.covshift"
        todo = jobs(str(model_file), *grid, {"steps": 7, "detail_every": 3}, path, 1)
        outcomes = run_sweep(todo, workers)
        assert len(outcomes) == len(todo) == 8
        traces[workers] = covshift.load(path)
    one, two = traces[1], traces[2]
    assert sorted(one.runs) == sorted(two.runs) and len(two.runs) == 8
    for run in one.runs:
        a = one.scalars(run=run).reset_index(drop=True)
        b = two.scalars(run=run).reset_index(drop=True)
        assert len(a) == len(b) > 0
        assert (a[["step", "layer", "metric"]] == b[["step", "layer", "metric"]]).all().all()
        torch.testing.assert_close(torch.tensor(a["value"].to_numpy()), torch.tensor(b["value"].to_numpy()),
                                   equal_nan=True)
        assert sorted(two.scalars(run=run, metric="loss")["step"]) == list(range(7))
        config = two.config(run)
        for key in ("variant", "lr", "init_scale", "seed", "diverged_at", "steps"):
            assert key in config
        assert run == f"{config['variant']} lr={config['lr']:g} init={config['init_scale']:g} seed={config['seed']}"
        assert config["sweep"] is True
    assert len(two.units()) == len(one.units()) and len(two.histograms()) == len(one.histograms())


def test_diverging_setting_stops_early(model_file, tmp_path):
    path = tmp_path / "trace.covshift"
    outcomes = run_sweep(jobs(f"{model_file}:build_relu", [1e6], [4.0], [0], {"steps": 20}, path, 1), 1)
    trace = covshift.load(path)
    nobn = trace.config("nobn lr=1e+06 init=4 seed=0")
    assert nobn["diverged_at"] is not None and nobn["steps"] < 20
    assert any(o.diverged_at is not None for o in outcomes)
    losses = trace.scalars(run="nobn lr=1e+06 init=4 seed=0", metric="loss")["value"]
    assert not math.isfinite(losses.iloc[-1])


def test_sweep_command(model_file, tmp_path):
    result = CliRunner().invoke(app, ["sweep", str(model_file), "--lr", "0.05,0.5", "--init-scale", "1,2",
                                      "--seeds", "0,1", "--steps", "4", "--jobs", "1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    trace = covshift.load(tmp_path / "o" / "trace.covshift")
    assert len(trace.runs) == 2 * 2 * 2 * 2
    assert trace.config(trace.runs[0])["detail_every"] == 500  # sweeps keep statistics detail low
    assert "nobn" in result.output and "0.05" in result.output
    assert (tmp_path / "o" / "report.md").is_file()


def test_sweep_errors_are_one_line(model_file, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["sweep", str(model_file), "--lr", "x"])
    assert bad.exit_code == 2 and "--lr" in bad.output and "Traceback" not in bad.output
    missing = runner.invoke(app, ["sweep", str(tmp_path / "none.py")])
    assert missing.exit_code == 2 and "no model file" in missing.output
