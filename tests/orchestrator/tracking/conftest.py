"""Fixtures of the tracking tests: a clean MLflow environment and one SQLite store per module."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.tracking import HTTP_DEFAULTS


@pytest.fixture(autouse=True)
def _mlflow_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No telemetry, no inherited tracking URI, and the HTTP defaults RunLogger sets
    process-wide undone after each test; run in tmp_path so nothing lands in the repo."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in HTTP_DEFAULTS:
        monkeypatch.setenv(name, "")  # recorded, so that teardown restores the original state
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating its schema takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
