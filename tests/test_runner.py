"""covshift.runner: the BN and no-BN runs of a model file train under identical conditions.

The model files written here record, from inside the model, what training actually does:
a forward pre-hook on each Linear keeps every training input batch and the weights the
layer had at its first training forward. Nothing of this goes through the Tracer.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import covshift
from covshift import modelfile, runner
from covshift.modelfile import ModelFileError
from covshift.runner import Settings

PREAMBLE = '''\
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SEEN = []   # (layer object, input batch) for every training forward of a Linear
FIRST = []  # (layer object, weight, bias) at each Linear's first training forward


def _record(module, args):
    if not (module.training and torch.is_grad_enabled()):
        return  # the check batch, the BN derivation's example run and validation
    SEEN.append((module, args[0].detach().clone()))
    if not any(m is module for m, _, _ in FIRST):
        FIRST.append((module, module.weight.detach().clone(), module.bias.detach().clone()))


def watched(model):
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(_record)
    return model


def make_data(n_train=64, n_val=32):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n_train + n_val, 4, generator=g)
    y = torch.randint(0, 3, (n_train + n_val,), generator=g)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])
'''

DERIVED = '''
config = {"batch_size": 16}


def build_model():
    return watched(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))


def data():
    return make_data()
'''

# The two calls differ in how much of the RNG they use before building the layers, so
# with the same seed their shared layers would start from different weights.
OWN_PAIR = '''
config = {"batch_size": 16}


def build_model(batchnorm):
    if batchnorm:
        torch.rand(100)
        return watched(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)))
    return watched(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))


def data():
    return make_data()
'''


def load(tmp_path: Path, body: str, name: str = "net.py") -> modelfile.ModelFile:
    path = tmp_path / name
    path.write_text(PREAMBLE + textwrap.dedent(body))
    return modelfile.load(str(path))


def first_layer_batches(mf: modelfile.ModelFile) -> list[list[torch.Tensor]]:
    """Per run (in training order), the input batches its first Linear (the one taking 4
    features) trained on."""
    runs: list[tuple[nn.Module, list[torch.Tensor]]] = []
    for module, x in mf.module.SEEN:
        if module.in_features != 4:
            continue
        if not runs or runs[-1][0] is not module:
            assert all(owner is not module for owner, _ in runs), "runs interleave"
            runs.append((module, []))
        runs[-1][1].append(x)
    return [batches for _, batches in runs]


def initial_weights(mf: modelfile.ModelFile) -> list[list[torch.Tensor]]:
    """Per run, the weight and bias of each of its Linears when it first trained."""
    runs: list[list[torch.Tensor]] = []
    for module, weight, bias in mf.module.FIRST:
        if module.in_features == 4:  # a run's first Linear starts the next run
            runs.append([])
        runs[-1] += [weight, bias]
    return runs


def same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def reset(mf: modelfile.ModelFile) -> None:
    mf.module.SEEN.clear()
    mf.module.FIRST.clear()


def loss_steps(path: Path, run: str) -> list[int]:
    with covshift.load(path) as trace:
        return sorted(trace.scalars(run=run, layer="", metric="loss")["step"].tolist())


# -- (1) the same mini-batches -------------------------------------------------------------


@pytest.mark.parametrize("body", [DERIVED, OWN_PAIR], ids=["build_model()", "build_model(batchnorm)"])
def test_both_runs_see_the_same_batches(tmp_path, body):
    mf = load(tmp_path, body)
    outcomes = runner.train_pair(mf, {"epochs": 2}, tmp_path / "t.covshift")
    assert [o.run for o in outcomes] == ["bn", "nobn"]
    bn, nobn = first_layer_batches(mf)
    assert len(bn) == len(nobn) == 2 * 64 // 16
    assert same_tensors(bn, nobn)
    # each epoch is a shuffled pass over the whole training set
    x_train = mf.module.make_data()[0].tensors[0]
    for epoch in (bn[:4], bn[4:]):
        rows = torch.cat(epoch)
        assert rows.shape == x_train.shape
        assert torch.equal(rows[rows[:, 0].argsort()], x_train[x_train[:, 0].argsort()])
    assert not torch.equal(torch.cat(bn[:4]), x_train)  # shuffled
    assert not same_tensors(bn[:4], bn[4:])  # reshuffled each epoch


def test_batch_order_does_not_depend_on_the_global_rng(tmp_path):
    mf = load(tmp_path, DERIVED)
    sequences = []
    for i, global_seed in enumerate((1, 2)):
        reset(mf)
        torch.manual_seed(global_seed)
        torch.rand(3 + 10 * global_seed)
        runner.train_pair(mf, {"steps": 6}, tmp_path / f"t{i}.covshift")
        sequences.append(first_layer_batches(mf))
    (bn1, nobn1), (bn2, nobn2) = sequences
    assert len(bn1) == 6
    assert same_tensors(bn1, bn2) and same_tensors(nobn1, nobn2) and same_tensors(bn1, nobn1)


def test_train_pair_leaves_a_dataloaders_own_shuffling_alone(tmp_path):
    """A DataLoader from data() with its own shuffling still gives both runs one order."""
    mf = load(tmp_path, '''
        def build_model():
            return watched(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))


        def data():
            train, val = make_data()
            return DataLoader(train, batch_size=8, shuffle=True), DataLoader(val, batch_size=8)
        ''')
    runner.train_pair(mf, {"epochs": 1}, tmp_path / "t.covshift")
    bn, nobn = first_layer_batches(mf)
    assert len(bn) == 64 // 8  # the DataLoader's batch size is used
    assert same_tensors(bn, nobn)


# -- (2) the same initial weights ------------------------------------------------------------


def test_shared_layers_start_equal_derived(tmp_path):
    mf = load(tmp_path, DERIVED)
    runner.train_pair(mf, {"steps": 3}, tmp_path / "t.covshift")
    bn, nobn = initial_weights(mf)
    assert len(bn) == len(nobn) == 4  # two Linears: weight and bias each
    assert same_tensors(bn, nobn)


def test_build_pair_state_dicts_match_and_do_not_alias(tmp_path):
    mf = load(tmp_path, DERIVED)
    x = mf.module.make_data()[0].tensors[0][:16]
    pair = runner.build_pair(mf, x, seed=5)
    bn_state, nobn_state = pair["bn"].state_dict(), pair["nobn"].state_dict()
    assert set(nobn_state) < set(bn_state)  # bn adds the BatchNorm layers
    for name, value in nobn_state.items():
        assert torch.equal(bn_state[name], value), name
        assert bn_state[name].data_ptr() != value.data_ptr(), name


def test_own_pair_would_differ_without_sharing(tmp_path):
    """The premise of the next test: with one seed, this file's two calls build different
    shared layers."""
    mf = load(tmp_path, OWN_PAIR)
    torch.manual_seed(0)
    bn = mf.module.build_model(True)
    torch.manual_seed(0)
    nobn = mf.module.build_model(False)
    assert not torch.equal(bn[0].weight, nobn[0].weight)


def test_shared_layers_start_equal_own_pair(tmp_path):
    mf = load(tmp_path, OWN_PAIR)
    runner.train_pair(mf, {"steps": 3}, tmp_path / "t.covshift")
    bn, nobn = initial_weights(mf)
    assert len(bn) == len(nobn) == 4
    assert same_tensors(bn, nobn)
    # and build_pair gives separate tensors with equal values (a batch orders the layers by the forward)
    pair = runner.build_pair(mf, torch.randn(5, 4), seed=0)
    bn_linears = [m for m in pair["bn"].modules() if isinstance(m, nn.Linear)]
    nobn_linears = [m for m in pair["nobn"].modules() if isinstance(m, nn.Linear)]
    for a, b in zip(bn_linears, nobn_linears, strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
        assert a.weight.data_ptr() != b.weight.data_ptr()


# -- (3) the same optimizer settings -----------------------------------------------------


def test_identical_optimizer_settings(tmp_path, monkeypatch):
    mf = load(tmp_path, DERIVED)
    made = []
    real = runner.make_optimizer

    def spy(model, settings):
        optimizer = real(model, settings)
        made.append((model, optimizer))
        return optimizer

    monkeypatch.setattr(runner, "make_optimizer", spy)
    overrides = {"steps": 2, "lr": 0.03, "momentum": 0.9, "weight_decay": 1e-3, "seed": 4}
    runner.train_pair(mf, overrides, tmp_path / "t.covshift")
    assert len(made) == 2
    groups = []
    for model, optimizer in made:
        assert type(optimizer) is torch.optim.SGD
        (group,) = optimizer.param_groups
        assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}
        groups.append({k: v for k, v in group.items() if k != "params"})
    assert groups[0] == groups[1]
    assert (groups[0]["lr"], groups[0]["momentum"], groups[0]["weight_decay"]) == (0.03, 0.9, 1e-3)
    with covshift.load(tmp_path / "t.covshift") as trace:
        configs = [trace.config(run) for run in ("bn", "nobn")]
    keys = ("lr", "optimizer", "momentum", "weight_decay", "batch_size", "seed")
    assert [configs[0][k] for k in keys] == [configs[1][k] for k in keys] == [0.03, "sgd", 0.9, 1e-3, 16, 4]
    assert [c["variant"] for c in configs] == ["bn", "nobn"]
    for config in configs:
        for key in ("steps", "diverged_at", "first_nonfinite_layer"):
            assert key in config
        assert config["steps"] == 2 and config["diverged_at"] is None


def test_adam_in_both_runs(tmp_path, monkeypatch):
    mf = load(tmp_path, DERIVED)
    made = []
    real = runner.make_optimizer
    monkeypatch.setattr(runner, "make_optimizer", lambda m, s: made.append(real(m, s)) or made[-1])
    runner.train_pair(mf, {"steps": 1, "optimizer": "adam", "lr": 0.002}, tmp_path / "t.covshift")
    assert [type(o) for o in made] == [torch.optim.Adam, torch.optim.Adam]
    assert [o.param_groups[0]["lr"] for o in made] == [0.002, 0.002]


# -- (4) the seed ------------------------------------------------------------------------


def test_seed_sets_batch_order_and_initial_weights(tmp_path):
    mf = load(tmp_path, DERIVED)
    seen = {}
    for i, seed in enumerate((1, 2, 1)):
        reset(mf)
        runner.train_pair(mf, {"steps": 4, "seed": seed}, tmp_path / f"t{i}.covshift", only="nobn")
        (batches,) = first_layer_batches(mf)
        (weights,) = initial_weights(mf)
        seen[i] = batches, weights
    (b1, w1), (b2, w2), (b1_again, w1_again) = seen[0], seen[1], seen[2]
    assert same_tensors(b1, b1_again) and same_tensors(w1, w1_again)
    assert not torch.equal(torch.cat(b1), torch.cat(b2))
    # the same samples, in another order
    rows1, rows2 = torch.cat(b1), torch.cat(b2)
    assert torch.equal(rows1[rows1[:, 0].argsort()], rows2[rows2[:, 0].argsort()])
    assert not torch.equal(w1[0], w2[0])


def test_each_seed_trains_exactly_as_a_single_seed_pair(tmp_path):
    mf = load(tmp_path, DERIVED)
    several = tmp_path / "several.covshift"
    outcomes = runner.train_pair(mf, {"steps": 3}, several, seeds=[2, 0])
    assert [o.run for o in outcomes] == ["bn seed=2", "nobn seed=2", "bn seed=0", "nobn seed=0"]
    batches, weights = first_layer_batches(mf), initial_weights(mf)
    assert same_tensors(batches[0], batches[1]) and same_tensors(weights[0], weights[1])  # a seed's pair
    assert same_tensors(batches[2], batches[3]) and same_tensors(weights[2], weights[3])
    assert not torch.equal(weights[0][0], weights[2][0]) and not same_tensors(batches[0], batches[2])
    for seed in (2, 0):
        single = tmp_path / f"seed{seed}.covshift"
        runner.train_pair(mf, {"steps": 3, "seed": seed}, single)
        with covshift.load(several) as a, covshift.load(single) as b:
            assert b.runs == ["bn", "nobn"]
            for variant in runner.VARIANTS:
                run = f"{variant} seed={seed}"
                assert (a.config(run)["variant"], a.config(run)["seed"]) == (variant, seed)
                assert (a.scalars(run=run, layer="", metric="loss")["value"].tolist()
                        == b.scalars(run=variant, layer="", metric="loss")["value"].tolist())


@pytest.mark.parametrize("overrides, config, expected", [
    ({}, "", [0, 1]),
    ({}, 'config["seed"] = 3', [3, 4]),
    ({"seed": 7}, 'config["seed"] = 3', [7, 8]),
])
def test_a_count_of_seeds_starts_at_the_resolved_seed(tmp_path, overrides, config, expected):
    mf = load(tmp_path, DERIVED + config + "\n")
    path = tmp_path / "t.covshift"
    outcomes = runner.train_pair(mf, {"steps": 1, **overrides}, path, only="nobn", seeds=2)
    assert [o.run for o in outcomes] == [f"nobn seed={seed}" for seed in expected]
    with covshift.load(path) as trace:
        assert [trace.config(run)["seed"] for run in trace.runs] == expected


def test_a_rerun_removes_the_paired_runs_it_does_not_write_again(tmp_path):
    """Runs of an earlier covshift trace go; a sweep's runs and runs recorded otherwise stay."""
    mf = load(tmp_path, DERIVED)
    path = tmp_path / "t.covshift"
    runner.train_pair(mf, {"steps": 1}, path, seeds=2)
    s, train, val, variants = runner.prepare(mf, {"steps": 1})
    runner.train_run(mf, variants["bn"], "bn lr=0.1 init=1 seed=0", train, val, s, path, variant="bn",
                     extra={"sweep": True})
    with covshift.Tracer(nn.Linear(4, 3), path, run="mine", config={"note": "my own loop"}) as tracer:
        tracer.step(loss=1.0)
    runner.train_pair(mf, {"steps": 1}, path, only="nobn")
    with covshift.load(path) as trace:
        assert trace.runs == ["bn lr=0.1 init=1 seed=0", "mine", "nobn"]
    runner.train_pair(mf, {"steps": 1}, path)
    with covshift.load(path) as trace:
        assert trace.runs == ["bn lr=0.1 init=1 seed=0", "mine", "bn", "nobn"]


