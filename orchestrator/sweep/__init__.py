"""Sweeps on Ray Tune: the state kept in storage (:mod:`.store`), prepare/submit/resume
(:mod:`.submit`), the Tune driver (:mod:`.driver`), status/cancel (:mod:`.status`) and the
``diffscale`` sweep commands (:mod:`.commands`)."""

from orchestrator.sweep.driver import DRIVER_MEMORY, SubmitResult, run_sweep
from orchestrator.sweep.status import cancel, status
from orchestrator.sweep.store import (
    DEFAULT_STORAGE,
    HEARTBEAT_S,
    STALE_S,
    SweepError,
    SweepStore,
    driver_alive,
    store_for,
    stored_record,
)
from orchestrator.sweep.submit import Prepared, capacity_problems, prepare, resume, submit

__all__ = [
    "DEFAULT_STORAGE",
    "DRIVER_MEMORY",
    "HEARTBEAT_S",
    "STALE_S",
    "Prepared",
    "SubmitResult",
    "SweepError",
    "SweepStore",
    "cancel",
    "capacity_problems",
    "driver_alive",
    "prepare",
    "resume",
    "run_sweep",
    "status",
    "store_for",
    "stored_record",
    "submit",
]
