"""orchestrator.tracking.runs: every MLflow lookup, against a real SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.tracking import (
    resolve_tracking_uri,
    sweep_parent_run_id,
    trial_runs,
    unfinished_run_id,
)


def test_resolve_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(None) == "http://mlflow:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_unfinished_run_of_a_trial_is_found_for_reuse(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    assert unfinished_run_id(uri, "exp", "a") is None  # no experiment yet
    exp = client.create_experiment("exp")
    done = client.create_run(exp, tags={"trial": "a"})
    client.set_terminated(done.info.run_id, "FINISHED")
    assert unfinished_run_id(uri, "exp", "a") is None  # a finished run is never reused
    crashed = client.create_run(exp, tags={"trial": "a"})
    client.create_run(exp, tags={"trial": "b"})
    assert unfinished_run_id(uri, "exp", "a") == crashed.info.run_id
    assert unfinished_run_id(client, "exp", "a") == crashed.info.run_id  # a client works too


def test_trial_runs_maps_each_trial_to_its_newest_child_run(sqlite_uri: str) -> None:
    client = MlflowClient(sqlite_uri)
    assert trial_runs(sqlite_uri, "no-such-experiment") == {}
    exp = client.create_experiment("lookups")
    trial = {"diffscale.role": "trial"}
    old = client.create_run(exp, tags={**trial, "trial": "a"}, start_time=1000)
    new = client.create_run(exp, tags={**trial, "trial": "a"}, start_time=2000)
    b = client.create_run(exp, tags={**trial, "trial": "b"}, start_time=1500)
    client.create_run(exp, tags={"diffscale.role": "sweep", "trial": "a"}, start_time=3000)
    runs = trial_runs(client, "lookups")
    assert {k: r.info.run_id for k, r in runs.items()} == {"a": new.info.run_id, "b": b.info.run_id}
    assert old.info.run_id not in {r.info.run_id for r in runs.values()}
    assert trial_runs(sqlite_uri, "lookups").keys() == runs.keys()


def test_sweep_parent_run_is_the_one_named_after_the_sweep(sqlite_uri: str) -> None:
    client = MlflowClient(sqlite_uri)
    exp = client.create_experiment("parents")
    assert sweep_parent_run_id(client, exp, "parents") is None  # no parent run yet
    client.create_run(exp, tags={"diffscale.role": "trial"}, start_time=500)
    assert sweep_parent_run_id(client, exp, "parents") is None  # a child is no parent
    named = client.create_run(exp, tags={"diffscale.role": "sweep"}, run_name="parents")
    newer = client.create_run(
        exp, tags={"diffscale.role": "sweep"}, run_name="other", start_time=10**13
    )
    assert sweep_parent_run_id(client, exp, "parents") == named.info.run_id
    assert sweep_parent_run_id(client, exp, "elsewhere") == newer.info.run_id  # else the newest