def test_a_broken_model_file_leaves_the_trace_alone(tmp_path):
    path = tmp_path / "t.covshift"
    runner.train_pair(load(tmp_path, DERIVED), {"steps": 1}, path, seeds=2)
    broken = load(tmp_path, DERIVED.replace("nn.Linear(4, 8)", "nn.Linear(5, 8)"), name="broken.py")
    with pytest.raises(ModelFileError, match="forward"):
        runner.train_pair(broken, {"steps": 1}, path)
    with covshift.load(path) as trace:
        assert trace.runs == ["bn seed=0", "nobn seed=0", "bn seed=1", "nobn seed=1"]


# -- (5) validation metrics --------------------------------------------------------------


def val_steps(path: Path, run: str, metric: str = "val_loss") -> list[int]:
    with covshift.load(path) as trace:
        frame = trace.scalars(run=run, layer="", metric=metric)
    return frame["step"].tolist()


@pytest.mark.parametrize("overrides, expected", [
    ({"epochs": 2}, [3, 7]),  # 4 steps per epoch: the last step of each epoch
    ({"epochs": 2, "eval_every": 3}, [2, 3, 5, 7]),  # after steps 3 and 6, and the epoch ends
    ({"epochs": 2, "eval_every": 4}, [3, 7]),  # coinciding with the epoch ends: once each
    ({"steps": 6}, [3, 5]),  # the end of epoch 1, and the end of training
])
def test_validation_steps(tmp_path, overrides, expected):
    mf = load(tmp_path, DERIVED)
    path = tmp_path / "t.covshift"
    runner.train_pair(mf, overrides, path)
    for run in ("bn", "nobn"):
        for metric in ("val_loss", "val_accuracy", "train_eval_loss", "train_eval_accuracy"):
            assert val_steps(path, run, metric) == expected, metric
        assert loss_steps(path, run) == list(range(expected[-1] + 1))


