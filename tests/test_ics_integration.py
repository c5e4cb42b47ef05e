"""--ics-every through the runner, the trace and the report: training unchanged, metrics recorded."""

import torch
from typer.testing import CliRunner

import covshift
from covshift.cli import app

MODEL = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

config = {"batch_size": 16, "seed": 0, "lr": 0.2, "momentum": 0.9}


def build_model():
    return nn.Sequential(nn.Linear(5, 10), nn.Tanh(), nn.Dropout(0.2), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 3))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 5, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])
'''


def test_ics_every_records_without_changing_training(tmp_path):
    (tmp_path / "net.py").write_text(MODEL)
    runner = CliRunner()
    traces = {}
    for name, extra in (("plain", []), ("ics", ["--ics-every", "3"])):
        out = tmp_path / name
        result = runner.invoke(app, ["trace", str(tmp_path / "net.py"), "--steps", "8", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        traces[name] = covshift.load(out / "trace.covshift")
    plain, ics = traces["plain"], traces["ics"]
    for run in ("bn", "nobn"):
        a = plain.scalars(run=run, metric="loss")["value"].to_numpy()
        b = ics.scalars(run=run, metric="loss")["value"].to_numpy()
        assert torch.equal(torch.tensor(a), torch.tensor(b))  # bitwise: the instruments change nothing
        layer_rows = ics.scalars(run=run, metric="ics_l2")
        assert sorted(set(layer_rows["step"])) == [0, 3, 6]
        assert set(layer_rows["layer"]) == {"0", "3", "5"}  # the Linear layers (BN counted with its Linear)
        first = ics.scalars(run=run, layer="0", metric=["ics_l2", "ics_cos"]).set_index(["step", "metric"])["value"]
        assert first[(0, "ics_l2")] == 0.0 and abs(first[(0, "ics_cos")] - 1.0) < 1e-12  # nothing before the first layer
        run_rows = ics.scalars(run=run, layer="", metric=["loss_variation", "grad_predictiveness", "beta_smoothness"])
        assert len(run_rows) == 9 and (run_rows["value"] >= 0).all()
        assert plain.scalars(run=run, metric="ics_l2").empty
    md = (tmp_path / "ics" / "report.md").read_text()
    assert "![ics.png](ics.png)" in md and "![landscape.png](landscape.png)" in md
    # 8 steps: the nobn run does not train, so the measured rows are "not comparable", not "not measured"
    row = next(line for line in md.splitlines() if line.startswith("| smoother loss landscape"))
    assert "**not comparable**" in row and "did not train" in row and "landscape.png" in row
    row = next(line for line in md.splitlines() if line.startswith("| reduced internal covariate shift (gradient"))
    assert "**not comparable**" in row and "ics.png" in row
    plain_md = (tmp_path / "plain" / "report.md").read_text()
    assert "ics.png" not in plain_md
    assert "| smoother loss landscape | **not measured** | median effective β-smoothness along the gradient: not in " \
           "this trace (covshift trace --ics-every N)" in plain_md
