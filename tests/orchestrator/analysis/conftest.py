"""Real MLflow for the analysis tests: SQLite stores in tmp folders, and one `mlflow server`
(SQLite backend, proxied artifacts) for the package, stopped by pid at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="package")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on a free port of 127.0.0.1; yields its URI once /health answers."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'server.db'}"]
    cmd += ["--artifacts-destination", str(root / "artifacts")]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner processes
    log_path = root / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({proc.returncode}): {log_path.read_text()}")
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not answer on {uri}")
                time.sleep(0.2)
        yield uri
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 15)):
            try:
                os.killpg(proc.pid, sig)  # the pid leads its own group
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