def test_validation_values_match_an_independent_evaluation(tmp_path):
    mf = load(tmp_path, DERIVED)
    train, val = mf.datasets()
    torch.manual_seed(0)
    model = mf.build()
    settings = Settings.resolve(mf.config, {"epochs": 1})
    path = tmp_path / "t.covshift"
    outcome = runner.train_run(mf, model, "nobn", train, val, settings, path)
    x, y = val.tensors
    model.eval()
    with torch.no_grad():
        out = model(x)
        expected_loss = float(nn.functional.cross_entropy(out, y))
        expected_accuracy = float((out.argmax(1) == y).float().mean())
    with covshift.load(path) as trace:
        frame = trace.scalars(run="nobn", layer="")
    last = frame[frame["step"] == 3].set_index("metric")["value"]
    assert math.isclose(last["val_loss"], expected_loss, rel_tol=1e-5)
    assert math.isclose(last["val_accuracy"], expected_accuracy, rel_tol=1e-9)
    assert math.isclose(outcome.val_loss, expected_loss, rel_tol=1e-5)
    # validation forwards are not training forwards: only 4 batches were recorded as inputs
    assert len([m for m, _ in mf.module.SEEN if m is model[0]]) == 4


EVAL_MODE = '''
config = {"batch_size": 16}


def build_model():  # BatchNorm and Dropout: a train-mode pass would give other losses
    return watched(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)))


def data():
    return make_data(n_val=20)
'''


