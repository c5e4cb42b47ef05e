"""`covshift trace`: errors in model files, the options, and what the trace records.

Every test writes its own tiny model file into tmp_path: a Linear(4, 8)-Tanh-Linear(8, 3)
MLP on 64 training and 32 validation samples, trained for a few steps.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import covshift
import covshift.cli
import covshift.modelfile
from covshift.cli import app
from covshift.modelfile import ModelFileError

# A wide terminal, so rich never wraps or elides the summary table.
runner = CliRunner(env={"COLUMNS": "200"})

PACKAGE_DIR = os.path.dirname(covshift.__file__)

PREAMBLE = '''\
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(n_train=64, n_val=32, features=4, classes=3):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n_train + n_val, features, generator=g)
    y = torch.randint(0, classes, (n_train + n_val,), generator=g)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def mlp(hidden=8):
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))
'''

GOOD = '''
config = {"batch_size": 16}


def build_model():
    return mlp()


def data():
    return make_data()
'''


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Run every command in tmp_path, so a default reports/ folder never lands in the repo."""
    monkeypatch.chdir(tmp_path)


def write_model(tmp_path: Path, body: str, name: str = "net.py", preamble: bool = True) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((PREAMBLE if preamble else "") + textwrap.dedent(body))
    return path


def line_of(path: Path, needle: str) -> int:
    """1-based number of the first line of ``path`` containing ``needle``."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def invoke(*args: object):
    return runner.invoke(app, ["trace", *map(str, args)])


def error_line(result) -> str:
    """The single "error: ..." line of a failed command, after checking the common rules."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert PACKAGE_DIR not in result.output, result.output  # no covshift frames
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def only_error_line(result) -> str:
    """As error_line, and nothing else is printed (no user frames, no other lines)."""
    line = error_line(result)
    printed = [x for x in result.output.splitlines() if x.strip() and "━" not in x]
    assert printed == [line], result.output
    return line


def user_frames_shown(result, path: Path, needle: str) -> None:
    """The user's own frame (file and line of ``needle``) is shown, and no covshift frame."""
    assert f'File "{path}", line {line_of(path, needle)}' in result.output, result.output
    assert "in your code" in result.output


def load_trace(path: Path):
    assert path.is_file(), f"no trace at {path}"
    return covshift.load(path)


def loss_steps(trace, run: str) -> list[int]:
    return sorted(trace.scalars(run=run, layer="", metric="loss")["step"].tolist())


def summary_rows(output: str) -> dict[str, list[str]]:
    """The rows of the summary table, by run name: the cells of each ``│ ... │`` line."""
    rows = {}
    for line in output.splitlines():
        for bar in ("│", "┃"):  # body rows, and the header row
            if line.startswith(bar):
                cells = [c.strip() for c in line.strip(bar).split(bar)]
                rows[cells[0]] = cells
    return rows


# -- errors ----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    line = only_error_line(invoke(tmp_path / "nowhere.py"))
    assert "nowhere.py" in line and "no model file" in line


def test_not_a_python_file(tmp_path):
    path = tmp_path / "net.txt"
    path.write_text(GOOD)
    line = only_error_line(invoke(path))
    assert "net.txt" in line and ".py" in line


def test_directory_is_not_a_model_file(tmp_path):
    folder = tmp_path / "pkg.py"
    folder.mkdir()
    line = only_error_line(invoke(folder))
    assert "not a Python file" in line


def test_syntax_error_names_file_and_line(tmp_path):
    path = write_model(tmp_path, "x = 1\ndef build_model(:\n    pass\n", preamble=False)
    line = only_error_line(invoke(path))
    assert f"{path}:2" in line and "syntax" in line


def test_exception_while_importing_shows_user_frame(tmp_path):
    path = write_model(tmp_path, GOOD + "\nraise RuntimeError('no dataset on this machine')\n")
    result = invoke(path, "--steps", 2)
    line = error_line(result)
    assert "RuntimeError" in line and "no dataset on this machine" in line and "net.py" in line
    user_frames_shown(result, path, "raise RuntimeError")


