"""The trace file: format checks, clear errors on bad files, DataFrame shapes."""

import json
import sqlite3

import numpy as np
import pytest
import torch
from helpers import fit
from torch import nn

import covshift
from covshift.store import APPLICATION_ID, SCHEMA_VERSION, TraceError, TraceWriter


def write_trace(path, steps=3, run="r", **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    return fit(model, path, x, y, steps, run=run, detail_every=2, **kwargs)


def test_missing_file(tmp_path):
    with pytest.raises(TraceError, match="no trace file"):
        covshift.load(tmp_path / "nope.covshift")


def test_not_sqlite(tmp_path):
    path = tmp_path / "t.covshift"
    path.write_text("hello, I am not a database\n" * 100)
    with pytest.raises(TraceError, match="not a covshift trace"):
        covshift.load(path)


def test_other_sqlite_file(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE things (a)")
    with pytest.raises(TraceError, match="another program"):
        covshift.load(path)
    with pytest.raises(TraceError, match="another program"):
        TraceWriter(path)  # the writer refuses to append to it too


def test_newer_schema(tmp_path):
    path = tmp_path / "t.covshift"
    write_trace(path)
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(TraceError, match="newer covshift"):
        covshift.load(path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "t.covshift"
    write_trace(path, steps=20)
    data = bytearray(path.read_bytes())
    assert len(data) > 8192
    data[4096:] = b"\xff" * (len(data) - 4096)  # wreck every page after the first
    path.write_bytes(bytes(data))
    with pytest.raises(TraceError):
        trace = covshift.load(path)
        trace.scalars()


def test_truncated_file(tmp_path):
    path = tmp_path / "t.covshift"
    write_trace(path, steps=20)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(TraceError):
        trace = covshift.load(path)
        trace.scalars()


def test_file_identity(tmp_path):
    path = tmp_path / "t.covshift"
    write_trace(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        meta = dict(conn.execute("SELECT key, value FROM meta"))
    assert meta["covshift_version"] == covshift.__version__


def test_tables(tmp_path):
    path = tmp_path / "t.covshift"
    write_trace(path, steps=3)
    trace = covshift.load(path)
    assert trace.runs == ["r"]
    assert trace.layers == ["0", "1", "2"]
    info = trace.layer_info()
    assert list(info.columns) == ["run", "layer", "type", "nonlinearity", "position"]
    assert info["type"].tolist() == ["Linear", "Tanh", "Linear"]
    assert info["nonlinearity"].tolist()[1] == "tanh"

    scalars = trace.scalars()
    assert list(scalars.columns) == ["run", "step", "layer", "metric", "value"]
    assert sorted(scalars["step"].unique()) == [0, 1, 2]
    assert scalars["value"].dtype == float
    loss = trace.scalars(metric="loss")
    assert loss["layer"].tolist() == ["", "", ""]
    both = trace.scalars(layer=["0", "2"], metric=["mean", "weight.norm"])
    assert set(both["layer"]) == {"0", "2"} and set(both["metric"]) == {"mean", "weight.norm"}
    assert trace.scalars(run="missing").empty

    units = trace.units()
    assert list(units.columns) == ["run", "step", "layer", "unit", "mean", "var"]
    assert sorted(units["step"].unique()) == [0, 2]
    assert len(units[(units["step"] == 0) & (units["layer"] == "0")]) == 6

    hist = trace.histograms(layer="1")
    assert list(hist.columns) == ["run", "step", "layer", "bin", "left", "right", "count"]
    one = hist[hist["step"] == 0]
    assert one["count"].sum() == 8 * 6  # every value of a small output is counted
    assert np.isneginf(one["left"].iloc[0]) and np.isposinf(one["right"].iloc[-1])
    assert one["left"].iloc[1] == -1.0 and one["right"].iloc[-2] == 1.0  # tanh's range
    assert (one["left"].to_numpy()[1:] == one["right"].to_numpy()[:-1]).all()


def test_config_and_runs(tmp_path):
    path = tmp_path / "t.covshift"
    write_trace(path, run="bn", config={"variant": "bn", "lr": 0.1})
    write_trace(path, run="nobn", steps=2)
    trace = covshift.load(path)
    assert trace.runs == ["bn", "nobn"]
    config = trace.config("bn")
    assert config["variant"] == "bn" and config["lr"] == 0.1 and config["steps"] == 3
    assert config["tracer"]["detail_every"] == 2
    assert trace.config("nobn")["steps"] == 2
    with pytest.raises(KeyError, match="bn, nobn"):
        trace.config("other")
    assert set(trace.scalars()["run"]) == {"bn", "nobn"}


def test_nan_is_read_back_as_nan(tmp_path):
    path = tmp_path / "t.covshift"
    writer = TraceWriter(path)
    run = writer.add_run("r", {})
    writer.add_layer(run, "a", "Linear", None, 0, None)
    writer.write(run, [(0, "a", "mean", float("nan")), (0, "a", "max", float("inf")), (0, "", "loss", 1.5)], [], [])
    writer.close()
    frame = covshift.load(path).scalars().set_index("metric")["value"]
    assert np.isnan(frame["mean"]) and np.isposinf(frame["max"]) and frame["loss"] == 1.5


def test_no_pickle_in_package():
    import pathlib

    root = pathlib.Path(covshift.__file__).parent
    for source in root.glob("*.py"):
        text = source.read_text()
        assert "pickle" not in text, source
        assert "torch.save" not in text and "torch.load" not in text, source


def test_config_is_json(tmp_path):
    path = tmp_path / "t.covshift"
    write_trace(path, config={"shape": (1, 2), "device": torch.device("cpu")})
    with sqlite3.connect(path) as conn:
        (text,) = conn.execute("SELECT config FROM runs").fetchone()
    config = json.loads(text)
    assert config["shape"] == [1, 2] and config["device"] == "cpu"


def test_remove_runs(tmp_path):
    path = tmp_path / "t.covshift"
    for run in ("a", "b", "c"):
        write_trace(path, run=run)
    writer = TraceWriter(path)
    assert writer.remove_runs(["a", "c", "missing"]) == ["a", "c"]
    writer.close()
    with covshift.load(path) as trace:
        assert trace.runs == ["b"]
        for frame in (trace.scalars(), trace.units(), trace.histograms(), trace.layer_info()):
            assert len(frame) and set(frame["run"]) == {"b"}
    with sqlite3.connect(path) as conn:
        for table in ("series", "units", "histograms", "layers"):
            orphans = conn.execute(f"SELECT COUNT(*) FROM {table} WHERE run_id NOT IN (SELECT id FROM runs)")
            assert orphans.fetchone()[0] == 0, table


def test_remove_runs_is_one_transaction(tmp_path):
    path = tmp_path / "t.covshift"
    for run in ("a", "b"):
        write_trace(path, run=run)

    def names():
        yield "a"
        raise RuntimeError("interrupted")

    writer = TraceWriter(path)
    with pytest.raises(RuntimeError):
        writer.remove_runs(names())
    writer.close()
    with covshift.load(path) as trace:
        assert trace.runs == ["a", "b"] and set(trace.scalars()["run"]) == {"a", "b"}


def test_a_removed_run_can_be_written_again_by_the_same_writer(tmp_path):
    """The new run may reuse the removed run's id: the writer must not keep its old layers."""
    path = tmp_path / "t.covshift"
    writer = TraceWriter(path)
    old = writer.add_run("r", {})
    writer.add_layer(old, "0", "Linear", None, 0, None)
    writer.remove_runs(["r"])
    new = writer.add_run("r", {})
    writer.add_layer(new, "0", "Tanh", "tanh", 0, None)
    writer.write(new, [(0, "0", "mean", 0.5)], [], [])
    writer.close()
    with covshift.load(path) as trace:
        assert trace.layer_info()["type"].tolist() == ["Tanh"]
        assert trace.scalars()[["layer", "value"]].values.tolist() == [["0", 0.5]]


def test_a_run_can_be_appended_to_by_a_second_writer(tmp_path):
    """Chunks are numbered per run from what the file holds, not per writer."""
    path = tmp_path / "t.covshift"
    first = TraceWriter(path)
    run = first.add_run("r", {})
    first.write(run, [(0, "", "loss", 1.0)], [], [])
    first.close()
    second = TraceWriter(path)
    second.write(run, [(1, "", "loss", 0.5)], [], [])
    second.close()
    with covshift.load(path) as trace:
        steps, values = trace.series("r", "", "loss")
    assert steps.tolist() == [0, 1] and values.tolist() == [1.0, 0.5]
