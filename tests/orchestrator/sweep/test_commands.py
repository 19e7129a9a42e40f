"""Real sweeps on a real local Ray cluster (one per module) with real MLflow (SQLite):
submit, SIGKILL of the driver, resume, status and cancel through the `diffscale` command."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import ray
import yaml

from orchestrator.names import ROLE_SWEEP, ROLE_TAG, ROLE_TRIAL, TRIAL_TAG
from tests.conftest import S3_CREDENTIALS

SWEEP = {
    "model": {"name": "digits-xs"},
    "diffusion": {"num_timesteps": 100},
    "train": {
        "batch_size": 32,
        "lr": 1e-3,
        "ema_rate": 0.99,
        "checkpoint_every": 10,
        "log_every": 10,
        "keep_checkpoints": 3,
        "max_failures": 0,
        "seed": 1,
    },
    "eval": {
        "num_points": 0,
        "nll_images": 16,
        "nll_timesteps": 5,
        "fid_samples": 16,
        "sample_steps": "10",
        "grid_samples": 0,
    },
    "resources": {"num_workers": 1, "cpus_per_worker": 1},
    "max_concurrent_trials": 1,
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.update(S3_CREDENTIALS)  # moto's fake credentials, for the S3 sweep's workers
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "XDG_CACHE_HOME": str(root / "cache"),
    }
    yield root, env
    ray.shutdown()


def write_sweep(root: Path, name: str, storage: dict | None = None, **changes) -> Path:
    d = {"name": name, **json.loads(json.dumps(SWEEP)), **changes}
    d["tracking"] = {"uri": f"sqlite:///{root}/mlflow.db"}
    d["storage"] = storage or {"path": str(root / "runs")}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def call(cluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `diffscale ARGS` to the end in the test's directory, against the module's cluster."""
    root, env = cluster
    return subprocess.run(
        cli(*args), env=env, cwd=root, capture_output=True, text=True, timeout=timeout
    )


