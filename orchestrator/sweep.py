"""The sweep driver: submit a sweep to Ray Tune, resume it, watch it, cancel it.

Each trial of the expanded grid (:mod:`orchestrator.grid`) is one Tune trial of a function
trainable (:func:`_drive_trial`) that builds the trial's ``TorchTrainer`` and calls fit()
(the Train V2 pattern: a Trainer cannot be passed to a Tuner). The Train run is named
after the trial, so a restarted Tune trial continues from the trial's newest checkpoint in
the same MLflow run. MLflow gets one parent run per sweep (the YAML as an artifact) and one
child run per trial (see :mod:`orchestrator.train`).

Everything a later command needs lives in the sweep's storage folder
``{storage.path}/{name}/`` (a local directory or s3://):

- ``sweep.json``: the sweep file's text and overrides, the MLflow parent run id;
- ``state/{trial}.json``: per trial, its status (RUNNING, FINISHED, ERROR), progress
  (step of total) and latest metrics, written by the driver as results arrive and by the
  trainable when a trial ends, so a finished trial is never trained again;
- ``driver.json``: the driver's host, pid, heartbeat and end state;
- ``cancel``: written by ``diffscale cancel``; the driver stops gracefully when it sees it;
- ``tune/``: Ray Tune's experiment state (restored by ``resume``); ``trials/{trial}/``:
  each trial's Ray Train run and checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from diffusion.data import storage
from orchestrator.config import TrialConfig
from orchestrator.grid import SweepPlan, SweepSpec, load_plan
from orchestrator.validation import ConfigError, Problem

log = logging.getLogger(__name__)

__all__ = ["Prepared", "SweepError", "SweepStore", "cancel", "prepare", "resume", "status",
           "submit"]  # fmt: skip

HEARTBEAT_S = 10.0  # the driver refreshes driver.json this often
STALE_S = 90.0  # a heartbeat older than this means the driver is gone
TUNE_DIR = "tune"
DRIVER_MEMORY = 64 * 2**20  # bytes reserved per Tune trial driver (a placeholder resource)


class SweepError(RuntimeError):
    """A sweep cannot be submitted, resumed, cancelled or found."""


# --------------------------------------------------------------------------- storage
class SweepStore:
    """The sweep's folder in storage (local or S3), read and written as small JSON files."""

    def __init__(self, root_uri: str, endpoint_url: str | None = None) -> None:
        self.uri = root_uri.rstrip("/")
        self.endpoint_url = endpoint_url
        self.fs, self.root = storage.resolve(self.uri, endpoint_url=endpoint_url)

    def _path(self, name: str) -> str:
        return storage.join(self.root, name)

    def read(self, name: str) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.fs, self._path(name)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.warning("unreadable %s/%s: %s", self.uri, name, error)
            return None

    def write(self, name: str, data: dict) -> None:
        storage.write_bytes(self.fs, self._path(name), json.dumps(data, indent=1).encode())

    def delete(self, name: str) -> None:
        storage.delete(self.fs, self._path(name))

    def exists(self, name: str) -> bool:
        return storage.exists(self.fs, self._path(name))

    def trial_state(self, trial: str) -> dict:
        return self.read(f"state/{trial}.json") or {}

    def update_trial(self, trial: str, **fields: Any) -> dict:
        state = {**self.trial_state(trial), **fields, "updated": time.time()}
        self.write(f"state/{trial}.json", state)
        return state


def store_for(name: str, storage_path: str | None = None, endpoint_url: str | None = None):
    """The store of sweep ``name`` under ``storage_path`` (default ./diffscale_runs)."""
    base = storage_path or os.environ.get("DIFFSCALE_STORAGE") or "./diffscale_runs"
    if "://" not in base:
        base = os.path.abspath(base)
    return SweepStore(base.rstrip("/") + "/" + name, endpoint_url)


def stored_record(store: SweepStore) -> dict:
    """The sweep's sweep.json: the file as submitted, its overrides, trials and run ids."""
    record = store.read("sweep.json")
    if record is None:
        raise SweepError(f"no sweep at {store.uri} (no sweep.json): submit it first, or pass "
                         f"--storage where it was submitted")  # fmt: skip
    return record


