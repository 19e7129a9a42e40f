"""Ray Train trials for real: a local Ray cluster (one per module), real MLflow (SQLite),
worker processes killed with SIGKILL. Each trial trains digits-xs on 2 CPU workers."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import ray
import torch

from orchestrator.checkpoint import load_model_checkpoint
from orchestrator.config import TrialConfig
from orchestrator.names import CHECKPOINT_META as META_FILE
from orchestrator.names import CHECKPOINT_STATE as STATE_FILE
from orchestrator.trial import run_trial
from tests.conftest import S3_CREDENTIALS

BASE = {
    "name": "t",
    "model": {"name": "digits-xs"},
    "diffusion": {"num_timesteps": 100},
    "train": {
        "batch_size": 32,
        "lr": 1e-3,
        "ema_rate": 0.99,
        "checkpoint_every": 20,
        "log_every": 10,
        "keep_checkpoints": 2,
        "max_failures": 1,
        "seed": 3,
    },
    "budget": {"steps": 100},
    "eval": {
        "num_points": 1,
        "nll_images": 16,
        "nll_timesteps": 5,
        "fid_samples": 16,
        "sample_steps": "10",
        "grid_samples": 4,
    },
    "resources": {"num_workers": 2, "cpus_per_worker": 1},
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("trials")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ["XDG_CACHE_HOME"] = str(root / "cache")
    os.environ.update(S3_CREDENTIALS)  # moto's fake credentials, for the S3 trial's workers
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield root
    ray.shutdown()


def config(env, name, storage=None, endpoint=None, **changes):
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    d["name"] = name
    d["tracking"] = {"uri": f"sqlite:///{env}/mlflow.db", "experiment": "trials"}
    d["storage"] = {"path": storage or str(env / "runs"), "endpoint_url": endpoint}
    for key, value in changes.items():
        section, field = key.split("__")
        d[section] = {**d[section], field: value}
    return TrialConfig.from_dict(d)


def history(env, run_name, key):
    client = mlflow.MlflowClient(f"sqlite:///{env}/mlflow.db")
    exp = client.get_experiment_by_name("trials")
    (run,) = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{run_name}'")
    run = client.get_run(run.info.run_id)
    return run, [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


def final_weights(result):
    state = torch.load(Path(result.checkpoint.path) / STATE_FILE, weights_only=True)
    return state["model"], state["ema"]


def registered_steps(run_dir):
    """Steps of the checkpoints Ray has committed (its checkpoint-manager snapshot)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [int(c["metrics"]["step"]) for c in snapshot.get("checkpoint_results", [])]


def worker_pids():
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"RayTrainWorker" in cmd:
                pids.append(int(entry.name))
    return sorted(pids)


