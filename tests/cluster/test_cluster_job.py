"""A real multi-node cluster on this machine, end to end (issue 12).

One cluster for the module: `cluster/local.sh up 2` (a head with 0 CPUs and two 1-CPU worker
nodes, started WITHOUT any S3 / MLflow variable in their environment), PostgreSQL 15 in a
temp dir, `cluster/mlflow-server.sh` on it with artifacts proxied to a moto S3 bucket, and
`ray job submit ... -- diffscale submit SWEEP.yaml` of a 1-size x 2-budget sweep whose trial
has two DDP workers of one CPU each, so one lands on each worker node. During the trial a
worker node is SIGKILLed after two checkpoints and a replacement node joins; the trial must
finish in the same MLflow run with every step logged once. Then the guards: the same sweep
with a local storage path or a SQLite tracking URI is refused on this cluster.

Run it under the shared lock:
``flock /tmp/ray.lock .venv/bin/pytest tests/cluster/test_cluster_job.py``.
Set DIFFSCALE_NODE_LOSS_JSON=PATH to write the node-loss recovery figures there
(``benchmarks/node_loss.py`` does).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest

from tests.conftest import S3_CREDENTIALS, S3Server
from tests.servers import PostgresServer, ScriptMlflowServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LOCAL_SH = ROOT / "cluster" / "local.sh"
VENV_BIN = Path(sys.executable).parent
NAME = "e2e"
CKPT_EVERY = 8
STEPS = (24, 64)  # the two budgets: one trial to 64 steps, its cells at 24 and 64
SWEEP = """\
name: {name}
data: {{dataset: digits}}
model: {{name: digits-xs}}
diffusion: {{schedule: cosine, num_timesteps: 100, objective: hybrid}}
train: {{batch_size: 32, lr: 1.0e-3, ema_rate: 0.9, checkpoint_every: {ckpt}, log_every: 1,
         seed: 0, max_failures: 3}}
eval: {{num_points: 0, nll_images: 16, nll_timesteps: 4, fid_samples: 0, grid_samples: 4,
        sample_steps: "5"}}
resources: {{num_workers: 2, cpus_per_worker: 1}}
grid:
  budget.steps: [{steps}]
max_concurrent_trials: 1
tracking: {{uri: {tracking}}}
storage: {{path: {storage}{extra_storage}}}
"""

# What each live actor is and where: node id, pid (to find the local.sh node of a worker).
ACTORS = """
import json, sys
from ray.util.state import list_actors
actors = list_actors(address=sys.argv[1], filters=[("state", "=", "ALIVE")], limit=1000)
print("ACTORS " + json.dumps([[a.class_name, a.node_id, a.pid] for a in actors]))
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that could carry S3, MLflow or Ray settings."""
    drop = ("AWS_", "MLFLOW_", "RAY_", "DIFFSCALE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    return {**env, **extra}


# --------------------------------------------------------------------------- the cluster
@dataclass
class Cluster:
    state: Path
    client: dict[str, str] = field(default_factory=dict)  # RAY_ADDRESS, RAY_AUTH_*
    dashboard: str = ""
    head_ip: str = ""

    def sh(self, *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
        env = clean_env(DIFFSCALE_LOCAL_CLUSTER=str(self.state))
        return subprocess.run(
            ["bash", str(LOCAL_SH), *args], capture_output=True, text=True, env=env, timeout=timeout
        )

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(**self.client, **extra)

    def job_submit(
        self, workdir: Path, *entrypoint: str, env_vars: dict[str, str] | None = None
    ) -> list[str]:
        """`ray job submit` of ``entrypoint`` with ``workdir`` uploaded, and ``env_vars`` in
        the job's own runtime env."""
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.dashboard]
        cmd += ["--working-dir", str(workdir)]
        if env_vars:
            cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
        return [*cmd, "--", *entrypoint]

    def nodes(self) -> dict[int, str]:
        """session id -> local.sh node name (head, worker1, ...)."""
        lines = (self.state / "nodes").read_text().split("\n")
        return {int(sid): name for name, sid in (ln.split() for ln in lines if ln.strip())}

    def actors(self) -> list[tuple[str, str, int]]:
        out = subprocess.run(
            [sys.executable, "-c", ACTORS, self.dashboard],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=120,
        )
        found = re.search(r"^ACTORS (.*)$", out.stdout, re.M)
        assert found, out.stdout + out.stderr
        return [tuple(a) for a in json.loads(found[1])]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    state = Path(tempfile.mkdtemp(prefix="dse2e-", dir="/tmp"))  # short: Ray's socket paths
    c = Cluster(state)
    try:
        up = c.sh("up", "2", timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        line = re.search(r"^export (RAY_ADDRESS=.*)$", up.stdout, re.M)
        assert line, up.stdout
        c.client = dict(kv.split("=", 1) for kv in line[1].split())
        c.dashboard = re.search(r"(http://\S+)", up.stdout.split("dashboard", 1)[1])[1]
        c.head_ip = (state / "head_ip").read_text().strip()
        yield c
    finally:
        down = c.sh("down", timeout=120)
        shutil.rmtree(state, ignore_errors=True)
        assert down.returncode == 0, down.stdout + down.stderr


# --------------------------------------------------------------------------- the servers
@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    pg = PostgresServer()  # skips when PostgreSQL is not installed
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="module")
def tracking(
    postgres: PostgresServer, moto_s3: S3Server, cluster: Cluster, tmp_path_factory
) -> Iterator[ScriptMlflowServer]:
    """cluster/mlflow-server.sh on the head's IP: PostgreSQL backend, artifacts in S3."""
    env = clean_env(
        DIFFSCALE_MLFLOW_DB_URI=postgres.uri,
        DIFFSCALE_MLFLOW_ARTIFACTS=f"s3://{moto_s3.bucket}/mlflow",
        MLFLOW_S3_ENDPOINT_URL=moto_s3.endpoint_url,  # the server alone talks to the bucket
        # the nodes reach the server at the head's IP (not a private range here: 192.0.2.x)
        DIFFSCALE_MLFLOW_ALLOWED_HOSTS=f"{cluster.head_ip}:*,{cluster.head_ip},localhost:*",
        **S3_CREDENTIALS,
    )
    server = ScriptMlflowServer(tmp_path_factory.mktemp("mlflow"), env, host=cluster.head_ip)
    try:
        server.start()
        yield server
    finally:
        server.kill()