# --------------------------------------------------------------------------- trainable
def _drive_trial(config: dict) -> None:
    """Tune function trainable: run one trial's TorchTrainer unless it already finished."""
    import ray.train
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.train import run_trial

    store = SweepStore(config["store"], config.get("endpoint_url"))
    record = store.read("sweep.json") or {}
    trial = record["trials"][config["trial"]]
    cfg = TrialConfig.from_dict(trial["config"], source=f"{store.uri}/sweep.json")
    done = store.trial_state(cfg.name)
    if done.get("status") == "FINISHED":
        log.info("trial %s already finished: not trained again", cfg.name)
        ray.tune.report({**done.get("metrics", {}), "already_finished": 1.0})
        return
    if done.get("status") == "ERROR" and not record.get("retry_errored"):
        # Tune may hand an errored trial back after a restore: it stays errored unless asked.
        error = (done.get("error") or "").strip()[-500:]
        raise RuntimeError(f"trial {cfg.name} failed before and is not retried without "
                           f"--retry-errored: {error}")  # fmt: skip
    store.update_trial(cfg.name, status="RUNNING", started=time.time(), error=None)
    try:
        result = run_trial(cfg, tags=trial["tags"], parent_run_id=record.get("parent_run_id"),
                           callbacks=[TuneReportCallback()])  # fmt: skip
    except ray.train.TrainingFailedError as error:
        store.update_trial(cfg.name, status="ERROR", error=str(error)[-2000:], ended=time.time())
        raise
    metrics = {k: float(v) for k, v in (result.metrics or {}).items()
               if isinstance(v, (int, float)) and ("/" in k or k == "step")}  # fmt: skip
    store.update_trial(cfg.name, status="FINISHED", metrics=metrics, ended=time.time(),
                       step=int(metrics.get("step", 0)))  # fmt: skip


def _tune_callback(store: SweepStore, plan: SweepPlan, say: Callable[[str], None]):
    """A Tune callback: progress to ``say`` and the state files, heartbeat, cancel requests."""
    from ray.tune import Callback

    totals = {t.name: t.steps for t in plan.trials}

    class _Progress(Callback):
        def __init__(self) -> None:
            self.last_beat = 0.0

        def on_step_end(self, iteration, trials, **info):
            now = time.time()
            if now - self.last_beat < HEARTBEAT_S:
                return
            self.last_beat = now
            _beat(store, "running")
            if store.exists("cancel"):
                say("cancel requested: stopping trials (checkpoints are kept)")
                signal.raise_signal(signal.SIGINT)  # Tune's graceful stop; state is saved

        def on_trial_result(self, iteration, trials, trial, result, **info):
            name = trial.config.get("trial")
            if name not in totals or result.get("already_finished"):
                return
            metrics = {k: v for k, v in result.items() if "/" in str(k)
                       and isinstance(v, (int, float))}  # fmt: skip
            step = int(result.get("step", 0))
            store.update_trial(name, step=step, total=totals[name], metrics=metrics)
            shown = "  ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items()
                              if k.startswith("eval/") and "stderr" not in k)  # fmt: skip
            say(f"{name}: step {step}/{totals[name]}" + (f"  {shown}" if shown else ""))

        def on_trial_complete(self, iteration, trials, trial, **info):
            say(f"{trial.config.get('trial')}: finished")

        def on_trial_error(self, iteration, trials, trial, **info):
            say(f"{trial.config.get('trial')}: ERROR (see `diffscale status {plan.spec.name}`)")

    return _Progress()


def _beat(store: SweepStore, state: str, **extra: Any) -> None:
    record = store.read("driver.json") or {}
    record.update(host=socket.gethostname(), pid=os.getpid(), state=state,
                  heartbeat=time.time(), **extra)  # fmt: skip
    store.write("driver.json", record)


# --------------------------------------------------------------------------- submit
@dataclass(frozen=True)
class SubmitResult:
    plan: SweepPlan
    store: SweepStore
    statuses: dict[str, str]  # trial -> FINISHED / ERROR / INTERRUPTED
    interrupted: bool


