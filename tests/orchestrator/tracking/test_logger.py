"""orchestrator.tracking.logger against real MLflow: a SQLite store, and an `mlflow server`
that is killed and restarted underneath a RunLogger."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.tracking import RunLogger, TrackingError
from tests.servers import MlflowServer

KEYS = ("train/loss", "compute/flops")


def _logger(uri: str, tmp_path: Path, **kwargs) -> RunLogger:
    kwargs.setdefault("experiment", "sweep")
    return RunLogger(uri, artifact_location=str(tmp_path / "artifacts"), **kwargs)


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_new_run_params_metrics_artifacts_status(sqlite_uri: str, tmp_path: Path) -> None:
    client = MlflowClient(sqlite_uri)
    with _logger(sqlite_uri, tmp_path, run_name="t0", tags={"trial": "t0"}) as run:
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert client.get_run(run.run_id).info.status == "RUNNING"
        run.log_params({"train.lr": 1e-4, "model.channels": 64, "note": "x" * 7000})
        for step in range(5):
            run.log_metrics({"train/loss": 1.0 / (step + 1), "compute/flops": 1e9 * step}, step)
        run.log_metrics({"train/loss": 9.0, "eval/fid": "n/a"}, step=4)  # repeat; not a number
        with pytest.raises(TypeError):
            run.log_metrics({"train/loss": 1.0}, step=1.5)
        assert run.flush(timeout=10)
        assert run.stats()["skipped"] == 1 and run.stats()["pending"] == 0
        (tmp_path / "grid.txt").write_text("samples")
        assert run.log_artifact(tmp_path / "grid.txt", "samples")
        assert run.log_dict({"a": 1}, "config.json")
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["train.lr"] == "0.0001" and got.data.params["model.channels"] == "64"
    assert got.data.params["note"] == "x" * 6000
    assert got.data.tags["trial"] == "t0" and got.info.run_name == "t0"
    for key in KEYS:
        assert _steps(client, run.run_id, key) == list(range(5))
    assert client.get_metric_history(run.run_id, "train/loss")[-1].value == pytest.approx(0.2)
    assert {a.path for a in client.list_artifacts(run.run_id)} == {"samples", "config.json"}


def test_resume_continues_the_same_run_without_duplicates(sqlite_uri: str, tmp_path: Path):
    client = MlflowClient(sqlite_uri)
    first = _logger(sqlite_uri, tmp_path)
    first.log_params({"seed": 0, "lr": 0.1})
    for step in range(10):
        first.log_metrics({"train/loss": float(step), "compute/flops": 2.0 * step}, step)
    first.close("FAILED")
    assert client.get_run(first.run_id).info.status == "FAILED"

    # The checkpoint was at step 5: the resumed trial replays steps 5..9, then goes on.
    with _logger(sqlite_uri, tmp_path, run_id=first.run_id, flush_interval_s=0.05) as again:
        assert again.run_id == first.run_id
        assert client.get_run(first.run_id).info.status == "RUNNING"
        again.log_params({"seed": 0, "lr": 0.1, "new": "yes"})  # same values: fine
        with pytest.raises(ValueError, match="'lr'"):
            again.log_params({"lr": 0.2})
        for step in range(5, 15):
            again.log_metrics({"train/loss": -1.0, "compute/flops": -1.0, "eval/nll": 1.0}, step)
        again.log_metrics({"train/loss": -1.0}, step=3)  # behind this session too
    assert client.get_run(first.run_id).info.status == "FINISHED"
    for key in KEYS:
        history = client.get_metric_history(first.run_id, key)
        assert sorted(m.step for m in history) == list(range(15))
        assert all(m.value >= 0 for m in history if m.step < 10)  # first attempt's values kept
    assert _steps(client, first.run_id, "eval/nll") == list(range(5, 15))
    assert client.get_run(first.run_id).data.params["new"] == "yes"
    assert len(client.search_runs([client.get_experiment_by_name("sweep").experiment_id])) >= 1


def test_parent_and_child_runs(sqlite_uri: str, tmp_path: Path) -> None:
    client = MlflowClient(sqlite_uri)
    with _logger(sqlite_uri, tmp_path, experiment="nested", run_name="sweep") as parent:
        children = [
            _logger(sqlite_uri, tmp_path, experiment="nested", parent_run_id=parent.run_id)
            for _ in range(2)
        ]
        for child in children:
            child.close("KILLED")
    exp = client.get_experiment_by_name("nested")
    found = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert {r.info.run_id for r in found} == {c.run_id for c in children}
    assert {r.info.status for r in found} == {"KILLED"}


def test_exception_marks_run_failed_and_unknown_run_is_refused(sqlite_uri, tmp_path):
    client = MlflowClient(sqlite_uri)
    with pytest.raises(RuntimeError, match="boom"), _logger(sqlite_uri, tmp_path) as run:
        run.log_metrics({"train/loss": 1.0}, step=0)
        raise RuntimeError("boom")
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert _steps(client, run.run_id, "train/loss") == [0]
    with pytest.raises(TrackingError, match="0123456789abcdef"):
        _logger(sqlite_uri, tmp_path, run_id="0123456789abcdef")


def test_full_buffer_drops_the_oldest_points(sqlite_uri: str, tmp_path: Path) -> None:
    client = MlflowClient(sqlite_uri)
    # A long interval: nothing is delivered before flush(), so the buffer overflows.
    with _logger(sqlite_uri, tmp_path, buffer_limit=5, flush_interval_s=3600) as run:
        for step in range(10):
            run.log_metrics({"train/loss": float(step)}, step)
        assert run.stats()["dropped"] == 5
        assert run.flush(timeout=10)
    assert _steps(client, run.run_id, "train/loss") == [5, 6, 7, 8, 9]


# -- a real tracking server that goes away and comes back -------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path)
    try:
        srv.start()
        yield srv
    finally:
        srv.kill(signal.SIGTERM)


def test_outage_buffers_and_delivers_everything_once(server: MlflowServer, tmp_path: Path) -> None:
    run = RunLogger(server.uri, "outage", flush_interval_s=0.2, max_backoff_s=2.0)
    run.log_params({"lr": 0.1})
    step = 0
    for step in range(10):
        run.log_metrics({k: float(step) for k in KEYS}, step)
    assert run.flush(timeout=20)

    server.kill(signal.SIGKILL)
    slowest = 0.0
    for step in range(10, 30):
        start = time.monotonic()
        run.log_metrics({k: float(step) for k in KEYS}, step)
        slowest = max(slowest, time.monotonic() - start)
        time.sleep(0.05)  # the background thread fails and backs off meanwhile
    assert slowest < 1.0
    assert run.stats()["pending"] == 40
    start = time.monotonic()
    assert not run.flush(timeout=0.5)
    assert time.monotonic() - start < 2.0
    (tmp_path / "a.txt").write_text("a")
    assert not run.log_artifact(tmp_path / "a.txt")  # retried, then given up: not fatal

    server.start()
    run.log_metrics({k: float(30) for k in KEYS}, 30)
    assert run.flush(timeout=30)
    assert run.log_artifact(tmp_path / "a.txt")
    run.close()
    client = MlflowClient(server.uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.params == {"lr": "0.1"}
    for key in KEYS:
        history = client.get_metric_history(run.run_id, key)
        assert sorted(m.step for m in history) == list(range(31))
        assert all(m.value == m.step for m in history)
    assert run.stats()["dropped"] == 0