def test_no_factory_lists_names_looked_for_and_functions_defined(tmp_path):
    path = write_model(tmp_path, '''
        def make_net():
            return mlp()


        def data():
            return make_data()
        ''')
    line = only_error_line(invoke(path))
    for word in ("build_model", "`model`", "make_net", "data", "mlp", ":NAME"):
        assert word in line, line


def test_named_factory_missing(tmp_path):
    path = write_model(tmp_path, GOOD)
    line = only_error_line(invoke(f"{path}:nope"))
    assert "nope" in line and "build_model" in line  # what is missing, and what the file has


def test_factory_that_raises_shows_user_frames(tmp_path):
    path = write_model(tmp_path, '''
        def build_model():
            return helper(3)


        def helper(width):
            raise ValueError(f"width {width} is too small")


        def data():
            return make_data()
        ''')
    result = invoke(path, "--steps", 2)
    line = error_line(result)
    assert "build_model()" in line and "ValueError" in line and "width 3 is too small" in line
    user_frames_shown(result, path, "return helper(3)")
    user_frames_shown(result, path, "raise ValueError")


def test_factory_returning_non_module(tmp_path):
    path = write_model(tmp_path, '''
        def build_model():
            return [mlp()]


        def data():
            return make_data()
        ''')
    line = only_error_line(invoke(path, "--steps", 2))
    assert "build_model()" in line and "list" in line and "nn.Module" in line


def test_data_missing(tmp_path):
    path = write_model(tmp_path, "def build_model():\n    return mlp()\n")
    line = only_error_line(invoke(path))
    assert "data()" in line and "(train, val)" in line


@pytest.mark.parametrize("returned, shown", [
    ("make_data()[0]", "TensorDataset"),
    ("(*make_data(), make_data()[1])", "length 3"),
    ("7", "int"),
])
def test_data_returning_the_wrong_thing(tmp_path, returned, shown):
    path = write_model(tmp_path, f"def build_model():\n    return mlp()\n\n\ndef data():\n    return {returned}\n")
    line = only_error_line(invoke(path, "--steps", 2))
    assert "(train, val)" in line and shown in line


@pytest.mark.parametrize("tensors", ["x", "x, y, y"])
def test_batches_that_are_not_input_target_pairs(tmp_path, tensors):
    path = write_model(tmp_path, f'''
        def build_model():
            return mlp()


        def data():
            train, val = make_data()
            x, y = train.tensors
            return TensorDataset({tensors}), val
        ''')
    line = only_error_line(invoke(path, "--steps", 2))
    assert "(input, target)" in line


@pytest.mark.parametrize("factory", [
    "def build_model():\n    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))\n",
    "def build_model(batchnorm):\n    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))\n",
    "model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))\n",
], ids=["build_model()", "build_model(batchnorm)", "instance"])
def test_forward_pass_fails_on_the_data(tmp_path, factory):
    """Linear(5, 8) on 4 features: the message must report the shape problem itself,
    whichever way the model is given."""
    path = write_model(tmp_path, factory + "\n\ndef data():\n    return make_data()\n")
    line = only_error_line(invoke(path, "--steps", 2))
    assert "cannot be multiplied" in line, line
    assert "forward" in line, line


def test_output_and_target_the_loss_cannot_combine(tmp_path):
    path = write_model(tmp_path, '''
        config = {"batch_size": 16}


        def build_model():
            return mlp()


        def data():
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(96, 4, generator=g), torch.randn(96, 7, generator=g)
            return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])
        ''')
    line = only_error_line(invoke(path, "--steps", 2))
    assert "(16, 3)" in line and "(16, 7)" in line  # the output's and the target's shapes
    assert "loss_fn" in line, line  # the fix: define loss_fn(output, target)