def s3_client(s3: S3Server):
    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def s3_keys(s3: S3Server, prefix: str) -> list[str]:
    pages = s3_client(s3).get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def sweep_text(
    tracking: str, storage: str, endpoint: str | None, name: str = NAME, **extra: str
) -> str:
    extra_storage = f", endpoint_url: {endpoint}" if endpoint else ""
    extra_storage += "".join(f", {k}: {v}" for k, v in extra.items())
    return SWEEP.format(
        name=name,
        ckpt=CKPT_EVERY,
        steps=", ".join(map(str, STEPS)),
        tracking=tracking,
        storage=storage,
        extra_storage=extra_storage,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """What `ray job submit --working-dir` uploads: the two packages, nothing else."""
    wd = tmp_path_factory.mktemp("workdir")
    for pkg in ("orchestrator", "diffusion"):
        shutil.copytree(ROOT / pkg, wd / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return wd


# --------------------------------------------------------------------------- the job
@dataclass
class JobRun:
    """What the job and the node loss left: the output, the runs, the figures."""

    submit: subprocess.CompletedProcess[str]
    storage: str
    parent: object  # mlflow.entities.Run
    child: object
    nodes_before: list[str]  # the trial's Ray node per rank before the kill
    killed: str  # local.sh name of the killed node
    killed_node: str  # its Ray node id
    kill_step: int  # highest step logged before the kill
    t_kill: float
    history: list  # the child's train/loss metric history, after the job
    figures: dict = field(default_factory=dict)


def runs_of(client, parent: bool) -> list:
    from orchestrator.names import ROLE_SWEEP, ROLE_TAG

    exp = client.get_experiment_by_name(NAME)
    if exp is None:
        return []
    role = f"tags.`{ROLE_TAG}` = '{ROLE_SWEEP}'"
    query = role if parent else f"tags.`{ROLE_TAG}` != '{ROLE_SWEEP}'"
    return client.search_runs([exp.experiment_id], filter_string=query)


def wait_for(what: str, fn, proc: subprocess.Popen, log: Path, timeout: float = 400.0):
    """Poll ``fn`` until it returns something truthy; fail with the job's output if the
    job ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the job ended ({proc.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} in {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def job(
    cluster: Cluster,
    tracking: ScriptMlflowServer,
    moto_s3: S3Server,
    workdir: Path,
    tmp_path_factory,
) -> JobRun:
    """`ray job submit -- diffscale submit` of the sweep; during its trial, after two
    checkpoints, the worker node that holds a DDP rank (and no Tune/Train driver) is
    SIGKILLed and a replacement node is added."""
    from mlflow.tracking import MlflowClient

    from orchestrator.names import TRAIN_LOSS
    from orchestrator.trial.loop import NODES_TAG

    storage = f"s3://{moto_s3.bucket}/runs"
    (workdir / "sweep.yaml").write_text(sweep_text(tracking.uri, storage, moto_s3.endpoint_url))
    # The job's own runtime env carries only the bucket credentials (on a cloud cluster:
    # the instance role); endpoint and tracking URI come from the sweep, never the raylets.
    cmd = cluster.job_submit(
        workdir, "diffscale", "submit", "sweep.yaml", "--quiet", env_vars=S3_CREDENTIALS
    )
    log = tmp_path_factory.mktemp("job") / "submit.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=cluster.env())
    try:
        client = MlflowClient(tracking.uri)

        def child_run():
            runs = runs_of(client, parent=False)
            return runs[0] if runs and NODES_TAG in runs[0].data.tags else None

        child = wait_for("child run", child_run, proc, log)

        def logged_steps() -> list[int]:
            return [m.step for m in client.get_metric_history(child.info.run_id, TRAIN_LOSS)]

        wait_for(
            "two checkpoints", lambda: max(logged_steps(), default=0) > 2 * CKPT_EVERY, proc, log
        )
        nodes_before = client.get_run(child.info.run_id).data.tags[NODES_TAG].split(",")
        actors = cluster.actors()
        drivers = {node for cls, node, _ in actors if cls != "RayTrainWorker"}
        sessions = cluster.nodes()
        victims = []
        for cls, node, pid in actors:
            if cls == "RayTrainWorker" and node not in drivers:
                sid = int(
                    subprocess.run(
                        ["ps", "-o", "sid=", "-p", str(pid)], capture_output=True, text=True
                    ).stdout.strip()
                    or 0
                )
                victims.append((sessions.get(sid), node))
        assert victims and victims[0][0], f"no worker node without a driver: {actors} {sessions}"
        t_kill = time.time()
        killed = cluster.sh("kill-node", victims[0][0], timeout=30)
        assert killed.returncode == 0, killed.stderr
        kill_step = max(s for s in logged_steps())  # steps logged up to the kill
        added = cluster.sh("add", timeout=400)
        assert added.returncode == 0, added.stdout + added.stderr
        t_added = time.time()
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    submit = subprocess.CompletedProcess(cmd, rc, log.read_text(), "")
    assert rc == 0, submit.stdout[-6000:]
    parents, children = runs_of(client, parent=True), runs_of(client, parent=False)
    assert len(parents) == 1 and len(children) == 1, (parents, children)
    history = client.get_metric_history(children[0].info.run_id, TRAIN_LOSS)
    after = sorted((m.timestamp / 1000, m.step) for m in history if m.step > kill_step)
    resumed = int(children[0].data.tags.get("resumed_at_step", "-1"))
    figures = {
        "seconds_kill_to_first_new_step": round(after[0][0] - t_kill, 1) if after else None,
        "seconds_kill_to_replacement_joined": round(t_added - t_kill, 1),
        "resumed_at_step": resumed,
        "highest_step_logged_before_kill": kill_step,
        "recomputed_steps": kill_step - resumed,
        "checkpoint_every": CKPT_EVERY,
        "total_steps": STEPS[-1],
    }
    print("node loss:", json.dumps(figures))
    return JobRun(
        submit,
        storage,
        parents[0],
        children[0],
        nodes_before,
        *victims[0],
        kill_step,
        t_kill,
        history,
        figures,
    )


# --------------------------------------------------------------------------- the tests
def test_the_two_ddp_workers_ran_on_two_worker_nodes(job: JobRun, cluster: Cluster) -> None:
    assert len(job.nodes_before) == 2 and len(set(job.nodes_before)) == 2, job.nodes_before
    head = [n for cls, n, _ in cluster.actors() if cls == "JobSupervisor"]
    assert not set(job.nodes_before) & set(head)  # the head offers no CPU to trials


def test_the_server_has_the_parent_and_child_runs_and_s3_the_artifacts(
    job: JobRun, moto_s3: S3Server
) -> None:
    from orchestrator.names import PARENT_RUN_TAG, TRIAL_TAG

    assert job.child.data.tags[PARENT_RUN_TAG] == job.parent.info.run_id
    assert job.parent.info.status == "FINISHED" and job.child.info.status == "FINISHED"
    assert job.child.data.tags[TRIAL_TAG].startswith(NAME)
    assert job.parent.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    artifacts = s3_keys(moto_s3, "mlflow/")
    assert any(job.parent.info.run_id in k for k in artifacts), artifacts
    assert any(job.child.info.run_id in k and k.endswith(".png") for k in artifacts), artifacts
    checkpoints = {re.sub(r"/[^/]*$", "", k) for k in s3_keys(moto_s3, f"runs/{NAME}/")}
    assert any(re.search(rf"checkpoint_step0*{STEPS[0]}$", k) for k in checkpoints), checkpoints
    assert any(re.search(rf"checkpoint_step0*{STEPS[1]}$", k) for k in checkpoints), checkpoints


def test_diffscale_status_reports_the_sweep(job: JobRun, moto_s3: S3Server) -> None:
    cmd = [str(VENV_BIN / "diffscale"), "status", NAME, "--storage", job.storage]
    cmd += ["--endpoint-url", moto_s3.endpoint_url, "--mlflow", "--json"]
    out = subprocess.run(
        cmd, capture_output=True, text=True, env=clean_env(**S3_CREDENTIALS), timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    status = json.loads(out.stdout)
    assert status["state"] == "finished" and status["mlflow"] is True, status
    assert status["parent_run_id"] == job.parent.info.run_id, status
    (trial,) = status["trials"]
    assert (trial["status"], trial["step"], trial["total"]) == ("FINISHED", STEPS[-1], STEPS[-1])
    assert trial["mlflow_run"] == job.child.info.run_id, trial
    assert trial["mlflow_status"] == "FINISHED", trial


def test_node_loss_finishes_in_the_same_run_with_every_step_once(job: JobRun) -> None:
    from orchestrator.trial.loop import NODES_TAG

    steps = [m.step for m in job.history]
    assert sorted(steps) == list(range(1, STEPS[-1] + 1)), steps  # none missing, none twice
    assert job.kill_step > 2 * CKPT_EVERY and job.kill_step < STEPS[-1]
    resumed = job.figures["resumed_at_step"]
    assert 2 * CKPT_EVERY <= resumed <= job.kill_step and resumed % CKPT_EVERY == 0, resumed
    after = job.child.data.tags[NODES_TAG].split(",")
    assert len(set(after)) == 2 and job.killed_node not in after, (after, job.killed_node)
    if target := os.environ.get("DIFFSCALE_NODE_LOSS_JSON"):
        Path(target).write_text(json.dumps(job.figures, indent=2) + "\n")


def test_resume_and_status_through_a_job_keep_the_finished_trial(
    job: JobRun, cluster: Cluster, tracking: ScriptMlflowServer, moto_s3: S3Server, workdir: Path
) -> None:
    """`diffscale resume` then `diffscale status` as a Ray job (as after a lost head): the
    finished trial stays finished, in the same runs, with no step logged again."""
    from mlflow.tracking import MlflowClient

    from orchestrator.names import TRAIN_LOSS

    where = f"{NAME} --storage {job.storage} --endpoint-url {moto_s3.endpoint_url}"
    entry = f"diffscale resume {where} && diffscale status {where} --mlflow"
    cmd = cluster.job_submit(workdir, "bash", "-c", entry, env_vars=S3_CREDENTIALS)
    out = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env(), timeout=300)
    said = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in said, said[-6000:]
    rows = [ln for ln in said.splitlines() if ln.split()[:1] == [f"{NAME}-t00"]]
    assert rows and all("FINISHED" in r and f"{STEPS[-1]}/{STEPS[-1]}" in r for r in rows), said
    assert job.child.info.run_id[:12] in rows[-1], rows
    client = MlflowClient(tracking.uri)
    assert [r.info.run_id for r in runs_of(client, parent=True)] == [job.parent.info.run_id]
    assert [r.info.run_id for r in runs_of(client, parent=False)] == [job.child.info.run_id]
    steps = [m.step for m in client.get_metric_history(job.child.info.run_id, TRAIN_LOSS)]
    assert sorted(steps) == list(range(1, STEPS[-1] + 1)), steps


def test_a_job_with_local_storage_or_sqlite_is_refused_and_starts_nothing(
    job: JobRun, cluster: Cluster, tracking: ScriptMlflowServer, workdir: Path
) -> None:
    """The guards through the job path: on this 3-node cluster a node-local storage path
    and a SQLite tracking URI are refused before anything starts (exit 2)."""
    from mlflow.tracking import MlflowClient

    local = Path(tempfile.mkdtemp(prefix="dse2e-local-", dir="/tmp"))
    try:
        name = "e2e-refused"
        text = sweep_text(f"sqlite:///{local}/mlflow.db", str(local / "runs"), None, name=name)
        (workdir / "refused.yaml").write_text(text)
        cmd = cluster.job_submit(workdir, "diffscale", "submit", "refused.yaml")
        out = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env(), timeout=300)
        said = out.stdout + out.stderr
        assert out.returncode != 0 and "failed with exit code 2" in said, said
        assert "refused.yaml: storage.path:" in said and "storage.shared: true" in said, said
        assert "refused.yaml: tracking.uri:" in said and "is not an MLflow server" in said, said
        assert sorted(local.iterdir()) == [], "the refused sweep wrote something"
        assert MlflowClient(tracking.uri).get_experiment_by_name(name) is None
    finally:
        shutil.rmtree(local, ignore_errors=True)
