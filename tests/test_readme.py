"""The README documents what the code does: commands, metric names, nonlinearities."""

import pathlib
import re

from torch import nn

from covshift import stats

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^pip install -e \"\.\[dev\]\" && .+$", README, flags=re.M)
    assert commands, "README gives no test command"
    test_command = commands[0].split("#")[0].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci]


def test_every_metric_is_documented():
    for name in stats.LAYER_METRICS:
        assert f"`{name}`" in README or f"`{name}`," in README, name
    for name in stats.PARAM_METRICS:
        assert f"`weight.{name}`" in README, name
    for name in stats.RUN_METRICS:
        assert f"| `{name}` |" in README, name


def test_every_nonlinearity_is_in_the_table():
    modules = [nn.Sigmoid(), nn.Tanh(), nn.Softsign(), nn.Hardtanh(), nn.ReLU(), nn.ReLU6(),
               nn.LeakyReLU(), nn.ELU(), nn.Softplus(), nn.GELU(), nn.SiLU()]
    for module in modules:
        assert stats.nonlinearity(module) is not None
        assert f"| `nn.{type(module).__name__}" in README, type(module).__name__


def test_documented_error_bound_matches_code():
    assert f"ε = {stats.sample_error_bound(4096):.3f}" in README
