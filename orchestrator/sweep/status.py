"""What a sweep is doing, and how to stop it: ``diffscale status`` and ``diffscale cancel``.

Both read the sweep's folder in storage (:mod:`orchestrator.sweep.store`): a few small JSON
files. Status asks MLflow for each trial's newest run only when asked to (``with_mlflow``,
``diffscale status --mlflow``): importing MLflow and opening its store takes seconds, and the
runs are named after the trials anyway.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import Any

from orchestrator.names import EVAL_PREFIX, SWEEP_CANCEL
from orchestrator.sweep.store import driver_alive, store_for, stored_record

log = logging.getLogger(__name__)

__all__ = ["cancel", "status"]


def status(
    name: str,
    *,
    storage_path: str | None = None,
    endpoint_url: str | None = None,
    with_mlflow: bool = False,
) -> dict[str, Any]:
    """The sweep's driver state and one row per trial: status, progress (``step`` of
    ``total``), the latest eval point's ``metrics`` with their ``metrics_step``, and with
    ``with_mlflow`` the trial's MLflow run (else ``mlflow_run`` is None)."""
    store = store_for(name, storage_path, endpoint_url)
    record = stored_record(store)
    driver = store.driver()
    alive = driver.get("state") == "running" and driver_alive(driver)
    runs = _mlflow_runs(record["tracking_uri"], record["experiment"]) if with_mlflow else {}
    rows = []
    for trial, info in record.get("trials", {}).items():
        state = store.trial_state(trial)
        st = state.get("status", "PENDING")
        if st == "RUNNING" and not alive:
            st = "INTERRUPTED"
        run = runs.get(trial)
        # The metrics of one eval point and that point's step, from the same report: never
        # mixed with newer values from MLflow (the row would pair a step with another's).
        metrics = {
            k: v for k, v in (state.get("metrics") or {}).items() if k.startswith(EVAL_PREFIX)
        }
        rows.append(
            {
                "trial": trial,
                "size": info.get("size"),
                "status": st,
                "step": state.get("step") or 0,
                "total": info.get("steps"),
                "cells": len(info.get("cells", {})),
                "metrics": metrics,
                "metrics_step": state.get("metrics_step") if metrics else None,
                "mlflow_run": run.info.run_id if run else None,
                "mlflow_status": run.info.status if run else None,
                "error": state.get("error"),
            }
        )
    sweep_state = driver.get("state", "never run")
    if sweep_state == "running" and not alive:
        sweep_state = "interrupted"  # the driver died without saying so
    return {
        "name": name,
        "state": sweep_state,
        "storage": store.uri,
        "tracking_uri": record["tracking_uri"],
        "experiment": record["experiment"],
        "mlflow": with_mlflow,
        "parent_run_id": record.get("parent_run_id"),
        "driver": driver,
        "trials": rows,
    }


def _mlflow_runs(tracking_uri: str, experiment: str) -> dict[str, Any]:
    """trial -> its newest MLflow child run; empty when MLflow does not answer."""
    try:
        from orchestrator.tracking import trial_runs

        return trial_runs(tracking_uri, experiment)
    except Exception as error:  # status must still print what storage knows
        log.warning("MLflow at %s unavailable: %s", tracking_uri, error)
        return {}


def cancel(
    name: str,
    *,
    storage_path: str | None = None,
    endpoint_url: str | None = None,
    wait_s: float = 120.0,
) -> str:
    """Ask the sweep's driver to stop (trials stop; checkpoints stay); wait for it."""
    store = store_for(name, storage_path, endpoint_url)
    stored_record(store)  # a clear error for a sweep that is not there
    driver = store.driver()
    if driver.get("state") != "running" or not driver_alive(driver):
        return f"sweep {name!r} is not running ({driver.get('state', 'never run')})"
    store.write(SWEEP_CANCEL, {"requested": time.time(), "by": socket.gethostname()})
    if driver.get("host") == socket.gethostname():
        try:
            os.kill(int(driver["pid"]), signal.SIGINT)  # the same graceful stop as Ctrl-C
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        driver = store.driver()
        if driver.get("state") != "running" or not driver_alive(driver):
            return (
                f"sweep {name!r} stopped ({driver.get('state')}); resume it with "
                f"`diffscale resume {name}`"
            )
        time.sleep(1.0)
    return f"sweep {name!r}: cancel requested; the driver has not stopped within {wait_s:.0f} s"