def test_user_loss_fn_that_raises(tmp_path):
    path = write_model(tmp_path, GOOD + '''

def loss_fn(output, target):
    raise ArithmeticError("my loss is broken")
''')
    result = invoke(path, "--steps", 2)
    line = error_line(result)
    assert "ArithmeticError" in line and "my loss is broken" in line
    user_frames_shown(result, path, "raise ArithmeticError")


def test_user_loss_fn_that_raises_during_training(tmp_path):
    path = write_model(tmp_path, GOOD + '''
calls = 0


def loss_fn(output, target):
    global calls
    if torch.is_grad_enabled():
        calls += 1
        if calls == 3:
            raise ZeroDivisionError("late failure")
    return nn.functional.cross_entropy(output, target)
''')
    result = invoke(path, "--steps", 4)
    line = error_line(result)
    assert "ZeroDivisionError" in line and "late failure" in line and "step 2" in line
    user_frames_shown(result, path, 'raise ZeroDivisionError')


def test_only_with_a_bad_value(tmp_path):
    path = write_model(tmp_path, GOOD)
    line = only_error_line(invoke(path, "--only", "both"))
    assert "--only" in line and "bn" in line and "nobn" in line and "both" in line
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("args, words", [
    (["--seeds", "0"], "at least 1"),
    (["--seeds", "-1"], "at least 1"),
    (["--seeds", "a,b"], "'a,b'"),
    (["--seeds", "0,,1"], "'0,,1'"),
    (["--seeds", "1,2,1"], "twice"),
    (["--seed", "3", "--seeds", "1,2"], "exclude each other"),
])
def test_bad_seeds_fail_before_anything_is_loaded(tmp_path, args, words):
    line = only_error_line(invoke(tmp_path / "nowhere.py", *args))  # the file is never looked at
    assert "--seeds" in line and words in line, line
    assert not (tmp_path / "reports").exists()


def test_bad_optimizer(tmp_path):
    path = write_model(tmp_path, GOOD)
    line = only_error_line(invoke(path, "--optimizer", "rmsprop", "--out", tmp_path / "o"))
    assert "rmsprop" in line and "sgd" in line and "adam" in line


def test_bad_optimizer_in_file_config(tmp_path):
    path = write_model(tmp_path, GOOD + '\nconfig = {"optimizer": "lbfgs"}\n')
    line = only_error_line(invoke(path, "--out", tmp_path / "o"))
    assert "lbfgs" in line and "sgd" in line and "adam" in line


@pytest.mark.parametrize("forward", [
    # a layer called twice per forward: one BatchNorm for both calls is ambiguous
    '''
    def forward(self, x):
        return self.b(self.act(self.a(x)) + self.act(self.a(x)))
    ''',
    # a layer computed functionally: there is no module to put a BatchNorm after
    '''
    def forward(self, x):
        return self.b(self.act(nn.functional.linear(x, self.a.weight, self.a.bias)))
    ''',
], ids=["called-twice", "functional"])
def test_bn_variant_cannot_be_derived(tmp_path, forward):
    path = write_model(tmp_path, '''
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)
''' + textwrap.indent(textwrap.dedent(forward), "    ") + '''

def build_model():
    return Net()


def data():
    return make_data()
''')
    line = only_error_line(invoke(path, "--steps", 2, "--out", tmp_path / "o"))
    assert "build_model(batchnorm" in line


def test_debug_lets_the_exception_propagate(tmp_path):
    path = write_model(tmp_path, '''
        def build_model():
            raise ValueError("width too small")


        def data():
            return make_data()
        ''')
    result = invoke(path, "--steps", 2, "--debug")
    assert isinstance(result.exception, ModelFileError), result.output
    assert isinstance(result.exception.__cause__, ValueError)
    assert "width too small" in str(result.exception)