def capacity_problems(plan: SweepPlan) -> list[Problem]:
    """Without RAY_ADDRESS the sweep runs on a private local Ray: every trial must fit on
    this machine, or Tune would wait forever for resources that never come."""
    if os.environ.get("RAY_ADDRESS"):
        return []
    cpus = os.cpu_count() or 1
    problems = []
    for t in plan.trials:
        res = t.config.resources
        need = res.num_workers * res.cpus_per_worker
        if need > cpus:
            problems.append((f"resources ({t.size})", f"{res.num_workers} workers x "
                             f"{res.cpus_per_worker:g} CPUs = {need:g} CPUs, but this machine "
                             f"has {cpus}; lower resources.num_workers or set RAY_ADDRESS to "
                             "a cluster"))  # fmt: skip
        if res.use_gpu:
            import torch

            if torch.cuda.device_count() < res.num_workers:
                problems.append((f"resources.use_gpu ({t.size})", f"{res.num_workers} GPUs "
                                 f"needed, {torch.cuda.device_count()} here; set RAY_ADDRESS "
                                 "to a GPU cluster"))  # fmt: skip
    return problems


@dataclass(frozen=True)
class Prepared:
    """A validated, expanded sweep and what its storage already holds."""

    plan: SweepPlan
    store: SweepStore
    record: dict | None  # the stored sweep.json; None for a new sweep

    @property
    def spec(self) -> SweepSpec:
        return self.plan.spec


def prepare(path: str, overrides: Sequence[str] = (), *, check_data: bool = True) -> Prepared:
    """Load, validate and expand a sweep file; find its store and what it holds already.

    A sweep of the same name stored with a different definition is an error: resuming it
    with another grid would mix two studies in one experiment.
    """
    plan = load_plan(path, overrides, check_data=check_data)
    spec = plan.spec
    store = SweepStore(spec.storage_path, spec.storage_endpoint)
    record = store.read("sweep.json")
    if record is not None and record["definition"] != spec.to_dict():
        changed = sorted(k for k, v in spec.to_dict().items() if record["definition"].get(k) != v)
        raise SweepError(
            f"sweep {spec.name!r} already exists at {store.uri} with a different definition "
            f"(differs in: {', '.join(changed)}); give the new study another name, or "
            f"`diffscale resume {spec.name}` to continue the stored one"
        )
    return Prepared(plan, store, record)


def submit(
    prepared: Prepared,
    *,
    retry_errored: bool = False,
    say: Callable[[str], None] = log.info,
) -> SubmitResult:
    """Run (or, if it exists with the same definition, continue) a prepared sweep:
    ``submit(prepare("sweeps/demo.yaml"))``."""
    spec = prepared.spec
    if problems := capacity_problems(prepared.plan):
        raise ConfigError(problems, spec.source)
    record = prepared.record or {
        "name": spec.name, "source": spec.source, "text": spec.text,
        "overrides": list(spec.overrides), "definition": spec.to_dict(),
        "tracking_uri": spec.tracking_uri, "experiment": spec.experiment, "created": time.time(),
    }  # fmt: skip
    return _run(prepared.plan, prepared.store, record, retry_errored=retry_errored, say=say)


def resume(
    name: str,
    *,
    storage_path: str | None = None,
    endpoint_url: str | None = None,
    retry_errored: bool = False,
    say: Callable[[str], None] = log.info,
) -> SubmitResult:
    """Continue sweep ``name`` after any interruption: finished trials are kept, the
    interrupted ones continue from their newest checkpoints, errored ones only if asked."""
    store = store_for(name, storage_path, endpoint_url)
    record = stored_record(store)
    plan = load_plan(record["source"], record["overrides"], text=record["text"])
    if problems := capacity_problems(plan):
        raise ConfigError(problems, plan.spec.source)
    return _run(plan, store, record, retry_errored=retry_errored, say=say)


def _parent_run(plan: SweepPlan, record: dict):
    from orchestrator.tracking import RunLogger

    spec = plan.spec
    tracker = RunLogger(
        spec.tracking_uri, spec.experiment, run_id=record.get("parent_run_id"), run_name=spec.name,
        tags={"diffscale.role": "sweep", "sweep": spec.name},
    )  # fmt: skip
    if record.get("parent_run_id") is None:
        tracker.log_params({"sweep.name": spec.name, "sweep.cells": len(plan.cells),
                            "sweep.trials": len(plan.trials), "sweep.storage": spec.storage_path,
                            "sweep.train_flops": plan.trial_flops,
                            "sweep.cell_flops": plan.cell_flops})  # fmt: skip
        tracker.log_text(spec.text, "sweep.yaml")
        tracker.log_dict({"overrides": record["overrides"], "saving": plan.saving(),
                          "cells": {c.id: c.values for c in plan.cells}}, "plan.json")  # fmt: skip
    return tracker


