"""Sweeps on Ray Tune: the state kept in storage (:mod:`.store`), prepare/submit/resume
(:mod:`.submit`), the Tune driver (:mod:`.driver`), status/cancel (:mod:`.status`) and the
``diffscale`` sweep commands (:mod:`.commands`).

The names below are imported on first use, so that importing :mod:`.commands` (the CLI's
parsers) loads no configs, Ray or storage. ``status`` and ``cancel`` are imported from
:mod:`.status` itself (a lazy package attribute ``status`` would clash with that module).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.sweep.driver import DRIVER_MEMORY, SubmitResult, run_sweep
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

# each name -> the submodule that defines it
_WHERE = {
    **dict.fromkeys(("DRIVER_MEMORY", "SubmitResult", "run_sweep"), "driver"),
    **dict.fromkeys(
        (
            "DEFAULT_STORAGE",
            "HEARTBEAT_S",
            "STALE_S",
            "SweepError",
            "SweepStore",
            "driver_alive",
            "store_for",
            "stored_record",
        ),
        "store",
    ),
    **dict.fromkeys(("Prepared", "capacity_problems", "prepare", "resume", "submit"), "submit"),
}

__all__ = [
    "DEFAULT_STORAGE",
    "DRIVER_MEMORY",
    "HEARTBEAT_S",
    "STALE_S",
    "Prepared",
    "SubmitResult",
    "SweepError",
    "SweepStore",
    "capacity_problems",
    "driver_alive",
    "prepare",
    "resume",
    "run_sweep",
    "store_for",
    "stored_record",
    "submit",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
