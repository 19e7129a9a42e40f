"""Helpers of the tests that start real servers (moto's S3, `mlflow server`, PostgreSQL)
as processes, wait for them to answer, and stop them by pid."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


def _drop_privileges() -> dict:
    """Popen arguments that run a command as the `postgres` OS user when we are root
    (initdb and postgres refuse to run as root); nothing otherwise."""
    if os.geteuid() != 0:
        return {}
    import pwd

    entry = pwd.getpwnam("postgres")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class PostgresServer:
    """A throwaway PostgreSQL (initdb in a temp dir, `postgres` on a free 127.0.0.1 port,
    its unix socket in that dir), one database ``mlflow``; stopped by `pg_ctl stop` and pid.

    Runs as the `postgres` OS user when the tests run as root. Skips the test when no
    PostgreSQL server binaries are installed (``initdb`` on PATH).
    """

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
        if not self.initdb or not self.pg_ctl:
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not on PATH")
        self.postgres = str(Path(self.initdb).resolve().with_name("postgres"))
        # short: the socket path (<root>/.s.PGSQL.<port>) must stay under 107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="dspg-", dir="/tmp"))
        self.data, self.log = self.root / "data", self.root / "postgres.log"
        self.port, self.proc = free_port(), None
        self.as_user = _drop_privileges()
        if self.as_user:
            os.chown(self.root, self.as_user["user"], self.as_user["group"])
        self.uri = f"postgresql://postgres@127.0.0.1:{self.port}/mlflow"

    def start(self, timeout: float = 60.0) -> None:
        import psycopg

        subprocess.run(
            [self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
            timeout=120,
            **self.as_user,
        )
        cmd = [self.postgres, "-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1"]
        cmd += ["-k", str(self.root), "-c", "fsync=off", "-c", "max_connections=60"]
        with open(self.log, "ab") as log_file:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self.as_user,
            )
        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"postgres exited ({self.proc.returncode}): {self.log.read_text()}")
            try:
                with psycopg.connect(admin, connect_timeout=2, autocommit=True) as conn:
                    conn.execute("CREATE DATABASE mlflow")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    pytest.fail(f"postgres did not answer in {timeout} s: {self.log.read_text()}")
                time.sleep(0.2)

    def stop(self) -> None:
        """`pg_ctl stop -m fast`, then SIGKILL of the group if it is still there; the temp dir
        is removed."""
        if self.proc is not None:
            subprocess.run(
                [self.pg_ctl, "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "20"],
                capture_output=True,
                timeout=60,
                **self.as_user,
            )
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)


class ScriptMlflowServer(MlflowServer):
    """`cluster/mlflow-server.sh` (the cluster's tracking server: PostgreSQL backend store,
    artifacts proxied to S3) on ``host``, in its own process group; stopped like
    :class:`MlflowServer`. ``env`` is the server's whole environment (database URI, artifact
    destination, S3 credentials and endpoint)."""

    def __init__(self, root: Path, env: dict[str, str], host: str = "127.0.0.1") -> None:
        super().__init__(root)
        self.env, self.host = env, host
        self.uri = f"http://{host}:{self.port}"

    def start(self, timeout: float = 90.0) -> None:
        script = Path(__file__).resolve().parents[1] / "cluster" / "mlflow-server.sh"
        cmd = ["bash", str(script), "--host", self.host, "--port", str(self.port)]
        env = {**self.env, "MLFLOW_DISABLE_TELEMETRY": "true", "DIFFSCALE_MLFLOW_WORKERS": "1"}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner processes
        with open(self.root / "server.log", "ab") as log_file:
            self.proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        wait_until_up(self.proc, f"{self.uri}/health", self.root / "server.log", timeout)
