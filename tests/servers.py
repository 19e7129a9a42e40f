"""Helpers of the tests that start real servers (moto's S3, `mlflow server`) as processes,
wait for them to answer, and stop them by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    """Poll ``url`` until it answers; fail the test (with the log) if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited ({proc.returncode}): {log_path.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"{url} did not answer in {timeout} s")
            time.sleep(0.1)


class MlflowServer:
    """`mlflow server` on 127.0.0.1, in its own process group so it can be killed whole."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        script = Path(sys.executable).with_name("mlflow")
        cmd = [str(script), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}"]
        cmd += ["--artifacts-destination", str(self.root / "artifacts")]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner processes
        with open(self.root / "server.log", "ab") as log_file:  # the child keeps its own fd
            self.proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        wait_until_up(self.proc, f"{self.uri}/health", self.root / "server.log", timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the pid leads its own group (start_new_session)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + 10  # the uvicorn child may outlive its parent briefly
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.05)