def test_train_eval_values_match_an_independent_evaluation(tmp_path):
    """train_eval_* is the model in eval mode on the first len(val) = 20 training examples,
    in dataset order; the outcome's train_loss is its last value, not a mini-batch's."""
    mf = load(tmp_path, EVAL_MODE)
    train, val = mf.datasets()
    torch.manual_seed(0)
    model = mf.build()
    path = tmp_path / "t.covshift"
    outcome = runner.train_run(mf, model, "nobn", train, val, Settings.resolve(mf.config, {"epochs": 1}), path)
    x, y = train.tensors[0][:20], train.tensors[1][:20]
    model.eval()
    with torch.no_grad():
        out = model(x)
        expected_loss = float(nn.functional.cross_entropy(out, y))
        expected_accuracy = int((out.argmax(1) == y).sum()) / 20
    with covshift.load(path) as trace:
        frame = trace.scalars(run="nobn", layer="")
        config = trace.config("nobn")
    last = frame[frame["step"] == 3].set_index("metric")["value"]
    assert math.isclose(last["train_eval_loss"], expected_loss, rel_tol=1e-5)
    assert math.isclose(last["train_eval_accuracy"], expected_accuracy, rel_tol=1e-9)
    assert outcome.train_loss == last["train_eval_loss"] != last["loss"]
    assert config["train_loss"] == outcome.train_loss
    assert (config["val_examples"], config["train_eval_examples"]) == (20, 20)
    y_val = val.tensors[1]
    assert config["chance_accuracy"] == int(torch.bincount(y_val).max()) / 20
    assert len([m for m, _ in mf.module.SEEN if m is model[0]]) == 4  # no evaluation forward trained


