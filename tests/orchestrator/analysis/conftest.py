"""Real MLflow for the analysis tests: SQLite stores in tmp folders, and one `mlflow server`
(SQLite backend, proxied artifacts) for the package, stopped by pid at the end."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.servers import MlflowServer


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No telemetry or usage stats, no inherited tracking URI, and MLflow's HTTP retries kept
    short (a dead server fails a test in seconds, not minutes)."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="package")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the package (creating its schema takes a second or two)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="package")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on a free port of 127.0.0.1; yields its URI once /health answers."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    try:
        server.start(timeout=90)
        yield server.uri
    finally:
        server.kill(signal.SIGTERM)
