"""covshift.store.merge and `covshift merge`: every run of each input, with all its data,
in one trace; run-name clashes; no overwriting without --overwrite; one-line errors."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import covshift
from covshift.cli import app
from covshift.store import TraceError, TraceWriter
from covshift.store.merge import RunClash, copy_runs, merge

from helpers import fit
from trace_compare import assert_same_data

runner = CliRunner()


def record(path, runs: list[str], logged: str) -> None:
    """Record ``runs`` of a small model into ``path``, with per-unit rows and histograms
    (detail every 2 steps) and the extra run metric ``logged``: the two files number their
    metrics differently."""
    for k, run in enumerate(runs):
        torch.manual_seed(k)
        model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
        fit(model, path, torch.randn(8, 3), torch.randint(0, 2, (8,)), 5, run=run, detail_every=2, config={"k": k},
            after_step=lambda tracer, step: tracer.log(**{logged: 1.0 + step}))


@pytest.fixture
def inputs(tmp_path):
    a, b = tmp_path / "a.covshift", tmp_path / "b.covshift"
    record(a, ["bn", "nobn"], "first")
    record(b, ["plain"], "second")
    return a, b


def meta(path) -> dict[str, str]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT key, value FROM meta"))


def test_merge_copies_every_run_with_all_its_data(inputs, tmp_path):
    a, b = inputs
    out = tmp_path / "out" / "c.covshift"
    result = runner.invoke(app, ["merge", str(a), str(b), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 runs" in result.output
    with covshift.load(a) as ta, covshift.load(b) as tb, covshift.load(out) as tc:
        assert tc.runs == ["bn", "nobn", "plain"]
        for source, run in ((ta, "bn"), (ta, "nobn"), (tb, "plain")):
            assert_same_data(source, tc, run)
            assert tc.config(run) == source.config(run)
        assert set(tc.scalars(run="plain")["metric"]) >= {"second", "loss", "mean"}
        assert "first" not in set(tc.scalars(run="plain")["metric"])
    with sqlite3.connect(a) as ca, sqlite3.connect(out) as cc:
        created = "SELECT name, created FROM runs WHERE name = 'nobn'"
        assert ca.execute(created).fetchall() == cc.execute(created).fetchall()
    assert meta(out) == meta(a)


def test_clash_is_an_error_unless_renamed_or_replaced(inputs, tmp_path):
    a, _ = inputs
    out = tmp_path / "c.covshift"
    clash = runner.invoke(app, ["merge", str(a), str(a), "-o", str(out)])
    assert clash.exit_code == 2, clash.output
    assert "run 'bn'" in clash.output and "--on-clash" in clash.output and "Traceback" not in clash.output
    assert sorted(tmp_path.iterdir()) == sorted([a, tmp_path / "b.covshift"])  # nothing left behind

    renamed = runner.invoke(app, ["merge", str(a), str(a), "-o", str(out), "--on-clash", "rename"])
    assert renamed.exit_code == 0, renamed.output
    with covshift.load(a) as ta, covshift.load(out) as tc:
        assert tc.runs == ["bn", "nobn", "bn (2)", "nobn (2)"]
        assert_same_data(ta, tc, "nobn", "nobn (2)")
    assert merge([a, a, a], tmp_path / "d.covshift", on_clash="rename")[-2:] == ["bn (3)", "nobn (3)"]

    assert merge([a, a], tmp_path / "e.covshift", on_clash="replace") == ["bn", "nobn", "bn", "nobn"]
    with covshift.load(tmp_path / "e.covshift") as te:
        assert te.runs == ["bn", "nobn"]
    bad = runner.invoke(app, ["merge", str(a), "-o", str(tmp_path / "f.covshift"), "--on-clash", "skip"])
    assert bad.exit_code == 2 and "--on-clash" in bad.output


def test_copy_runs_into_an_open_trace_checks_its_runs(inputs, tmp_path):
    a, b = inputs
    writer = TraceWriter(tmp_path / "live.covshift")
    try:
        assert copy_runs(b, writer) == ["plain"]
        with pytest.raises(RunClash, match="'plain'"):
            copy_runs(b, writer)
    finally:
        writer.close()


def test_an_existing_output_is_kept_unless_overwrite(inputs, tmp_path):
    a, b = inputs
    out = tmp_path / "c.covshift"
    merge([a], out)
    before = out.read_bytes()
    refused = runner.invoke(app, ["merge", str(b), "-o", str(out)])
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert out.read_bytes() == before
    done = runner.invoke(app, ["merge", str(b), "-o", str(out), "--overwrite"])
    assert done.exit_code == 0, done.output
    with covshift.load(out) as tc:
        assert tc.runs == ["plain"]
    same = runner.invoke(app, ["merge", str(a), str(out), "-o", str(out), "--overwrite"])
    assert same.exit_code == 2 and "one of the inputs" in same.output


def test_a_corrupt_or_missing_input_is_one_line(inputs, tmp_path):
    a, _ = inputs
    corrupt = tmp_path / "corrupt.covshift"
    corrupt.write_bytes(a.read_bytes()[:20000])
    out = tmp_path / "c.covshift"
    for bad, message in ((corrupt, "corrupt"), (tmp_path / "none.covshift", "no trace file")):
        result = runner.invoke(app, ["merge", str(a), str(bad), "-o", str(out)])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not out.exists()
    with pytest.raises(TraceError, match="corrupt"):
        merge([corrupt], out)
