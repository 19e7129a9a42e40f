"""The sweep driver: a sweep's trials on Ray Tune.

Each trial of the expanded grid (:mod:`orchestrator.grid`) is one Tune trial of a function
trainable (:func:`_drive_trial`) that builds the trial's ``TorchTrainer`` and calls fit()
(the Train V2 pattern: a Trainer cannot be passed to a Tuner). The Train run is named
after the trial, so a restarted Tune trial continues from the trial's newest checkpoint in
the same MLflow run. MLflow gets one parent run per sweep (the YAML as an artifact) and one
child run per trial (see :mod:`orchestrator.trial`). What the driver keeps in storage is
described in :mod:`orchestrator.sweep.store`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.config import TrialConfig
from orchestrator.grid import SweepPlan
from orchestrator.names import (
    EVAL_PREFIX,
    ROLE_SWEEP,
    ROLE_TAG,
    SWEEP_CANCEL,
    SWEEP_FILE_ARTIFACT,
    SWEEP_PLAN_ARTIFACT,
    SWEEP_RECORD,
    SWEEP_TAG,
    SWEEP_TUNE_DIR,
    TRAIN_LOSS,
)
from orchestrator.sweep.store import (
    HEARTBEAT_S,
    SweepError,
    SweepStore,
    driver_alive,
)

log = logging.getLogger(__name__)

__all__ = [
    "DRIVER_MEMORY",
    "TUNE_LOGGER",
    "SubmitResult",
    "TuneResumeHintFilter",
    "progress_line",
    "run_sweep",
]

DRIVER_MEMORY = 64 * 2**20  # bytes reserved per Tune trial driver (a placeholder resource)
TUNE_LOGGER = "ray.tune.tune"  # logs "Resume experiment with: Tuner.restore(...)" on Ctrl-C


class TuneResumeHintFilter(logging.Filter):
    """Drops Tune's own resume hint (``Tuner.restore(path=..., trainable=...)``, logged by
    ``ray.tune.tune`` when a run is interrupted): a sweep continues with ``diffscale resume
    NAME``, which the command prints instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


_RESUME_HINT_FILTER = TuneResumeHintFilter()


# --------------------------------------------------------------------------- trainable
def _drive_trial(config: dict) -> None:
    """Tune function trainable: run one trial's TorchTrainer unless it already finished.

    (Its name identifies the trainable in stored Tune state: ``Tuner.restore`` of a sweep
    needs the same one.)
    """
    import ray.train
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.trial import run_trial

    store = SweepStore(config["store"], config.get("endpoint_url"))
    record = store.read(SWEEP_RECORD) or {}
    trial = record["trials"][config["trial"]]
    cfg = TrialConfig.from_dict(trial["config"], source=f"{store.uri}/{SWEEP_RECORD}")
    done = store.trial_state(cfg.name)
    if done.get("status") == "FINISHED":
        log.info("trial %s already finished: not trained again", cfg.name)
        ray.tune.report({**done.get("metrics", {}), "already_finished": 1.0})
        return
    if done.get("status") == "ERROR" and not record.get("retry_errored"):
        # Tune may hand an errored trial back after a restore: it stays errored unless asked.
        error = (done.get("error") or "").strip()[-500:]
        raise RuntimeError(
            f"trial {cfg.name} failed before and is not retried without --retry-errored: {error}"
        )
    store.update_trial(cfg.name, status="RUNNING", started=time.time(), error=None)
    try:
        result = run_trial(
            cfg,
            tags=trial["tags"],
            parent_run_id=record.get("parent_run_id"),
            callbacks=[TuneReportCallback()],
        )
    except ray.train.TrainingFailedError as error:
        store.update_trial(cfg.name, status="ERROR", error=str(error)[-2000:], ended=time.time())
        raise
    metrics = {
        k: float(v)
        for k, v in (result.metrics or {}).items()
        if isinstance(v, (int, float)) and ("/" in k or k == "step")
    }
    step = int(metrics.get("step", 0))
    store.update_trial(
        cfg.name,
        status="FINISHED",
        metrics=metrics,
        metrics_step=step,  # the last report is the final eval point
        ended=time.time(),
        step=step,
    )


def progress_line(trial: str, step: int, total: int, result: dict) -> str:
    """One progress line per checkpoint report: the step, then the eval point's metrics
    (NLL, FD, precision/recall) or, between eval points, the training loss."""
    evals = [
        f"{k.split('/')[-1]} {v:.4g}"
        for k, v in result.items()
        if str(k).startswith(EVAL_PREFIX) and "stderr" not in k and isinstance(v, (int, float))
    ]
    if evals:
        return f"{trial}: step {step}/{total}  eval: " + "  ".join(evals) + "  (checkpoint saved)"
    loss = result.get(TRAIN_LOSS)
    shown = f"  train loss {loss:.4g}" if isinstance(loss, (int, float)) else ""
    return f"{trial}: step {step}/{total}  checkpoint saved{shown}"


