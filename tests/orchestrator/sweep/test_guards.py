"""The guards (orchestrator.sweep.guards) and the workers' runtime env
(orchestrator.trial.env): the rules as pure functions, then a real three-node Ray cluster
on this machine (a head with no CPUs and two one-CPU nodes, one for the module) where
`diffscale submit` is refused, the env reaches the other nodes, and a real sweep on shared
storage and an MLflow server runs without a secret landing anywhere."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from orchestrator.config import ConfigError, StorageConfig, TrackingConfig, read_sweep
from orchestrator.sweep.guards import (
    JOB_ENV,
    ClusterContext,
    check_sweep,
    connect,
    given_value,
    job_env_names,
    placement_problems,
    storage_arg_problems,
    tracking_local_path,
    warn_driver_only_secrets,
)
from orchestrator.trial.env import FORWARDED_ENV, driver_only_secrets, is_secret, worker_env
from tests.servers import MlflowServer

SINGLE = ClusterContext(nodes=1, cpus=None)
MULTI = ClusterContext(nodes=3, cpus=2.0)
JOB = ClusterContext(nodes=1, cpus=4.0, in_job=True, cwd="/tmp/ray/job/_ray_pkg_1")


def problems(context: ClusterContext, **given) -> dict[str, str]:
    values = {
        "storage_path": "/data/runs",
        "storage_shared": False,
        "tracking_uri": "sqlite:////data/mlflow.db",
        "given_storage": "/data/runs",
        "given_tracking": "sqlite:////data/mlflow.db",
        **given,
    }
    return dict(placement_problems(context=context, **values))


# --------------------------------------------------------------------------- the rules
def test_a_single_node_accepts_local_storage_and_sqlite():
    assert problems(SINGLE) == {}
    assert problems(ClusterContext(nodes=1, cpus=2.0)) == {}
    assert not SINGLE.multi_node


def test_many_nodes_need_s3_or_shared_storage_and_an_mlflow_server():
    found = problems(MULTI)
    assert set(found) == {"storage.path", "tracking.uri"}
    assert "'/data/runs' is a local path" in found["storage.path"]
    assert "3 alive nodes" in found["storage.path"]
    assert "s3://BUCKET/PREFIX" in found["storage.path"]
    assert "storage.shared: true" in found["storage.path"]
    assert "is not an MLflow server" in found["tracking.uri"]
    assert "http://HOST:PORT" in found["tracking.uri"]
    ok = {"tracking_uri": "http://head:5000", "given_tracking": "http://head:5000"}
    assert problems(MULTI, storage_path="s3://bucket/runs", **ok) == {}
    assert problems(MULTI, storage_shared=True, **ok) == {}
    assert problems(MULTI, storage_shared=True, tracking_uri="https://mlflow.example") == {}
    for local in ("file:///data/mlruns", "/data/mlruns", "postgresql://db/mlflow"):
        assert set(problems(MULTI, storage_shared=True, tracking_uri=local)) == {"tracking.uri"}


def test_a_head_without_cpus_counts_as_many_nodes():
    head_only = ClusterContext(nodes=1, cpus=0.0)
    assert head_only.multi_node
    found = problems(head_only)
    assert set(found) == {"storage.path", "tracking.uri"}
    assert "offers no CPU" in found["storage.path"]


def test_a_ray_job_refuses_relative_paths_and_the_defaults():
    found = problems(JOB, given_storage="runs", given_tracking="sqlite:///mlflow.db")
    assert set(found) == {"storage.path", "tracking.uri"}
    assert "'runs' is relative" in found["storage.path"]
    assert "inside a Ray job" in found["storage.path"] and JOB.cwd in found["storage.path"]
    assert "pass an absolute path" in found["storage.path"]
    assert "'sqlite:///mlflow.db' is relative" in found["tracking.uri"]
    defaults = problems(JOB, given_storage=None, given_tracking=None)
    assert "./diffscale_runs (the default)" in defaults["storage.path"]
    assert "no tracking.uri nor $MLFLOW_TRACKING_URI" in defaults["tracking.uri"]
    assert problems(JOB) == {}  # absolute paths on a single-node cluster
    assert problems(JOB, given_storage="s3://b/p", given_tracking="http://h:5000") == {}
    assert set(problems(JOB, given_tracking="file:mlruns")) == {"tracking.uri"}


def test_resume_in_a_job_needs_an_absolute_storage(monkeypatch):
    monkeypatch.delenv("DIFFSCALE_STORAGE", raising=False)
    ((key, msg),) = storage_arg_problems(None, JOB)
    assert key == "--storage" and "./diffscale_runs (the default)" in msg
    assert "pass an absolute path" in msg
    assert storage_arg_problems("runs", JOB)[0][0] == "--storage"
    assert storage_arg_problems("/data/runs", JOB) == []
    assert storage_arg_problems("s3://bucket/runs", JOB) == []
    assert storage_arg_problems("runs", MULTI) == []  # outside a job a relative path is fine
    monkeypatch.setenv("DIFFSCALE_STORAGE", "/data/runs")
    assert storage_arg_problems(None, JOB) == []


def test_tracking_local_paths():
    assert tracking_local_path("sqlite:///mlflow.db") == "mlflow.db"
    assert tracking_local_path("sqlite:////abs/mlflow.db") == "/abs/mlflow.db"
    assert tracking_local_path("file:///abs/mlruns") == "/abs/mlruns"
    assert tracking_local_path("file:mlruns") == "mlruns"
    assert tracking_local_path("mlruns") == "mlruns"
    assert tracking_local_path("http://head:5000") is None
    assert tracking_local_path("postgresql://db/mlflow") is None


def test_job_detection_and_its_own_env_vars():
    config = {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"AWS_REGION": "eu"}}}
    assert job_env_names({JOB_ENV: json.dumps(config)}) == {"AWS_REGION"}
    assert job_env_names({JOB_ENV: "{}"}) == set() and job_env_names({}) == set()
    assert job_env_names({JOB_ENV: "not json"}) == set()


def write_sweep(root: Path, **data) -> Path:
    path = root / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "model": {"name": "digits-xs"}, **data}))
    return path


def test_given_values_come_from_the_file_and_set_items(tmp_path):
    spec = read_sweep(write_sweep(tmp_path, storage={"path": "rel"}))
    assert given_value(spec, "storage", "path") == "rel"
    assert os.path.isabs(spec.base["storage"]["path"])  # the pinned value, for comparison
    assert given_value(spec, "tracking", "uri") is None
    spec = read_sweep(write_sweep(tmp_path), ["storage.path=/abs/x", "tracking.uri=http://h:1"])
    assert given_value(spec, "storage", "path") == "/abs/x"
    assert given_value(spec, "tracking", "uri") == "http://h:1"
    spec = read_sweep(write_sweep(tmp_path, storage={"path": "/a"}), ["storage={path: rel}"])
    assert given_value(spec, "storage", "path") == "rel"


def test_check_sweep_in_a_job_raises_one_error_naming_file_and_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()  # nothing is started without RAY_ADDRESS
    path = write_sweep(tmp_path)
    spec = read_sweep(path)
    assert check_sweep(spec, environ={}) == ClusterContext(nodes=1, cwd=str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        check_sweep(spec, environ={JOB_ENV: "{}"})
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}: storage.path: './diffscale_runs (the default)'")
    assert lines[1].startswith(f"{path}: tracking.uri: ")
    assert not ray.is_initialized()
    fine = read_sweep(path, ["storage.path=/abs/runs", "tracking.uri=http://h:5000"])
    assert check_sweep(fine, environ={JOB_ENV: "{}"}).in_job
    from_env = {JOB_ENV: "{}", "MLFLOW_TRACKING_URI": "http://h:5000"}
    assert check_sweep(read_sweep(path, ["storage.path=/abs/runs"]), environ=from_env).in_job


def test_storage_shared_and_passwords_in_uris_are_validated():
    assert StorageConfig().shared is False and StorageConfig(shared=True).shared
    with pytest.raises(ConfigError, match=r"storage\.shared: expected true or false"):
        StorageConfig(shared="yes")
    with pytest.raises(ConfigError) as caught:
        TrackingConfig(uri="http://bob:hunter2@head:5000")
    assert "tracking.uri:" in str(caught.value) and "hunter2" not in str(caught.value)
    assert "http://bob:***@head:5000" in str(caught.value)
    with pytest.raises(ConfigError, match=r"storage\.endpoint_url:"):
        StorageConfig(endpoint_url="http://k:s3cret@minio:9000")
    assert TrackingConfig(uri="http://bob@head:5000").uri == "http://bob@head:5000"


# --------------------------------------------------------------------------- runtime env
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID" + uuid.uuid4().hex[:8],
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-" + uuid.uuid4().hex,
    "AWS_SESSION_TOKEN": "fake-aws-session-" + uuid.uuid4().hex,
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-" + uuid.uuid4().hex,
    "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-" + uuid.uuid4().hex,
}
SETTINGS = {
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
    "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9",
    "AWS_DEFAULT_REGION": "eu-west-3",
    "AWS_PROFILE": "diffscale-test",
    "AWS_SHARED_CREDENTIALS_FILE": "/etc/diffscale/credentials",
    "MLFLOW_TRACKING_USERNAME": "bob",
}


def test_worker_env_forwards_settings_and_references_never_secrets():
    environ = {**SETTINGS, **SECRETS, "HOME": "/root", "PATH": "/bin", "AWS_REGION": ""}
    env = worker_env(environ, "http://head:5000")
    assert env == {**SETTINGS, "MLFLOW_TRACKING_URI": "http://head:5000"}
    assert worker_env({"MLFLOW_TRACKING_URI": "http://h:1"}) == {
        "MLFLOW_TRACKING_URI": "http://h:1"
    }
    leaky = {"AWS_ENDPOINT_URL": "http://k:s3cret@minio:9000", "AWS_REGION": "eu"}
    assert worker_env(leaky, "http://u:pw@head:5000") == {"AWS_REGION": "eu"}
    assert not [name for name in FORWARDED_ENV if is_secret(name)]
    for name in [*SECRETS, "GITHUB_TOKEN", "DB_PASSWORD", "aws_secret_access_key"]:
        assert is_secret(name), name
    for name in ["AWS_PROFILE", "MLFLOW_TRACKING_USERNAME", "AWS_ENDPOINT_URL"]:
        assert not is_secret(name), name


def test_driver_only_secrets_are_warned_about_by_name_only(caplog):
    environ = {**SETTINGS, **SECRETS, "GITHUB_TOKEN": "unrelated"}
    found = driver_only_secrets(environ)
    assert set(found) == set(SECRETS)
    assert "AWS_SHARED_CREDENTIALS_FILE" in found["AWS_SECRET_ACCESS_KEY"]
    assert "~/.mlflow/credentials" in found["MLFLOW_TRACKING_PASSWORD"]
    with caplog.at_level(logging.WARNING, logger="orchestrator.sweep.guards"):
        assert warn_driver_only_secrets(environ, SINGLE) == []
        assert caplog.records == []
        assert sorted(warn_driver_only_secrets(environ, MULTI)) == sorted(SECRETS)
    assert len(caplog.records) == len(SECRETS)
    for value in SECRETS.values():
        assert value not in caplog.text
    assert "AWS_SECRET_ACCESS_KEY is set in this driver's environment only" in caplog.text
    # set by the Ray job's runtime env: it reaches every task and actor of the job
    job = json.dumps({"runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}}})
    in_job = {**environ, "RAY_JOB_CONFIG_JSON_ENV_VAR": job}
    assert "AWS_SECRET_ACCESS_KEY" not in warn_driver_only_secrets(in_job, MULTI)
    assert "MLFLOW_TRACKING_PASSWORD" in warn_driver_only_secrets(in_job, MULTI)


# --------------------------------------------------------------------------- a real cluster
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three nodes on this machine: a head with no CPUs and two one-CPU nodes. Started
    before any test sets SETTINGS or SECRETS, so its raylets do not have them."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    small = {"object_store_memory": 80 * 2**20}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **small})
    try:
        for _ in range(2):
            c.add_node(num_cpus=1, **small)
        c.wait_for_nodes()
        yield c, tmp_path_factory.mktemp("guards")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


def cli_env(c: Cluster, root: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "RAY_ADDRESS": c.address,
        "XDG_CACHE_HOME": str(root / "cache"),
        **SETTINGS,
        **SECRETS,
        **extra,
    }


def diffscale(c: Cluster, root: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "orchestrator.cli", *args]
    env = cli_env(c, root, **extra)
    return subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=400)


def test_submit_on_many_nodes_refuses_local_storage_and_sqlite_and_starts_nothing(cluster):
    c, root = cluster
    work = root / "refused"
    work.mkdir()
    path = write_sweep(work, budget={"steps": 10})
    result = diffscale(c, work, "submit", str(path), "--quiet")
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr
    assert f"diffscale submit: error: {path}: storage.path: '{work}/diffscale_runs'" in err, err
    assert f"{path}: tracking.uri: 'sqlite:///{work}/mlflow.db' is not an MLflow server" in err
    assert "this Ray cluster has 3 alive nodes" in err
    for value in SECRETS.values():
        assert value not in result.stdout + err
    assert "AWS_SECRET_ACCESS_KEY is set in this driver's environment only" in err
    assert sorted(p.name for p in work.iterdir()) == ["s.yaml"]  # no runs folder, no mlflow.db
    shared = diffscale(
        c, work, "submit", str(path), "--quiet", "--set", "storage.shared=true"
    )  # the storage is declared shared: only the SQLite tracking URI is refused
    assert shared.returncode == 2 and "storage.path" not in shared.stderr, shared.stderr
    assert "tracking.uri" in shared.stderr
    assert sorted(p.name for p in work.iterdir()) == ["s.yaml"]


@ray.remote(num_cpus=0)
def _seen_env(names: list[str]) -> tuple[str, dict[str, str]]:
    return ray.get_runtime_context().get_node_id(), {n: os.environ.get(n, "") for n in names}


def test_the_runtime_env_reaches_every_node_without_secrets(cluster):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    c, _ = cluster
    assert not ray.is_initialized()
    environ = {"RAY_ADDRESS": c.address, **SETTINGS, **SECRETS}
    try:
        context = connect("http://head:5000", environ)
        assert (context.nodes, context.cpus, context.multi_node) == (3, 2.0, True)
        workers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
        assert len(workers) == 2
        names = [*SETTINGS, *SECRETS, "MLFLOW_TRACKING_URI"]
        seen = ray.get(
            [
                _seen_env.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
                ).remote(names)
                for node in workers
            ]
        )
    finally:
        ray.shutdown()
    assert sorted(node for node, _ in seen) == sorted(workers)
    for _, env in seen:
        assert {k: env[k] for k in SETTINGS} == SETTINGS
        assert env["MLFLOW_TRACKING_URI"] == "http://head:5000"
        assert not [k for k in SECRETS if env[k] == SECRETS[k]]  # the node's own, if any


SWEEP = {
    "name": "sg",
    "model": {"name": "digits-xs"},
    "diffusion": {"num_timesteps": 100},
    "train": {"batch_size": 16, "checkpoint_every": 5, "log_every": 5, "max_failures": 0},
    "budget": {"steps": 10},
    "eval": {
        "num_points": 0,
        "nll_images": 8,
        "nll_timesteps": 2,
        "fid_samples": 8,
        "sample_steps": "5",
        "grid_samples": 0,
    },
    "resources": {"num_workers": 1, "cpus_per_worker": 1},
}


def test_a_sweep_on_shared_storage_and_a_server_runs_and_no_secret_lands_anywhere(cluster):
    c, root = cluster
    work = root / "shared"
    (work / "server").mkdir(parents=True)
    server = MlflowServer(work / "server")
    server.start()
    try:
        sweep = {**SWEEP, "storage": {"path": str(work / "runs"), "shared": True}}
        sweep["tracking"] = {"uri": server.uri}
        path = work / "sg.yaml"
        path.write_text(yaml.safe_dump(sweep))
        result = diffscale(c, work, "-v", "submit", str(path), "--quiet")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        client = mlflow.MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("sg")
        runs = client.search_runs([experiment.experiment_id])
    finally:
        server.kill()
    assert len(runs) == 2  # the sweep's parent run and its trial's run
    stored = {
        str(p): p.read_bytes()
        for p in [*(work / "runs").rglob("*"), *(work / "server").rglob("*")]
        if p.is_file()
    }
    assert str(work / "runs" / "sg" / "sweep.json") in stored
    session = Path(c.head_node.get_session_dir_path()) / "logs"
    logs = {str(p): p.read_bytes() for p in session.rglob("*") if p.is_file()}
    texts = {
        "output": (result.stdout + result.stderr).encode(),
        **{f"run {r.info.run_id}": json.dumps([r.data.params, r.data.tags]).encode() for r in runs},
        **stored,
    }
    assert "AWS_SECRET_ACCESS_KEY is set in this driver's environment only" in result.stderr
    for name, value in SECRETS.items():
        leaks = [where for where, text in texts.items() if value.encode() in text]
        assert not leaks, f"{name}'s value found in {leaks}"
    # Ray's own logs too: Ray Tune would copy AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
    # AWS_SESSION_TOKEN from the driver into each trial actor's runtime env (its
    # class_cache.py), which runtime_env_agent.log prints; the sweep driver stops that.
    for name, value in SECRETS.items():
        leaks = [where for where, text in logs.items() if value.encode() in text]
        assert not leaks, f"{name}'s value found in Ray's logs: {leaks}"