def _run(plan: SweepPlan, store: SweepStore, record: dict, *, retry_errored: bool,
         say: Callable[[str], None]) -> SubmitResult:  # fmt: skip
    import ray
    import ray.tune

    spec = plan.spec
    driver = store.read("driver.json") or {}
    if (
        driver.get("state") == "running"
        and driver.get("pid") != os.getpid()
        and _driver_alive(driver)
    ):
        raise SweepError(f"sweep {spec.name!r} is running (pid {driver.get('pid')} on "
                         f"{driver.get('host')}); `diffscale status {spec.name}` to watch it, "
                         f"`diffscale cancel {spec.name}` to stop it")  # fmt: skip
    tracker = _parent_run(plan, record)
    record["parent_run_id"] = tracker.run_id
    record["retry_errored"] = retry_errored
    record["trials"] = {t.name: {"config": t.config.to_dict(), "tags": t.tags(spec.name),
                                 "cells": t.cell_steps, "steps": t.steps, "size": t.size,
                                 "params": t.params} for t in plan.trials}  # fmt: skip
    store.write("sweep.json", record)
    store.delete("cancel")
    _beat(store, "running", started=time.time())
    finished = {t.name for t in plan.trials
                if store.trial_state(t.name).get("status") == "FINISHED"}  # fmt: skip
    say(f"sweep {spec.name}: {plan.saving()}; {len(finished)} of {len(plan.trials)} trials "
        f"already finished")  # fmt: skip
    say(f"storage {store.uri}; MLflow {spec.tracking_uri} (experiment {spec.name!r})")

    if len(finished) == len(plan.trials) and not retry_errored:
        _beat(store, "finished", ended=time.time())
        tracker.close("FINISHED")
        return SubmitResult(plan, store, {t: "FINISHED" for t in finished}, False)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 log_to_driver=False)  # fmt: skip
    tune_fs, tune_root = None, store.uri
    if store.uri.startswith("s3://"):
        tune_fs, tune_root = store.fs, store.root
    tune_path = f"{tune_root}/{TUNE_DIR}"  # with an explicit filesystem: no scheme
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # progress comes from `say`, not Tune
    # The trial driver only waits on its TorchTrainer: it must not hold a CPU that the
    # trial's own workers need (Train V2 schedules them outside the Tune trial).
    trainable = ray.tune.with_resources(_drive_trial, {"CPU": 0, "memory": DRIVER_MEMORY})
    interrupted = False
    try:
        if ray.tune.Tuner.can_restore(tune_path, storage_filesystem=tune_fs):
            say(f"restoring Tune state from {tune_path}")
            tuner = ray.tune.Tuner.restore(tune_path, trainable, resume_unfinished=True,
                                           restart_errored=retry_errored,
                                           storage_filesystem=tune_fs)  # fmt: skip
        else:
            tuner = ray.tune.Tuner(
                trainable,
                # Largest models first: on a full cluster the long trials start early.
                param_space={"trial": ray.tune.grid_search(
                    [t.name for t in sorted(plan.trials, key=lambda t: -t.params)]),
                             "store": store.uri, "endpoint_url": store.endpoint_url},
                tune_config=ray.tune.TuneConfig(max_concurrent_trials=spec.max_concurrent_trials),
                run_config=ray.tune.RunConfig(
                    name=TUNE_DIR, storage_path=tune_root, storage_filesystem=tune_fs,
                    callbacks=[_tune_callback(store, plan, say)], verbose=0,
                    failure_config=ray.tune.FailureConfig(max_failures=0),
                ),
            )  # fmt: skip
        grid = tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
        grid = None
    statuses = {t.name: store.trial_state(t.name).get("status", "PENDING") for t in plan.trials}
    interrupted = interrupted or store.exists("cancel") or (grid is not None and any(
        s in ("RUNNING", "PENDING") for s in statuses.values()))  # fmt: skip
    all_done = all(s == "FINISHED" for s in statuses.values())
    state = "finished" if all_done else ("cancelled" if store.exists("cancel") else
                                         "interrupted" if interrupted else "failed")  # fmt: skip
    _beat(store, state, ended=time.time())
    tracker.close("FINISHED" if all_done else "KILLED" if interrupted else "FAILED")
    return SubmitResult(plan, store, statuses, interrupted)