def test_regression_targets_get_no_accuracy(tmp_path):
    """Float targets: losses only, no accuracy and no chance level; a training set smaller than
    the validation set is evaluated whole."""
    mf = load(tmp_path, '''
        config = {"batch_size": 8}


        def build_model():
            return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


        def data():
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(40, 4, generator=g), torch.randn(40, 2, generator=g)
            return TensorDataset(x[:16], y[:16]), TensorDataset(x[16:], y[16:])


        def loss_fn(output, target):
            return nn.functional.mse_loss(output, target)
        ''')
    path = tmp_path / "t.covshift"
    runner.train_pair(mf, {"epochs": 1}, path, only="nobn")
    with covshift.load(path) as trace:
        metrics = set(trace.scalars(run="nobn", layer="")["metric"])
        config = trace.config("nobn")
    assert {"val_loss", "train_eval_loss"} <= metrics
    assert not {"val_accuracy", "train_eval_accuracy"} & metrics
    assert "chance_accuracy" not in config
    assert (config["val_examples"], config["train_eval_examples"]) == (24, 16)


LANDSCAPE = ["loss_variation", "grad_predictiveness", "beta_smoothness", "landscape_loss_min",
             "landscape_loss_max", "grad_predictiveness_min"]


def test_ics_every_records_every_landscape_measure(tmp_path):
    mf = load(tmp_path, DERIVED)
    path = tmp_path / "t.covshift"
    runner.train_pair(mf, {"steps": 4, "ics_every": 2}, path, only="nobn")
    with covshift.load(path) as trace:
        frame = trace.scalars(run="nobn", layer="", metric=LANDSCAPE)
    table = frame.pivot(index="step", columns="metric", values="value")
    assert list(table.index) == [0, 2] and sorted(table.columns) == sorted(LANDSCAPE)
    assert (table["loss_variation"] == table["landscape_loss_max"] - table["landscape_loss_min"]).all()
    assert (table["grad_predictiveness_min"] <= table["grad_predictiveness"]).all()
    assert (table["landscape_loss_min"] > 0).all()