def test_trial_logs_every_metric_and_survives_a_killed_worker_exactly(env):
    ref = run_trial(config(env, "ref"))
    assert ref.error is None
    run, loss = history(env, "ref", "train/loss")
    assert [s for s, _ in loss] == list(range(10, 101, 10))
    for key in (
        "train/mse",
        "train/vb",
        "train/loss_q0",
        "perf/images_per_s",
        "compute/flops",
        "compute/images",
    ):
        assert history(env, "ref", key)[1], key
    for key in ("eval/nll_bpd", "eval/digits_fd", "eval/precision", "eval/recall"):
        assert [s for s, _ in history(env, "ref", key)[1]] == [1, 100], key
    eval_flops = history(env, "ref", "compute/eval_flops")[1]
    assert [s for s, _ in eval_flops] == [1, 100]  # cumulative, at each eval point
    assert 0 < eval_flops[0][1] < eval_flops[1][1]
    assert run.data.params["train.lr"] == "0.001" and run.info.status == "FINISHED"
    # `diffscale eval` reads a trial checkpoint: the same EMA weights, the trial's process
    evaluable = load_model_checkpoint(ref.checkpoint.path)
    for key, value in final_weights(ref)[1].items():
        assert torch.equal(evaluable.ema_model.state_dict()[key], value), key
    assert evaluable.diffusion.num_timesteps == 100 and evaluable.meta["step"] == 100

    # the same trial under another name; one worker SIGKILLed once Ray has committed a
    # checkpoint at step >= 20
    runs = env / "runs" / "killed"
    killed = []

    def killer():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            steps = registered_steps(runs)  # read once: the snapshot is rewritten meanwhile
            if steps and max(steps) >= 20 and worker_pids():
                pid = worker_pids()[-1]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_trial(config(env, "killed"))
    thread.join(timeout=5)
    assert killed, "no worker was killed"
    assert result.error is None
    _, loss2 = history(env, "killed", "train/loss")
    assert [s for s, _ in loss2] == [s for s, _ in loss]  # no missing, no duplicated steps
    assert [v for _, v in loss2] == [v for _, v in loss]  # and bit-identical values
    for a, b in zip(final_weights(ref), final_weights(result), strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # the evaluation compute is carried through the restore, not restarted from zero
    assert history(env, "killed", "compute/eval_flops")[1] == eval_flops


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(env):
    cfg = config(
        env,
        "nan",
        train__lr=1e6,
        train__max_failures=0,
        train__checkpoint_every=1,
        train__grad_clip=None,
        eval__fid_samples=0,
    )
    with pytest.raises(ray.train.TrainingFailedError, match=r"non-finite loss at step \d+"):
        run_trial(cfg)
    checkpoints = [p for p in (env / "runs" / "nan").glob("checkpoint_*") if p.is_dir()]
    assert checkpoints and all((c / "manifest_rank0.json").is_file() for c in checkpoints)


def checkpoint_dirs(path):
    return sorted(p for p in path.glob("checkpoint_*") if p.is_dir())


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(env):
    run_trial(config(env, "trunc", budget__steps=40, eval__fid_samples=0))
    newest = checkpoint_dirs(env / "runs" / "trunc")[-1]
    data = (newest / STATE_FILE).read_bytes()
    (newest / STATE_FILE).write_bytes(data[: len(data) // 2])
    # the same trial with a larger budget resumes from the previous (step 20) checkpoint
    result = run_trial(config(env, "trunc", budget__steps=60, eval__fid_samples=0))
    assert json.loads((Path(result.checkpoint.path) / META_FILE).read_text())["step"] == 60
    run, loss = history(env, "trunc", "train/loss")
    assert [s for s, _ in loss] == list(range(10, 61, 10)) and run.info.status == "FINISHED"


def test_killed_driver_then_the_same_command_continues_the_same_run(env, tmp_path):
    cfg = config(env, "driver", budget__steps=120, eval__fid_samples=0)
    yaml_path = tmp_path / "trial.yaml"
    yaml_path.write_text(cfg.to_yaml())
    command = [sys.executable, "-m", "orchestrator.cli", "train", str(yaml_path)]
    child_env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(tmp_path / "first.log", "wb") as log_file:
        first = subprocess.Popen(
            command,
            env=child_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while len(checkpoint_dirs(env / "runs" / "driver")) < 2:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    run_before, _ = history(env, "driver", "train/loss")
    assert run_before.info.status == "RUNNING"  # the killed driver could not close it
    second = subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    run, loss = history(env, "driver", "train/loss")
    assert run.info.run_id == run_before.info.run_id and run.info.status == "FINISHED"
    assert [s for s, _ in loss] == list(range(10, 121, 10))


def test_s3_storage_writes_and_restores_checkpoints(env, s3):
    import boto3

    storage = f"s3://{s3.bucket}/runs"
    cfg = config(
        env,
        "s3trial",
        storage=storage,
        endpoint=s3.endpoint_url,
        budget__steps=20,
        eval__fid_samples=0,
    )
    first = run_trial(cfg)
    assert first.checkpoint.path.startswith(f"{s3.bucket}/runs/s3trial/checkpoint_")
    resumed = run_trial(cfg.with_overrides(["budget.steps=40"]))
    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    meta_key = f"{resumed.checkpoint.path.split('/', 1)[1]}/{META_FILE}"
    meta = json.loads(client.get_object(Bucket=s3.bucket, Key=meta_key)["Body"].read())
    assert meta["step"] == 40
    _, loss = history(env, "s3trial", "train/loss")
    assert [s for s, _ in loss] == [10, 20, 30, 40]