def _tune_callback(store: SweepStore, plan: SweepPlan, say: Callable[[str], None]) -> Any:
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
            store.beat("running")
            if store.exists(SWEEP_CANCEL):
                say("cancel requested: stopping trials (checkpoints are kept)")
                signal.raise_signal(signal.SIGINT)  # Tune's graceful stop; state is saved

        def on_trial_result(self, iteration, trials, trial, result, **info):
            name = trial.config.get("trial")
            if name not in totals or result.get("already_finished"):
                return
            step = int(result.get("step", 0))
            evals = {
                k: float(v)
                for k, v in result.items()
                if str(k).startswith(EVAL_PREFIX) and isinstance(v, (int, float))
            }
            fields: dict[str, Any] = {"step": step, "total": totals[name]}
            if evals:  # the latest eval point: its metrics and their step, together
                fields.update(metrics=evals, metrics_step=step)
            store.update_trial(name, **fields)
            say(progress_line(name, step, totals[name], result))

        def on_trial_complete(self, iteration, trials, trial, **info):
            say(f"{trial.config.get('trial')}: finished")

        def on_trial_error(self, iteration, trials, trial, **info):
            say(f"{trial.config.get('trial')}: ERROR (see `diffscale status {plan.spec.name}`)")

    return _Progress()


# --------------------------------------------------------------------------- the Tune run
@dataclass(frozen=True)
class SubmitResult:
    plan: SweepPlan
    store: SweepStore
    statuses: dict[str, str]  # trial -> FINISHED / ERROR / INTERRUPTED
    interrupted: bool


def _parent_run(plan: SweepPlan, record: dict) -> Any:
    """The sweep's MLflow parent run (a ``RunLogger``): created with its params and the
    sweep file on the first run, continued after."""
    from orchestrator.tracking import RunLogger

    spec = plan.spec
    tracker = RunLogger(
        spec.tracking_uri,
        spec.experiment,
        run_id=record.get("parent_run_id"),
        run_name=spec.name,
        tags={ROLE_TAG: ROLE_SWEEP, SWEEP_TAG: spec.name},
    )
    if record.get("parent_run_id") is None:
        params = {
            "sweep.name": spec.name,
            "sweep.cells": len(plan.cells),
            "sweep.trials": len(plan.trials),
            "sweep.storage": spec.storage_path,
            "sweep.train_flops": plan.trial_flops,
            "sweep.cell_flops": plan.cell_flops,
        }
        tracker.log_params(params)
        tracker.log_text(spec.text, SWEEP_FILE_ARTIFACT)
        tracker.log_dict(
            {
                "overrides": record["overrides"],
                "saving": plan.saving(),
                "cells": {c.id: c.values for c in plan.cells},
            },
            SWEEP_PLAN_ARTIFACT,
        )
    return tracker


def _trial_records(plan: SweepPlan) -> dict[str, dict[str, Any]]:
    """What sweep.json keeps per trial: its config, tags, cells and size."""
    return {
        t.name: {
            "config": t.config.to_dict(),
            "tags": t.tags(plan.spec.name),
            "cells": t.cell_steps,
            "steps": t.steps,
            "size": t.size,
            "params": t.params,
        }
        for t in plan.trials
    }


def _keep_secrets_off_the_trial_actors() -> None:
    """Ray Tune copies AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SECURITY_TOKEN and
    AWS_SESSION_TOKEN from the driver's environment into every trial actor's runtime env
    (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``), where each node's
    ``runtime_env_agent.log`` and the dashboard show them. The project's rule is that
    secrets never travel (:mod:`orchestrator.trial.env`): each process keeps the credentials
    of the node it runs on (its raylet's environment, an instance role, a credentials file),
    so those names are taken out of Tune's set for this process."""
    from ray.tune.execution import class_cache

    from orchestrator.trial.env import is_secret

    dropped = {name for name in class_cache.ENV_VARS_TO_PROPAGATE if is_secret(name)}
    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(dropped)
    if dropped:
        log.debug("not copying %s into Tune's trial actors", sorted(dropped))