def test_debug_subprocess_prints_full_traceback(tmp_path):
    path = write_model(tmp_path, '''
        def build_model():
            raise ValueError("width too small")


        def data():
            return make_data()
        ''')
    command = [sys.executable, "-m", "covshift", "trace", str(path), "--steps", "2", "--out", str(tmp_path / "o")]
    plain = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr and "error: build_model() raised ValueError" in plain.stderr
    assert f'File "{path}", line {line_of(path, "raise ValueError")}' in plain.stderr
    debug = subprocess.run(command + ["--debug"], check=False, capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert f'File "{path}", line {line_of(path, "raise ValueError")}' in debug.stderr
    assert os.path.join(PACKAGE_DIR, "modelfile.py") in debug.stderr  # the full traceback, covshift's too


# -- success ----------------------------------------------------------------------------


def test_default_out_folder_is_reports_stem_under_cwd(tmp_path, monkeypatch):
    write_model(tmp_path / "models", GOOD, name="mynet.py")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = invoke("../models/mynet.py", "--steps", 3)
    assert result.exit_code == 0, result.output
    expected = work / "reports" / "mynet" / "trace.covshift"
    with load_trace(expected) as trace:
        assert trace.runs == ["bn", "nobn"]
        assert loss_steps(trace, "bn") == loss_steps(trace, "nobn") == [0, 1, 2]
    assert os.path.join("reports", "mynet", "trace.covshift") in result.output
    assert not (tmp_path / "models" / "reports").exists()


def test_out_option(tmp_path, monkeypatch):
    path = write_model(tmp_path, GOOD)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "deep" / "er"
    result = invoke(path, "--steps", 2, "--out", out)
    assert result.exit_code == 0, result.output
    with load_trace(out / "trace.covshift") as trace:
        assert set(trace.runs) == {"bn", "nobn"}
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("only", ["bn", "nobn"])
def test_only_records_one_run(tmp_path, only):
    path = write_model(tmp_path, GOOD)
    result = invoke(path, "--steps", 2, "--only", only, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    with load_trace(tmp_path / "o" / "trace.covshift") as trace:
        assert trace.runs == [only]
        assert trace.config(only)["variant"] == only
        assert set(trace.scalars()["run"]) == {only}
        has_bn_layer = any(t.startswith("BatchNorm") for t in trace.layer_info()["type"])
    assert has_bn_layer == (only == "bn")
    assert list(summary_rows(result.output)) == ["run", only]


def test_summary_table_lists_both_runs(tmp_path):
    path = write_model(tmp_path, GOOD)
    result = invoke(path, "--steps", 3, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    rows = summary_rows(result.output)
    assert set(rows) == {"run", "bn", "nobn"}
    header = rows["run"]
    with load_trace(tmp_path / "o" / "trace.covshift") as trace:
        for run in ("bn", "nobn"):
            cells = dict(zip(header, rows[run]))
            assert cells["steps"] == "3"
            assert cells["diverged"] == "-"
            # the eval-mode loss on the training subset, not the last mini-batch's
            last_loss = trace.scalars(run=run, layer="", metric="train_eval_loss")["value"].iloc[-1]
            assert math.isclose(float(cells["train loss (eval)"]), last_loss, rel_tol=1e-3)
            assert cells["val accuracy"].endswith("%")


@pytest.mark.parametrize("args, runs", [
    (["--seeds", "0,2"], ["bn seed=0", "nobn seed=0", "bn seed=2", "nobn seed=2"]),
    (["--seeds", "2", "--seed", "4", "--only", "nobn"], ["nobn seed=4", "nobn seed=5"]),
])
def test_seeds_train_a_pair_per_seed_into_one_trace(tmp_path, args, runs):
    path = write_model(tmp_path, GOOD)
    result = invoke(path, "--steps", 2, "--out", tmp_path / "o", *args)
    assert result.exit_code == 0, result.output
    assert list(summary_rows(result.output)) == ["run", *runs]
    with load_trace(tmp_path / "o" / "trace.covshift") as trace:
        assert trace.runs == runs
        for run in runs:
            variant, seed = run.split(" seed=")
            assert (trace.config(run)["variant"], trace.config(run)["seed"]) == (variant, int(seed))
            assert loss_steps(trace, run) == [0, 1]


def test_a_rerun_with_one_seed_leaves_only_bn_and_nobn(tmp_path):
    path = write_model(tmp_path, GOOD)
    assert invoke(path, "--steps", 1, "--seeds", 3, "--out", tmp_path / "o").exit_code == 0
    with load_trace(tmp_path / "o" / "trace.covshift") as trace:
        assert len(trace.runs) == 6
    result = invoke(path, "--steps", 1, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    with load_trace(tmp_path / "o" / "trace.covshift") as trace:
        assert trace.runs == ["bn", "nobn"] and set(trace.scalars()["run"]) == {"bn", "nobn"}


def sgd_lr_used(trace, run: str, layer: str = "0") -> list[float]:
    """The learning rate each SGD step (momentum 0, no weight decay) actually applied to
    ``layer``'s weight: ||W_t - W_(t-1)|| / ||grad_t||, from steps 1 on."""
    frame = trace.scalars(run=run, layer=layer, metric=["weight.norm", "weight.update_ratio", "weight.grad_norm"])
    table = frame.pivot(index="step", columns="metric", values="value")
    rates = []
    for step in table.index[1:]:
        update = table.loc[step, "weight.update_ratio"] * table.loc[step - 1, "weight.norm"]
        rates.append(update / table.loc[step, "weight.grad_norm"])
    return rates


def test_config_precedence_cli_over_file_over_defaults(tmp_path):
    file_config = '\nconfig = {"lr": 0.05, "batch_size": 16, "optimizer": "adam", "seed": 3, "momentum": 0.5}\n'
    with_config = write_model(tmp_path, GOOD + file_config, name="configured.py")
    bare = write_model(tmp_path, "def build_model():\n    return mlp()\n\n\ndef data():\n    return make_data()\n",
                       name="bare.py")

    # the file's config over the defaults
    result = invoke(with_config, "--epochs", 1, "--out", tmp_path / "file")
    assert result.exit_code == 0, result.output
    with load_trace(tmp_path / "file" / "trace.covshift") as trace:
        for run in ("bn", "nobn"):
            config = trace.config(run)
            assert (config["lr"], config["batch_size"], config["optimizer"], config["seed"]) == (0.05, 16, "adam", 3)
            assert config["momentum"] == 0.5
            assert loss_steps(trace, run) == list(range(64 // 16))  # one epoch of batches of 16
            lrs = trace.scalars(run=run, layer="", metric="lr")["value"]
            assert len(lrs) == 64 // 16 and all(math.isclose(v, 0.05) for v in lrs)

    # the command line over the file's config
    result = invoke(with_config, "--epochs", 1, "--lr", 0.2, "--batch-size", 32, "--optimizer", "sgd",
                    "--seed", 7, "--momentum", 0, "--out", tmp_path / "cli")
    assert result.exit_code == 0, result.output
    with load_trace(tmp_path / "cli" / "trace.covshift") as trace:
        for run in ("bn", "nobn"):
            config = trace.config(run)
            assert (config["lr"], config["batch_size"], config["optimizer"], config["seed"]) == (0.2, 32, "sgd", 7)
            assert config["momentum"] == 0
            assert loss_steps(trace, run) == [0, 1]  # one epoch of batches of 32
            for rate in sgd_lr_used(trace, run):
                assert math.isclose(rate, 0.2, rel_tol=1e-3)

    # the defaults: lr 0.1, batch size 64, sgd, seed 0, 5 epochs
    result = invoke(bare, "--out", tmp_path / "defaults")
    assert result.exit_code == 0, result.output
    with load_trace(tmp_path / "defaults" / "trace.covshift") as trace:
        for run in ("bn", "nobn"):
            config = trace.config(run)
            assert (config["lr"], config["batch_size"], config["optimizer"], config["seed"]) == (0.1, 64, "sgd", 0)
            assert config["steps"] == 5 and loss_steps(trace, run) == list(range(5))
            for rate in sgd_lr_used(trace, run):
                assert math.isclose(rate, 0.1, rel_tol=1e-3)


def test_named_factory_is_used(tmp_path):
    path = write_model(tmp_path, '''
        def build_model():
            raise RuntimeError("build_model must not be called")


        def wide():
            return mlp(hidden=16)


        def data():
            return make_data()
        ''')
    result = invoke(f"{path}:wide", "--steps", 2, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    with load_trace(tmp_path / "o" / "trace.covshift") as trace:
        for run in ("bn", "nobn"):
            assert trace.config(run)["factory"] == "wide"
            units = trace.units(run=run, layer="0")
            assert units[units["step"] == 0]["unit"].nunique() == 16


def test_default_out_folder_with_named_factory_uses_the_file_stem(tmp_path, monkeypatch):
    path = write_model(tmp_path, GOOD + "\n\ndef other():\n    return mlp()\n", name="stemmed.py")
    monkeypatch.chdir(tmp_path)
    result = invoke(f"{path.name}:other", "--steps", 1)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "reports" / "stemmed" / "trace.covshift").is_file()


def test_module_level_instance_is_used_and_not_mutated(tmp_path, monkeypatch):
    path = write_model(tmp_path, '''
        config = {"batch_size": 16}
        torch.manual_seed(99)
        model = mlp()
        model.eval()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        first_weights = []  # the weight of every copy of layer 0 when it first trains


        def _record(module, args):
            if module.training and torch.is_grad_enabled() and not any(m is module for m, _ in first_weights):
                first_weights.append((module, module.weight.detach().clone()))


        model[0].register_forward_pre_hook(_record)


        def data():
            return make_data()
        ''')
    loaded = []
    real_load = covshift.modelfile.load  # the CLI imports it when a command runs

    def capture(spec):
        loaded.append(real_load(spec))
        return loaded[-1]

    monkeypatch.setattr(covshift.modelfile, "load", capture)
    result = invoke(path, "--steps", 3, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    module = loaded[0].module
    instance = module.model
    assert instance.training is False and all(not m.training for m in instance.modules())
    state = instance.state_dict()
    assert state.keys() == module.initial.keys()
    for key, value in module.initial.items():
        assert torch.equal(state[key], value), key
    assert len(instance[0]._forward_pre_hooks) == 1 and not instance[0]._forward_hooks
    # both runs trained a copy that started from the instance's weights
    assert len(module.first_weights) == 2
    assert all(copy is not instance[0] for copy, _ in module.first_weights)
    for _, weight in module.first_weights:
        assert torch.equal(weight, module.initial["0.weight"])
    with load_trace(tmp_path / "o" / "trace.covshift") as trace:
        assert loss_steps(trace, "bn") == loss_steps(trace, "nobn") == [0, 1, 2]


DIVERGING = '''
config = {"batch_size": 16}


class Explode(nn.Module):
    """Returns inf from its third training call on."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if self.calls >= 3:
                return x * float("inf")
        return x


def build_model(batchnorm):
    if batchnorm:
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), Explode())


def data():
    return make_data()
'''


def test_diverging_run_stops_and_the_other_carries_on(tmp_path):
    path = write_model(tmp_path, DIVERGING)
    result = invoke(path, "--steps", 6, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    with load_trace(tmp_path / "o" / "trace.covshift") as trace:
        bad, good = trace.config("nobn"), trace.config("bn")
        # Explode (layer "3") returns inf at the third training step, index 2
        assert bad["diverged_at"] == 2 and isinstance(bad["diverged_at"], int)
        assert bad["first_nonfinite_layer"] == "3"
        losses = trace.scalars(run="nobn", layer="", metric="loss")
        assert losses["step"].max() == 2 < 6 - 1
        assert bad["steps"] < 6
        assert not math.isfinite(losses["value"].iloc[-1])
        assert all(math.isfinite(v) for v in losses["value"].iloc[:-1])
        assert good["diverged_at"] is None and good["first_nonfinite_layer"] is None
        assert good["steps"] == 6 and loss_steps(trace, "bn") == list(range(6))
    rows = summary_rows(result.output)
    header = rows["run"]
    assert "2" in dict(zip(header, rows["nobn"]))["diverged"] and "3" in dict(zip(header, rows["nobn"]))["diverged"]
    assert dict(zip(header, rows["bn"]))["diverged"] == "-"
    assert "diverged: nobn" in result.output


def interrupting_loss(after: int) -> str:
    """Model-file code whose loss raises KeyboardInterrupt on its ``after``-th training call."""
    return f'''
calls = 0


def loss_fn(output, target):
    global calls
    if torch.is_grad_enabled():
        calls += 1
        if calls == {after}:
            raise KeyboardInterrupt
    return nn.functional.cross_entropy(output, target)
'''


def test_interrupt_exits_130_and_keeps_the_partial_trace(tmp_path):
    """Ctrl-C during the nobn run's second step: the loss raises KeyboardInterrupt on its
    sixth training call (the bn run takes four)."""
    path = write_model(tmp_path, GOOD + interrupting_loss(6))
    result = invoke(path, "--steps", 4, "--out", tmp_path / "o")
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output
    assert "Traceback" not in result.output
    rows = summary_rows(result.output)
    header = rows["run"]
    assert dict(zip(header, rows["bn"]))["steps"] == "4"
    assert dict(zip(header, rows["nobn"]))["steps"] == "1"
    assert "interrupted" in dict(zip(header, rows["nobn"]))["diverged"]
    with load_trace(tmp_path / "o" / "trace.covshift") as trace:
        assert loss_steps(trace, "bn") == [0, 1, 2, 3]
        assert loss_steps(trace, "nobn") == [0]
        assert trace.config("nobn")["interrupted"] is True
        assert trace.config("bn")["interrupted"] is False


def test_interrupt_during_the_first_run(tmp_path):
    path = write_model(tmp_path, GOOD + interrupting_loss(3))
    result = invoke(path, "--steps", 4, "--out", tmp_path / "o")
    assert result.exit_code == 130, result.output
    rows = summary_rows(result.output)
    assert dict(zip(rows["run"], rows["bn"]))["steps"] == "2"
    with load_trace(tmp_path / "o" / "trace.covshift") as trace:
        assert trace.runs == ["bn"]
        assert loss_steps(trace, "bn") == [0, 1]


def test_console_script_subprocess(tmp_path):
    path = write_model(tmp_path, GOOD)
    done = subprocess.run(
        [sys.executable, "-m", "covshift", "trace", str(path), "--steps", "2", "--out", str(tmp_path / "o")],
        check=False, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    rows = summary_rows(done.stdout)
    assert {"bn", "nobn"} <= set(rows)
    assert str(tmp_path / "o" / "trace.covshift") in done.stdout
    with load_trace(tmp_path / "o" / "trace.covshift") as trace:
        assert trace.runs == ["bn", "nobn"]
        assert loss_steps(trace, "nobn") == [0, 1]
    missing = subprocess.run([sys.executable, "-m", "covshift", "trace", str(tmp_path / "none.py")],
                             check=False, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.startswith("error:") and "Traceback" not in missing.stderr


@pytest.mark.parametrize("device, words", [("cuda:0", "no CUDA GPU"), ("nonsense", "not a device")])
def test_unusable_device_is_a_clear_error(tmp_path, device, words):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(app, ["trace", str(tmp_path / "any.py"), "--device", device])
    assert result.exit_code == 2
    assert words in result.output and "Traceback" not in result.output
