"""The options of `covshift trace` and `covshift sweep` and a model file's config are checked
before anything is loaded or trained: one line naming the option or path, exit status 2.

The model file records, next to itself, that it was imported (``imported``) and that its
``data()`` was called (``data_called``), so that each test can tell how far a command got.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from covshift import ranges
from covshift.cli import app

runner = CliRunner(env={"COLUMNS": "200"})

MODEL = '''
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

HERE = Path(__file__).parent
(HERE / "imported").touch()
config = {CONFIG}


def build_model():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def data():
    (HERE / "data_called").touch()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g)
    return TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])
'''


def write_model(folder: Path, config: str = '{"batch_size": 16}') -> Path:
    path = folder / "net.py"
    path.write_text(MODEL.replace("{CONFIG}", config))
    return path


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def run_args(command: str, model: Path) -> list[object]:
    """Arguments that would run ``command`` briefly on ``model``, but for the option tested."""
    return [model, "--steps", "2"] + (["--jobs", "1"] if command == "sweep" else [])


def error_line(result) -> str:
    """The command's only output line, ``error: ...``, after checking exit status 2."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


TRACE_OPTIONS = [
    ("--steps", "0"), ("--steps", "-5"), ("--epochs", "0"), ("--epochs", "-1"), ("--batch-size", "0"),
    ("--batch-size", "-8"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "-1"),
    ("--momentum", "-0.5"), ("--momentum", "nan"), ("--weight-decay", "nan"), ("--weight-decay", "-1"),
    ("--every", "0"), ("--detail-every", "0"), ("--eval-every", "0"), ("--ics-every", "0"),
    ("--ics-every", "-1"), ("--seed", str(2**64)),
]


@pytest.mark.parametrize(("option", "value"), TRACE_OPTIONS)
def test_trace_option_out_of_range(tmp_path, option, value):
    model = write_model(tmp_path)
    result = invoke("trace", model, "--out", tmp_path / "out", option, value)
    line = error_line(result)
    assert line.startswith(f"error: {option} takes "), line
    assert not (tmp_path / "imported").exists()  # checked before the model file is loaded
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("option", "value", "names"), [
    ("--jobs", "0", "--jobs"), ("--jobs", "-2", "--jobs"), ("--steps", "0", "--steps"),
    ("--batch-size", "0", "--batch-size"), ("--momentum", "inf", "--momentum"),
    ("--lr", "nan", "--lr nan: each value"), ("--lr", "0.1,inf", "--lr 0.1,inf: each value"),
    ("--lr", "0.1,-1", "--lr 0.1,-1: each value"), ("--init-scale", "nan", "--init-scale nan: each value"),
    ("--init-scale", "1,0", "--init-scale 1,0: each value"), ("--seeds", f"0,{2**64}", f"--seeds 0,{2**64}: each"),
])
def test_sweep_option_out_of_range(tmp_path, option, value, names):
    model = write_model(tmp_path)
    result = invoke("sweep", model, "--out", tmp_path / "out", "--steps", "2", "--jobs", "1", option, value)
    assert error_line(result).startswith(f"error: {names}")
    assert not (tmp_path / "imported").exists()
    assert not (tmp_path / "out").exists()


def test_detail_every_must_be_a_multiple_of_every(tmp_path):
    model = write_model(tmp_path)
    line = error_line(invoke("trace", model, "--out", tmp_path / "out", "--every", "3"))
    assert "--detail-every 50 must be a multiple of --every 3" in line
    assert not (tmp_path / "imported").exists()


def test_trace_seeds_out_of_range(tmp_path):
    model = write_model(tmp_path)
    line = error_line(invoke("trace", model, "--out", tmp_path / "out", "--seeds", f"1,{-2**63 - 1}"))
    assert line.startswith("error: --seeds ")
    assert not (tmp_path / "imported").exists()


@pytest.mark.parametrize(("config", "key"), [
    ('{"lr": float("nan")}', "lr"), ('{"lr": 0}', "lr"), ('{"lr": "0.1"}', "lr"), ('{"epochs": 0}', "epochs"),
    ('{"steps": -5}', "steps"), ('{"steps": 2.5}', "steps"), ('{"batch_size": 0}', "batch_size"),
    ('{"momentum": -0.9}', "momentum"), ('{"weight_decay": float("inf")}', "weight_decay"),
    ('{"seed": True}', "seed"),
])
def test_config_out_of_range(tmp_path, config, key):
    model = write_model(tmp_path, config)
    for command in (["trace", model], ["sweep", model, "--jobs", "1"]):
        line = error_line(invoke(*command, "--out", tmp_path / "out"))
        assert f'config["{key}"] must be ' in line and "net.py" in line, line
        assert not (tmp_path / "data_called").exists()  # checked before data() is called
        assert not (tmp_path / "out").exists()


def test_config_none_means_the_default(tmp_path):
    model = write_model(tmp_path, '{"steps": None, "batch_size": 16}')
    result = invoke("trace", model, "--out", tmp_path / "out", "--steps", "2")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["trace", "sweep"])
def test_out_is_a_file(tmp_path, command):
    model = write_model(tmp_path)
    out = tmp_path / "taken"
    out.write_text("a file")
    line = error_line(invoke(command, *run_args(command, model), "--out", out))
    assert str(out) in line and "is a file" in line
    assert out.read_text() == "a file"
    assert not (tmp_path / "data_called").exists()


def test_out_below_a_file(tmp_path):
    model = write_model(tmp_path)
    (tmp_path / "taken").write_text("a file")
    line = error_line(invoke("trace", model, "--out", tmp_path / "taken" / "sub", "--steps", "2"))
    assert f"{tmp_path / 'taken'} is a file" in line
    assert not (tmp_path / "data_called").exists()


@pytest.mark.parametrize("command", ["trace", "sweep"])
def test_trace_path_is_a_folder(tmp_path, command):
    model = write_model(tmp_path)
    (tmp_path / "out" / "trace.covshift").mkdir(parents=True)
    line = error_line(invoke(command, *run_args(command, model), "--out", tmp_path / "out"))
    assert str(tmp_path / "out" / "trace.covshift") in line and "is a folder" in line
    assert not (tmp_path / "data_called").exists()


@pytest.fixture
def read_only(tmp_path):
    """A folder this process cannot write to (skips when it can anyway, as root can)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    yield folder
    folder.chmod(0o700)


@pytest.mark.parametrize("command", ["trace", "sweep", "report"])
def test_out_not_writable(tmp_path, read_only, command):
    if os.access(read_only, os.W_OK):
        pytest.skip("this user can write to a 0o500 folder (root)")
    model = write_model(tmp_path)
    for out in (read_only / "new", read_only):
        args = [tmp_path / "any.covshift"] if command == "report" else run_args(command, model)
        line = error_line(invoke(command, *args, "--out", out))
        assert str(out) in line and "not writable" in line, line
        assert list(read_only.iterdir()) == []
        assert not (tmp_path / "data_called").exists()


def test_readme_gives_every_range():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, accepted in ranges.SETTINGS.items():
        assert f"`--{name.replace('_', '-')}`" in readme, name
        assert accepted.description in readme, accepted
