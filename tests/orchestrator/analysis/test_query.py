"""orchestrator.analysis.query against real MLflow: a SQLite store and an `mlflow server`."""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from orchestrator.analysis.query import QueryError, cell_rows, load_runs, to_csv, to_parquet
from orchestrator.names import ROLE_SWEEP, ROLE_TAG

from .mlflow_data import experiment, log_parent, log_points, log_run, trial_tags


@pytest.fixture(params=["sqlite", "server"])
def uri(request: pytest.FixtureRequest) -> str:
    """Each test runs against SQLite and against the HTTP server."""
    name = "sqlite_uri" if request.param == "sqlite" else "mlflow_server"
    return request.getfixturevalue(name)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _sweep(uri: str) -> tuple[str, dict[str, str]]:
    """A parent, trial A (finished), and trial B: a first session to step 2 (FAILED), then a
    second client session resuming the same run to step 5, re-sending step 2 later."""
    client, sweep = MlflowClient(uri), _name("q")
    exp_id = experiment(client, sweep)
    parent = log_parent(client, exp_id, sweep)
    a = log_run(
        client,
        exp_id,
        "A",
        tags=trial_tags(sweep, "A", "s", "steps=4"),
        parent=parent,
        params={"model.name": "s", "diffusion.schedule": "cosine", "model.params": 100},
        metrics={
            "train/loss": {s: 1.0 / (s + 1) for s in range(5)},
            "eval/nll_bpd": {2: 5.0, 4: 4.5},
            "compute/flops": {2: 2e9, 4: 4e9},
        },
    )
    b = log_run(
        client,
        exp_id,
        "B",
        tags=trial_tags(sweep, "B", "m", "steps=5"),
        parent=parent,
        params={"model.name": "m", "diffusion.schedule": "linear", "model.params": 300},
        metrics={"train/loss": {0: 2.0, 1: 1.5, 2: 1.25}},
        status="FAILED",
    )
    time.sleep(0.01)  # the resumed session's timestamps are later
    again = MlflowClient(uri)
    again.update_run(b, status="RUNNING")
    log_points(
        again, b, {"train/loss": {2: 1.2, 3: 1.0, 4: 0.9, 5: 0.8}}, int(time.time() * 1000) + 5
    )
    log_points(
        again, b, {"eval/nll_bpd": {5: 4.0}, "compute/flops": {5: 1.5e10}}, int(time.time() * 1000)
    )
    again.set_terminated(b, "FINISHED")
    return sweep, {"parent": parent, "A": a, "B": b}


def test_rows_steps_nulls_params_tags_and_resume(uri: str) -> None:
    sweep, ids = _sweep(uri)
    table = load_runs(sweep, tracking_uri=uri)
    assert table.column_names[:4] == ["run_id", "run_name", "status", "parent_run_id"]
    assert {"tags.size", "tags.trial", "tags.sweep", "params.model.name", "step"} <= set(
        table.column_names
    )
    assert not any(c.startswith("tags.mlflow.") for c in table.column_names)
    assert table.schema.field("step").type == pa.int64()
    for key in ("train/loss", "eval/nll_bpd", "compute/flops"):
        assert table.schema.field(key).type == pa.float64()
    assert table.schema.field("params.model.params").type == pa.string()
    rows = table.to_pylist()
    assert [r["run_name"] for r in rows] == ["A"] * 5 + ["B"] * 6  # no parent, start order
    a = [r for r in rows if r["run_name"] == "A"]
    assert [r["step"] for r in a] == [0, 1, 2, 3, 4]
    assert [r["eval/nll_bpd"] for r in a] == [None, None, 5.0, None, 4.5]
    assert a[0]["train/loss"] == pytest.approx(1.0) and a[0]["params.model.params"] == "100"
    assert {r["parent_run_id"] for r in rows} == {ids["parent"]}
    b = [r for r in rows if r["run_name"] == "B"]
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4, 5]  # each step once
    assert b[2]["train/loss"] == pytest.approx(1.2)  # the later of the two values at step 2
    assert b[-1]["eval/nll_bpd"] == 4.0 and b[-1]["compute/flops"] == 1.5e10
    assert {r["status"] for r in b} == {"FINISHED"} and b[0]["tags.size"] == "m"

    both = load_runs(sweep, tracking_uri=uri, include_parent=True)
    parent_rows = [r for r in both.to_pylist() if r["run_id"] == ids["parent"]]
    assert len(parent_rows) == 1 and parent_rows[0]["step"] is None
    assert parent_rows[0][f"tags.{ROLE_TAG}"] == ROLE_SWEEP
    assert parent_rows[0]["train/loss"] is None and parent_rows[0]["params.model.name"] is None


