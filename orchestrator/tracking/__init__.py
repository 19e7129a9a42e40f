"""MLflow: one run per trial logged natively from rank 0 (:mod:`.logger`), and every run
lookup the orchestrator makes (:mod:`.runs`)."""

from orchestrator.tracking.logger import HTTP_DEFAULTS, TERMINAL_STATUSES, RunLogger, TrackingError
from orchestrator.tracking.runs import (
    RUN_PAGE_SIZE,
    client_for,
    experiment_names,
    find_experiment,
    resolve_tracking_uri,
    search_runs,
    sweep_parent_run_id,
    trial_runs,
    unfinished_run_id,
)

__all__ = [
    "HTTP_DEFAULTS",
    "RUN_PAGE_SIZE",
    "TERMINAL_STATUSES",
    "RunLogger",
    "TrackingError",
    "client_for",
    "experiment_names",
    "find_experiment",
    "resolve_tracking_uri",
    "search_runs",
    "sweep_parent_run_id",
    "trial_runs",
    "unfinished_run_id",
]