def _make_tuner(
    plan: SweepPlan, store: SweepStore, *, retry_errored: bool, say: Callable[[str], None]
) -> Any:
    """A new Tuner over the plan's trials, or the stored one restored."""
    import ray.tune

    _keep_secrets_off_the_trial_actors()
    tune_fs, tune_root = None, store.uri
    if store.uri.startswith("s3://"):
        tune_fs, tune_root = store.fs, store.root
    tune_path = f"{tune_root}/{SWEEP_TUNE_DIR}"  # with an explicit filesystem: no scheme
    # The trial driver only waits on its TorchTrainer: it must not hold a CPU that the
    # trial's own workers need (Train V2 schedules them outside the Tune trial).
    trainable = ray.tune.with_resources(_drive_trial, {"CPU": 0, "memory": DRIVER_MEMORY})
    if ray.tune.Tuner.can_restore(tune_path, storage_filesystem=tune_fs):
        say(f"restoring Tune state from {tune_path}")
        return ray.tune.Tuner.restore(
            tune_path,
            trainable,
            resume_unfinished=True,
            restart_errored=retry_errored,
            storage_filesystem=tune_fs,
        )
    # Largest models first: on a full cluster the long trials start early.
    names = [t.name for t in sorted(plan.trials, key=lambda t: -t.params)]
    return ray.tune.Tuner(
        trainable,
        param_space={
            "trial": ray.tune.grid_search(names),
            "store": store.uri,
            "endpoint_url": store.endpoint_url,
        },
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=plan.spec.max_concurrent_trials),
        run_config=ray.tune.RunConfig(
            name=SWEEP_TUNE_DIR,
            storage_path=tune_root,
            storage_filesystem=tune_fs,
            callbacks=[_tune_callback(store, plan, say)],
            verbose=0,
            failure_config=ray.tune.FailureConfig(max_failures=0),
        ),
    )


def run_sweep(
    plan: SweepPlan,
    store: SweepStore,
    record: dict,
    *,
    retry_errored: bool,
    say: Callable[[str], None],
) -> SubmitResult:
    """Run the plan's trials on Ray Tune (restoring its stored state, if any) until they end
    or the sweep is interrupted; ``record`` is the sweep.json to keep in ``store``."""
    import ray

    spec = plan.spec
    driver = store.driver()
    if (
        driver.get("state") == "running"
        and driver.get("pid") != os.getpid()
        and driver_alive(driver)
    ):
        raise SweepError(
            f"sweep {spec.name!r} is running (pid {driver.get('pid')} on {driver.get('host')}); "
            f"`diffscale status {spec.name}` to watch it, `diffscale cancel {spec.name}` to "
            "stop it"
        )
    tracker = _parent_run(plan, record)
    record["parent_run_id"] = tracker.run_id
    record["retry_errored"] = retry_errored
    record["trials"] = _trial_records(plan)
    store.write(SWEEP_RECORD, record)
    store.delete(SWEEP_CANCEL)
    store.beat("running", started=time.time())
    finished = {
        t.name for t in plan.trials if store.trial_state(t.name).get("status") == "FINISHED"
    }
    say(
        f"sweep {spec.name}: {plan.saving()}; {len(finished)} of {len(plan.trials)} trials "
        f"already finished"
    )
    say(f"storage {store.uri}; MLflow {spec.tracking_uri} (experiment {spec.name!r})")

    if len(finished) == len(plan.trials) and not retry_errored:
        store.beat("finished", ended=time.time())
        tracker.close("FINISHED")
        return SubmitResult(plan, store, {t: "FINISHED" for t in finished}, False)
    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or "local",
            include_dashboard=False,
            log_to_driver=False,
        )
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # progress comes from `say`, not Tune
    interrupted = False
    try:
        logging.getLogger(TUNE_LOGGER).addFilter(_RESUME_HINT_FILTER)  # once: same object
        grid = _make_tuner(plan, store, retry_errored=retry_errored, say=say).fit()
    except KeyboardInterrupt:
        interrupted = True
        grid = None
    statuses = {t.name: store.trial_state(t.name).get("status", "PENDING") for t in plan.trials}
    cancelled = store.exists(SWEEP_CANCEL)
    unfinished = grid is not None and any(s in ("RUNNING", "PENDING") for s in statuses.values())
    interrupted = interrupted or cancelled or unfinished
    all_done = all(s == "FINISHED" for s in statuses.values())
    if all_done:
        state = "finished"
    elif cancelled:
        state = "cancelled"
    else:
        state = "interrupted" if interrupted else "failed"
    store.beat(state, ended=time.time())
    tracker.close("FINISHED" if all_done else "KILLED" if interrupted else "FAILED")
    return SubmitResult(plan, store, statuses, interrupted)