# -- (6) Settings.resolve ------------------------------------------------------------------


def test_settings_defaults():
    s = Settings.resolve()
    assert (s.epochs, s.steps, s.lr, s.batch_size, s.optimizer, s.momentum, s.weight_decay, s.seed) == (
        5, None, 0.1, None, "sgd", 0.0, 0.0, 0)


def test_settings_precedence():
    file_config = {"lr": 0.05, "batch_size": 16, "optimizer": "adam", "seed": 3, "epochs": 2}
    cli = {"lr": 0.2, "batch_size": None, "optimizer": None, "seed": 7, "epochs": None, "momentum": 0.5}
    s = Settings.resolve(file_config, cli)
    assert s.lr == 0.2 and s.seed == 7 and s.momentum == 0.5  # the command line wins
    assert s.batch_size == 16 and s.optimizer == "adam" and s.epochs == 2  # None keeps the file's
    assert s.weight_decay == 0.0 and s.steps is None  # neither: the default
    assert Settings.resolve(file_config).lr == 0.05  # the file over the defaults
    assert Settings.resolve({"momentum": 0.9}, {"momentum": 0.0}).momentum == 0.0  # 0 is a value, not None


def test_settings_ignore_unknown_keys_and_check_the_optimizer():
    assert Settings.resolve({"model_file": "x.py", "lr": 0.3}).lr == 0.3
    with pytest.raises(ModelFileError, match="sgd or adam"):
        Settings.resolve({"optimizer": "adam"}, {"optimizer": "rmsprop"})


def test_steps_override_epochs_and_batch_size_precedence(tmp_path):
    mf = load(tmp_path, '''
        config = {"batch_size": 32, "epochs": 3}


        def build_model():
            return watched(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))


        def data():
            train, val = make_data()
            return DataLoader(train, batch_size=8), DataLoader(val, batch_size=8)
        ''')
    path = tmp_path / "t.covshift"
    runner.train_pair(mf, {}, path, only="bn")
    assert loss_steps(path, "bn") == list(range(3 * 64 // 32))  # the config's batch size over the loader's
    runner.train_pair(mf, {"steps": 5}, path, only="bn")
    assert loss_steps(path, "bn") == list(range(5))
    runner.train_pair(mf, {"batch_size": 64}, path, only="bn")
    assert loss_steps(path, "bn") == list(range(3))


def test_validation_leaves_the_training_rng_alone(tmp_path):
    """Dropout draws from the global RNG: validating after every step must not shift its masks."""
    mf = load(tmp_path, '''
        config = {"batch_size": 16}


        def build_model():
            return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))


        def data():
            return make_data()
        ''')
    losses = []
    for i, eval_every in enumerate((None, 1)):
        path = tmp_path / f"t{i}.covshift"
        runner.train_pair(mf, {"steps": 6, "eval_every": eval_every}, path, only="nobn")
        with covshift.load(path) as trace:
            losses.append(trace.scalars(run="nobn", layer="", metric="loss")["value"].tolist())
    assert len(losses[0]) == 6 and losses[0] == losses[1]