def state(root: Path, sweep: str, trial: str) -> dict:
    try:
        return json.loads((root / "runs" / sweep / "state" / f"{trial}.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out: {log.read_text()[-3000:]}"
        time.sleep(0.1)


def runs_by_trial(root: Path, sweep: str) -> tuple[mlflow.MlflowClient, dict, list]:
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name(sweep)
    runs = client.search_runs([exp.experiment_id])
    trials = {r.data.tags[TRIAL_TAG]: r for r in runs if r.data.tags.get(ROLE_TAG) == ROLE_TRIAL}
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == ROLE_SWEEP]
    return client, trials, parents


def history(client, run, key) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


def listing(directory: Path) -> dict[str, float]:
    return {str(p.relative_to(directory)): p.stat().st_mtime for p in directory.rglob("*")}


def test_killed_sweep_resumes_without_retraining_or_duplicate_steps(cluster):
    root, env = cluster
    path = write_sweep(root, "kr", grid={"model.channels": [32, 64], "budget.steps": [30, 60]})
    names = ["kr-t00-32", "kr-t01-64"]

    def one_done_one_started() -> bool:
        states = [state(root, "kr", t) for t in names]
        done = [s.get("status") == "FINISHED" for s in states]
        started = [s.get("status") != "FINISHED" and s.get("step", 0) >= 30 for s in states]
        return sum(done) == 1 and sum(started) == 1

    log = root / "kr-submit.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cli("submit", str(path)),
            env=env,
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(one_done_one_started, proc, log)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first_t, second_t = sorted(
        names, key=lambda t: state(root, "kr", t).get("status") != "FINISHED"
    )
    client, trials, _ = runs_by_trial(root, "kr")
    done_before = client.get_run(trials[first_t].info.run_id)
    done_history = history(client, done_before, "eval/nll_bpd")
    done_files = listing(root / "runs" / "kr" / "trials" / first_t)
    interrupted_run = trials[second_t].info.run_id
    assert done_before.info.status == "FINISHED"

    report = json.loads(
        call(cluster, "status", "kr", "--storage", str(root / "runs"), "--json").stdout
    )
    assert report["state"] == "interrupted"
    assert {t["trial"]: t["status"] for t in report["trials"]} == {
        first_t: "FINISHED",
        second_t: "INTERRUPTED",
    }
    # each row's metrics belong to the step shown beside them (the cell's eval at step 30)
    rows = {t["trial"]: t for t in report["trials"]}
    _, trials_now, _ = runs_by_trial(root, "kr")
    for trial, row in rows.items():
        assert row["metrics_step"] == (30 if trial == second_t else 60), row
        assert row["metrics_step"] <= row["step"], row
        nll = dict(history(client, trials_now[trial], "eval/nll_bpd"))
        assert row["metrics"]["eval/nll_bpd"] == pytest.approx(nll[row["metrics_step"]]), row
    table = call(cluster, "status", "kr", "--storage", str(root / "runs")).stdout
    assert re.search(rf"{second_t}\s+\S+\s+INTERRUPTED\s+\d+/60\s+2\s+30\s", table), table

    resumed = call(cluster, "resume", "kr", "--storage", str(root / "runs"), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    steps = [int(s) for s in re.findall(rf"{second_t}: step (\d+)/60", resumed.stdout)]
    assert steps and min(steps) > 10, resumed.stdout  # continued from a checkpoint, not step 0
    assert f"{first_t}: step" not in resumed.stdout  # the finished trial was not rerun

    client, trials, parents = runs_by_trial(root, "kr")
    done_after = client.get_run(trials[first_t].info.run_id)
    assert done_after.info.end_time == done_before.info.end_time
    assert history(client, done_after, "eval/nll_bpd") == done_history
    assert listing(root / "runs" / "kr" / "trials" / first_t) == done_files
    (parent,) = parents
    assert parent.info.status == "FINISHED" and len(trials) == 2
    assert "sweep.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    for run in trials.values():
        run = client.get_run(run.info.run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        losses = history(client, run, "train/loss")
        assert [s for s, _ in losses] == list(range(10, 61, 10))  # no step twice
        cells = json.loads(run.data.tags["cells"])
        nll_steps = {s for s, _ in history(client, run, "eval/nll_bpd")}
        flops_steps = {s for s, _ in history(client, run, "compute/flops")}
        assert {c["step"] for c in cells} == {30, 60} and {30, 60} <= nll_steps & flops_steps
        assert int(run.data.params["model.params"]) > 0
    assert trials[second_t].info.run_id == interrupted_run

    again = call(cluster, "submit", str(path))
    assert again.returncode == 0 and "2 of 2 trials already finished" in again.stdout
    changed = write_sweep(root, "kr", grid={"model.channels": [32], "budget.steps": [30, 60]})
    refused = call(cluster, "submit", str(changed))
    assert refused.returncode == 2 and "already exists" in refused.stderr, refused.stderr


def test_every_cell_keeps_its_checkpoint_and_is_evaluated_by_cell_id(cluster):
    """keep_checkpoints: 1 governs only the rolling checkpoints: the one at each cell's step
    stays, in a folder named by step, and `diffscale eval NAME --cell ID` evaluates it."""
    root, _ = cluster
    train = {**SWEEP["train"], "keep_checkpoints": 1, "checkpoint_every": 5}
    path = write_sweep(root, "kc", train=train, grid={"budget.steps": [10, 20, 30]})
    done = call(cluster, "submit", str(path), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "checkpoint saved" in done.stdout, done.stdout  # a report between eval points
    record = json.loads((root / "runs" / "kc" / "sweep.json").read_text())
    ((trial, info),) = record["trials"].items()
    assert sorted(info["cells"].values()) == [10, 20, 30]
    folders = sorted(
        p.name for p in (root / "runs" / "kc" / "trials" / trial).glob("checkpoint_step*")
    )
    # the three cells, plus the newest rolling one (25); 5 and 15 were deleted
    assert folders == [f"checkpoint_step{s:08d}" for s in (10, 20, 25, 30)], folders
    cell = next(c for c, step in info["cells"].items() if step == 20)
    out = root / "kc-eval"
    evaluated = call(
        cluster,
        *("eval", "kc", "--cell", cell, "--storage", str(root / "runs"), "--out", str(out)),
        *("--num-images", "16", "--num-samples", "16", "--sample-steps", "10", "--json"),
        *("--nll-timesteps", "5", "--batch-size", "16"),
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout)
    assert result["step"] == 20 and result["checkpoint"].endswith("checkpoint_step00000020")
    assert result["nll_bpd"] > 0 and (out / "eval.json").is_file()
    bare = call(cluster, "eval", "kc", "--storage", str(root / "runs"))  # a name, no cell
    assert bare.returncode == 2 and "`diffscale eval kc --cell c00`" in bare.stderr, bare.stderr
    missing = call(cluster, "eval", "kc", "--cell", "c99", "--storage", str(root / "runs"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
    assert "has no cell 'c99'" in missing.stderr and cell in missing.stderr, missing.stderr


def test_status_and_cancel_of_a_running_sweep_on_s3(cluster, s3):
    import boto3

    root, env = cluster
    where = ["--storage", f"s3://{s3.bucket}/sweeps", "--endpoint-url", s3.endpoint_url]
    storage = {"path": f"s3://{s3.bucket}/sweeps", "endpoint_url": s3.endpoint_url}
    path = write_sweep(root, "cn", storage=storage, budget={"steps": 5000})
    client = boto3.client("s3", endpoint_url=s3.endpoint_url)

    def s3_state() -> dict:
        try:
            body = client.get_object(Bucket=s3.bucket, Key="sweeps/cn/state/cn-t00.json")["Body"]
        except client.exceptions.NoSuchKey:
            return {}
        return json.loads(body.read())

    log = root / "cn-submit.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cli("submit", str(path)),
            env=env,
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: s3_state().get("step", 0) >= 20, proc, log)
        shown = call(cluster, "status", "cn", *where)
        assert shown.returncode == 0 and "sweep cn: running" in shown.stdout, shown.stdout
        assert re.search(r"cn-t00\s+digits-xs\s+RUNNING\s+\d+/5000", shown.stdout), shown.stdout
        stopped = call(cluster, "cancel", "cn", *where)
        assert "stopped (cancelled)" in stopped.stdout, stopped.stdout + stopped.stderr
        assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    report = json.loads(call(cluster, "status", "cn", *where, "--json").stdout)
    assert report["state"] == "cancelled"
    (row,) = report["trials"]
    assert row["status"] == "INTERRUPTED" and 20 <= row["step"] < 5000
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix="sweeps/cn/trials/cn-t00/checkpoint_")
    assert listed.get("KeyCount", 0) > 0  # checkpoints are kept for `diffscale resume`


def test_errored_trial_is_kept_until_retried(cluster):
    from diffusion.data import prepare_dataset

    root, _ = cluster
    data = root / "digits-data"
    prepare_dataset("digits", str(data))
    shard = next((data / "train").glob("part-*.parquet"))
    hidden = shard.with_suffix(".away")
    shard.rename(hidden)  # the manifest is there (validation passes); training cannot read
    path = write_sweep(
        root,
        "er",
        data={"dataset": str(data)},
        budget={"steps": 20},
        eval={**SWEEP["eval"], "features": "digits"},
    )
    where = ["--storage", str(root / "runs")]
    failed = call(cluster, "submit", str(path))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert re.search(r"er-t00\s+digits-xs\s+ERROR", failed.stdout), failed.stdout
    assert "er-t00 failed:" in failed.stdout
    kept = call(cluster, "resume", "er", *where)  # without --retry-errored: not rerun
    assert kept.returncode == 1 and "er-t00: step" not in kept.stdout, kept.stdout + failed.stdout
    hidden.rename(shard)
    retried = call(cluster, "resume", "er", *where, "--retry-errored", timeout=600)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert re.search(r"er-t00\s+digits-xs\s+FINISHED\s+20/20", retried.stdout), retried.stdout


def test_ctrl_c_shows_diffscale_resume_not_tunes_restore_hint(cluster):
    """Ctrl-C (SIGINT to the command's process group) stops the sweep with exit 130 and the
    hint `diffscale resume NAME`; Tune's own `Tuner.restore(path=..., trainable=...)` line,
    which the sweep's users never call, is filtered out. `status --mlflow` adds the run ids."""
    root, env = cluster
    path = write_sweep(root, "ci", budget={"steps": 5000})
    log = root / "ci-submit.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cli("submit", str(path)),
            env=env,
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: state(root, "ci", "ci-t00").get("step", 0) >= 10, proc, log)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "interrupted: `diffscale resume ci` continues it" in text, text[-3000:]
    assert "Tuner.restore" not in text and "Resume experiment with" not in text, text[-3000:]

    where = ["--storage", str(root / "runs")]
    plain = json.loads(call(cluster, "status", "ci", *where, "--json").stdout)
    assert plain["mlflow"] is False and plain["trials"][0]["mlflow_run"] is None
    with_runs = json.loads(call(cluster, "status", "ci", *where, "--json", "--mlflow").stdout)
    _, trials, _ = runs_by_trial(root, "ci")
    assert with_runs["trials"][0]["mlflow_run"] == trials["ci-t00"].info.run_id
    table = call(cluster, "status", "ci", *where, "--mlflow").stdout
    assert re.search(r"ci-t00\s+digits-xs\s+INTERRUPTED\s+\d+/5000\s.*\s[0-9a-f]{12}\n", table)


def test_the_filtered_logger_is_the_one_tune_reports_interrupts_on():
    """Tune logs its resume hint from ray.tune.tune's module logger; the filter sits there."""
    import ray.tune.tune

    from orchestrator.sweep.driver import TUNE_LOGGER, TuneResumeHintFilter

    assert ray.tune.tune.logger.name == TUNE_LOGGER
    hint = 'Experiment has been interrupted.\nResume experiment with: Tuner.restore(path="p")'
    record = ray.tune.tune.logger.makeRecord(TUNE_LOGGER, 30, __file__, 1, hint, (), None)
    assert not TuneResumeHintFilter().filter(record)
    other = ray.tune.tune.logger.makeRecord(TUNE_LOGGER, 30, __file__, 1, "Stop signal", (), None)
    assert TuneResumeHintFilter().filter(other)


def test_the_paper_study_runs_end_to_end_at_a_tiny_budget(cluster):
    """`sweeps/paper_digits.yaml` as shipped (21 trials: 7 rows x 3 seeds, the sampling-steps
    study), shrunk by --set only, through `diffscale submit` and `diffscale paper`: every
    finding gets its rows and metrics and a verdict (at 3 steps, any verdict)."""
    root = cluster[0]
    sweep = Path(__file__).resolve().parents[3] / "sweeps" / "paper_digits.yaml"
    small = {
        "tracking.uri": f"sqlite:///{root}/mlflow.db",
        "storage.path": str(root / "runs"),
        "model.name": "digits-3xs",
        "budget.steps": 3,
        "train.batch_size": 8,
        "train.log_every": 1,
        "train.checkpoint_every": 3,
        "eval.num_points": 0,
        "eval.nll_images": 4,
        "eval.nll_timesteps": 2,
        "eval.fid_samples": 4,
        "eval.sample_steps": "5",
        "eval.grid_samples": 0,
    }
    sets = [a for k, v in small.items() for a in ("--set", f"{k}={v}")]
    out = call(cluster, "submit", str(sweep), *sets, "--quiet", timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    paper = call(
        cluster, "paper", "paper-digits", "--json", "--tracking-uri", small["tracking.uri"]
    )
    assert paper.returncode == 0, paper.stdout[-3000:] + paper.stderr[-3000:]
    doc = json.loads(paper.stdout)
    assert len(doc["table"]["rows"]) == 21
    findings = doc["findings"]
    assert len(findings) == 6
    allowed = {"holds", "does not hold", "inconclusive"}
    assert all(f["verdict"] in allowed for f in findings), [f["verdict"] for f in findings]
