"""Ray Train trials for real: a local Ray cluster (one per module), real MLflow (SQLite),
worker processes killed with SIGKILL. Each trial trains digits-xs on 2 CPU workers."""

import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest
import ray
import torch

from orchestrator.config import TrialConfig
from orchestrator.train import STATE_FILE, run_trial

BASE = {
    "name": "t",
    "model": {"name": "digits-xs"},
    "diffusion": {"num_timesteps": 100},
    "train": {"batch_size": 32, "lr": 1e-3, "ema_rate": 0.99, "checkpoint_every": 20,
              "log_every": 10, "keep_checkpoints": 2, "max_failures": 1, "seed": 3},
    "budget": {"steps": 100},
    "eval": {"num_points": 1, "nll_images": 16, "nll_timesteps": 5, "fid_samples": 16,
             "sample_steps": "10", "grid_samples": 4},
    "resources": {"num_workers": 2, "cpus_per_worker": 1},
}  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("trials")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ["XDG_CACHE_HOME"] = str(root / "cache")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield root
    ray.shutdown()


def config(env, name, **changes):
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    d["name"] = name
    d["tracking"] = {"uri": f"sqlite:///{env}/mlflow.db", "experiment": "trials"}
    d["storage"] = {"path": str(env / "runs")}
    for key, value in changes.items():
        section, field = key.split("__")
        d[section] = {**d[section], field: value}
    return TrialConfig.from_dict(d)


def history(env, run_name, key):
    client = mlflow.MlflowClient(f"sqlite:///{env}/mlflow.db")
    exp = client.get_experiment_by_name("trials")
    (run,) = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{run_name}'")
    return run, [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


def final_weights(result):
    state = torch.load(Path(result.checkpoint.path) / STATE_FILE, weights_only=True)
    return state["model"], state["ema"]


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
    for key in ("train/mse", "train/vb", "train/loss_q0", "perf/images_per_s",
                "compute/flops", "compute/images"):  # fmt: skip
        assert history(env, "ref", key)[1], key
    for key in ("eval/nll_bpd", "eval/digits_fd", "eval/precision", "eval/recall"):
        assert [s for s, _ in history(env, "ref", key)[1]] == [1, 100], key
    assert run.data.params["train.lr"] == "0.001" and run.info.status == "FINISHED"

    # the same trial under another name; one worker SIGKILLed after two checkpoints
    runs = env / "runs" / "killed"
    killed = []

    def killer():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if len([p for p in runs.glob("checkpoint_*") if p.is_dir()]) >= 2 and worker_pids():
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


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(env):
    cfg = config(env, "nan", train__lr=1e6, train__max_failures=0, train__checkpoint_every=1,
                 train__grad_clip=None, eval__fid_samples=0)  # fmt: skip
    with pytest.raises(ray.train.TrainingFailedError, match=r"non-finite loss at step \d+"):
        run_trial(cfg)
    checkpoints = [p for p in (env / "runs" / "nan").glob("checkpoint_*") if p.is_dir()]
    assert checkpoints and all((c / "manifest_rank0.json").is_file() for c in checkpoints)