# --------------------------------------------------------------------------- status, cancel
def status(name: str, *, storage_path: str | None = None, endpoint_url: str | None = None,
           with_mlflow: bool = True) -> dict[str, Any]:  # fmt: skip
    """The sweep's driver state and one row per trial (status, progress, metrics, MLflow run)."""
    store = store_for(name, storage_path, endpoint_url)
    record = stored_record(store)
    driver = store.read("driver.json") or {}
    alive = driver.get("state") == "running" and _driver_alive(driver)
    runs = _mlflow_runs(record["tracking_uri"], record["experiment"]) if with_mlflow else {}
    rows = []
    for trial, info in record.get("trials", {}).items():
        state = store.trial_state(trial)
        st = state.get("status", "PENDING")
        if st == "RUNNING" and not alive:
            st = "INTERRUPTED"
        run = runs.get(trial)
        metrics = dict(state.get("metrics") or {})
        if run is not None:
            metrics.update({k: v for k, v in run.data.metrics.items() if k.startswith("eval/")})
        rows.append({
            "trial": trial, "size": info.get("size"), "status": st,
            "step": state.get("step") or 0, "total": info.get("steps"),
            "cells": len(info.get("cells", {})), "metrics": metrics,
            "mlflow_run": run.info.run_id if run else None,
            "mlflow_status": run.info.status if run else None, "error": state.get("error"),
        })  # fmt: skip
    sweep_state = driver.get("state", "never run")
    if sweep_state == "running" and not alive:
        sweep_state = "interrupted"  # the driver died without saying so
    return {"name": name, "state": sweep_state, "storage": store.uri,
            "tracking_uri": record["tracking_uri"], "parent_run_id": record.get("parent_run_id"),
            "driver": driver, "trials": rows}  # fmt: skip


def _driver_alive(driver: dict) -> bool:
    if driver.get("host") == socket.gethostname() and driver.get("pid"):
        try:
            os.kill(int(driver["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return time.time() - driver.get("heartbeat", 0) < STALE_S * 10
    return time.time() - driver.get("heartbeat", 0) < STALE_S


def _mlflow_runs(tracking_uri: str, experiment: str) -> dict[str, Any]:
    """trial -> its newest MLflow child run."""
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return {}
        query = "tags.`diffscale.role` = 'trial'"
        runs = client.search_runs([exp.experiment_id], query, max_results=5000,
                                  order_by=["attributes.start_time ASC"])  # fmt: skip
        return {r.data.tags.get("trial"): r for r in runs}
    except Exception as error:  # status must still print what storage knows
        log.warning("MLflow at %s unavailable: %s", tracking_uri, error)
        return {}


def cancel(name: str, *, storage_path: str | None = None, endpoint_url: str | None = None,
           wait_s: float = 120.0) -> str:  # fmt: skip
    """Ask the sweep's driver to stop (trials stop; checkpoints stay); wait for it."""
    store = store_for(name, storage_path, endpoint_url)
    stored_record(store)  # a clear error for a sweep that is not there
    driver = store.read("driver.json") or {}
    if driver.get("state") != "running" or not _driver_alive(driver):
        return f"sweep {name!r} is not running ({driver.get('state', 'never run')})"
    store.write("cancel", {"requested": time.time(), "by": socket.gethostname()})
    if driver.get("host") == socket.gethostname():
        try:
            os.kill(int(driver["pid"]), signal.SIGINT)  # the same graceful stop as Ctrl-C
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        driver = store.read("driver.json") or {}
        if driver.get("state") != "running" or not _driver_alive(driver):
            return f"sweep {name!r} stopped ({driver.get('state')}); resume it with " \
                   f"`diffscale resume {name}`"  # fmt: skip
        time.sleep(1.0)
    return f"sweep {name!r}: cancel requested; the driver has not stopped within {wait_s:.0f} s"