def test_filters_and_metric_selection(uri: str) -> None:
    sweep, ids = _sweep(uri)
    cosine = load_runs(sweep, tracking_uri=uri, params={"diffusion.schedule": "cosine"})
    assert set(cosine.column("run_id").to_pylist()) == {ids["A"]}
    tagged = load_runs(sweep, tracking_uri=uri, tags={"size": "m", "sweep": sweep})
    assert set(tagged.column("run_id").to_pylist()) == {ids["B"]}
    assert load_runs(sweep, tracking_uri=uri, params={"model.name": "it's"}).num_rows == 0
    only = load_runs(sweep, tracking_uri=uri, metrics=["eval/nll_bpd", "eval/fid"])
    assert [c for c in only.column_names if "/" in c] == ["eval/fid", "eval/nll_bpd"]
    assert only.column("eval/fid").null_count == only.num_rows  # asked for, never logged
    assert only.num_rows == 3  # steps where a selected metric was logged: A 2,4; B 5
    globbed = load_runs(sweep, tracking_uri=uri, metrics=["eval/*", "compute/flops"])
    assert [c for c in globbed.column_names if "/" in c] == ["compute/flops", "eval/nll_bpd"]


def test_pagination_of_runs_and_of_a_long_metric_history(uri: str) -> None:
    client, sweep = MlflowClient(uri), _name("p")
    exp_id = experiment(client, sweep)
    for i in range(5):
        log_run(client, exp_id, f"r{i}", tags={"trial": f"r{i}"}, metrics={"x": {0: float(i)}})
    table = load_runs(sweep, tracking_uri=uri, page_size=2)  # three pages of runs
    assert table.column("run_name").to_pylist() == [f"r{i}" for i in range(5)]
    n = 25_500  # MlflowClient asks for pages of 25,000 metric points
    long = log_run(client, exp_id, "long", metrics={"train/loss": {s: s / n for s in range(n)}})
    rows = load_runs(sweep, tracking_uri=uri, tags={"mlflow.runName": "long"})
    assert set(rows.column("run_id").to_pylist()) == {long}
    steps = rows.column("step").to_numpy()
    np.testing.assert_array_equal(steps, np.arange(n))
    np.testing.assert_allclose(rows.column("train/loss").to_numpy(), np.arange(n) / n)


def test_unknown_experiment_lists_the_existing_ones(sqlite_uri: str) -> None:
    client, sweep = MlflowClient(sqlite_uri), _name("known")
    experiment(client, sweep)
    with pytest.raises(QueryError, match=rf"'nope' does not exist.*'{sweep}'"):
        load_runs("nope", tracking_uri=sqlite_uri)


def test_cell_rows_read_each_cell_at_its_step(tmp_path: Path) -> None:
    def run(rid, steps, loss, fid, flops, cells):
        n = len(steps)
        return {
            "run_id": [rid] * n,
            "run_name": [rid] * n,
            "status": ["FINISHED"] * n,
            "parent_run_id": ["p"] * n,
            "tags.cells": [cells] * n,
            "tags.size": ["s"] * n,
            "tags.trial": [rid] * n,
            "tags.budget": ["flops=1e15"] * n,
            "step": steps,
            "eval/nll_bpd": loss,
            "eval/fid": fid,
            "compute/flops": flops,
        }

    cells = json.dumps(
        [
            {"cell": "c00", "budget": "steps=200", "step": 200},
            {"cell": "c01", "budget": "steps=400", "step": 400},
        ]
    )
    parts = [
        run(
            "t0",
            [100, 200, 300, 400],
            [5.0, 4.0, None, 3.0],
            [None, 30.0, 25.0, 20.0],
            [1.0, 2.0, 3.0, 4.0],
            cells,
        ),
        run("t1", [10, 20], [6.0, 5.5], [None, None], [0.1, 0.2], None),
    ]
    cols = {k: [v for p in parts for v in p[k]] for k in parts[0]}
    types = {"step": pa.int64(), "eval/nll_bpd": pa.float64(), "eval/fid": pa.float64()}
    types["compute/flops"] = pa.float64()
    table = pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in cols.items()})
    got = cell_rows(table, ["eval/nll_bpd", "eval/fid"], with_steps=True).to_pylist()
    assert [(r["run_id"], r["cell"], r["budget"], r["step"]) for r in got] == [
        ("t0", "c00", "steps=200", 200),
        ("t0", "c01", "steps=400", 400),
        ("t1", None, "flops=1e15", 20),  # no cells tag: its final step, the trial's budget
    ]
    assert [r["eval/nll_bpd"] for r in got] == [4.0, 3.0, 5.5]
    assert [r["eval/fid"] for r in got] == [30.0, 20.0, None]
    assert [r["compute/flops"] for r in got] == [2.0, 4.0, 0.2]  # always carried along
    assert [r["eval/nll_bpd@step"] for r in got] == [200, 400, 20]
    assert got[0]["size"] == "s" and got[0]["trial"] == "t0"

    with pytest.raises(QueryError, match="eval/nope"):
        cell_rows(table, ["eval/nope"])
    bad = table.set_column(
        table.schema.get_field_index("tags.cells"),
        "tags.cells",
        pa.array(["[{]"] * table.num_rows, type=pa.string()),
    )
    with pytest.raises(QueryError, match="tag 'cells'"):
        cell_rows(bad)

    # exports round-trip
    back = pq.read_table(to_parquet(table, tmp_path / "x" / "t.parquet"))
    assert back.equals(table)
    csv = pacsv.read_csv(to_csv(table, tmp_path / "t.csv"))
    assert csv.num_rows == table.num_rows and math.isnan(csv.column("eval/fid").to_numpy()[0])
