"""cluster/mlflow-server.sh refuses bad input clearly; no credential is written in cluster/."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
SCRIPT = CLUSTER / "mlflow-server.sh"

# key = value / key: value / KEY=value where the key names a secret.
SECRET_ASSIGNMENT = re.compile(
    r"""(?ix)\b([A-Z0-9_.-]*(?:password|passwd|secret|token|access[_-]?key|api[_-]?key)[A-Z0-9_]*)
    \s*(?:=|:(?=\s))\s*["']?([^\s"'#,}]+)"""
)
ALLOWED_VALUE = re.compile(
    r"""(?x)^(\$|\\?\$\{|\$\(|YOUR-|\{|valueFrom|"\$|\*\*\*|<|\.\.\.)"""  # env refs, placeholders
)
NOT_A_SECRET_KEY = re.compile(r"(?i)(_PATH|_MODE|_ID)$")  # where a secret is, or how it is used
CODE = re.compile(r"[()\[\]]|^[a-z_]+\.[a-z_]+")  # an expression in the scripts, not a literal
URI_WITH_PASSWORD = re.compile(r"[a-z+]+://[^/\s:@]+:([^@\s/]+)@")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFSCALE_", "MLFLOW_"))}
    env.pop("PGPASSWORD", None)
    env.update(extra)
    return env


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=_clean_env(**env),
        timeout=60,
    )


def _secret_hits(text: str) -> list[str]:
    hits = [
        f"{k}={v}"
        for k, v in SECRET_ASSIGNMENT.findall(text)
        if not (ALLOWED_VALUE.match(v) or NOT_A_SECRET_KEY.search(k) or CODE.search(v))
    ]
    hits += [m for m in URI_WITH_PASSWORD.findall(text) if not ALLOWED_VALUE.match(m)]
    return hits


def test_no_credential_in_any_cluster_file() -> None:
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 7
    for path in files:
        assert _secret_hits(path.read_text()) == [], path


def test_credential_scan_catches_a_written_password() -> None:
    assert _secret_hits("MLFLOW_AUTH_ADMIN_PASSWORD=hunter2") != []
    assert _secret_hits("  password: s3cr3t-value\n") != []
    assert _secret_hits("uri: postgresql://mlflow:pw123@db:5432/mlflow") != []
    assert _secret_hits('PGPASSWORD="$(gcloud secrets versions access latest)"') == []
    assert _secret_hits("api_key: abc123") != []
    assert _secret_hits("RAY_AUTH_TOKEN_PATH=/tmp/x/auth_token") == []  # a path, not a secret


def test_help() -> None:
    out = _run("--help")
    assert out.returncode == 0
    assert "DIFFSCALE_MLFLOW_DB_URI" in out.stdout and "/health" in out.stdout
    assert "--auth" in out.stdout


def test_auth_without_admin_password_refuses_to_start() -> None:
    port = _closed_port()
    out = _run(
        "--auth",
        "--port",
        str(port),
        DIFFSCALE_MLFLOW_DB_URI=f"postgresql://u@127.0.0.1:{_closed_port()}/db",
        DIFFSCALE_MLFLOW_ARTIFACTS="s3://bucket/mlflow",
    )
    assert out.returncode == 2
    assert "MLFLOW_AUTH_ADMIN_PASSWORD is not set" in out.stderr and "Not starting" in out.stderr
    with socket.socket() as s:  # nothing listens on the port it was asked to serve
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_unreachable_database_names_the_host_not_the_password() -> None:
    port = _closed_port()
    out = _run(
        DIFFSCALE_MLFLOW_DB_URI=f"postgresql://mlflow:Sup3rSecretPw@127.0.0.1:{port}/runs",
        DIFFSCALE_MLFLOW_ARTIFACTS="s3://bucket/mlflow",
    )
    assert out.returncode == 2
    assert f"cannot reach the MLflow database at 127.0.0.1:{port}" in out.stderr
    assert "database runs, user mlflow" in out.stderr
    assert "Sup3rSecretPw" not in out.stderr + out.stdout


def test_password_from_pgpassword_is_not_printed_either() -> None:
    port = _closed_port()
    out = _run(
        DIFFSCALE_MLFLOW_DB_URI=f"postgresql://mlflow@127.0.0.1:{port}/runs",
        DIFFSCALE_MLFLOW_ARTIFACTS="s3://bucket/mlflow",
        PGPASSWORD="AnotherPw42",
    )
    assert out.returncode == 2 and "127.0.0.1" in out.stderr
    assert "AnotherPw42" not in out.stderr + out.stdout


def test_other_bad_input_names_the_variable_and_allowed_values() -> None:
    out = _run()
    assert out.returncode == 2 and "DIFFSCALE_MLFLOW_DB_URI is not set" in out.stderr
    out = _run(DIFFSCALE_MLFLOW_DB_URI="sqlite:///mlflow.db")
    assert out.returncode == 2 and "must start with postgresql://" in out.stderr
    out = _run("--port", "99999", DIFFSCALE_MLFLOW_DB_URI="postgresql://u@h/db")
    assert out.returncode == 2 and "1..65535" in out.stderr
    out = _run("--bogus")
    assert out.returncode == 2 and "unknown argument '--bogus'" in out.stderr
