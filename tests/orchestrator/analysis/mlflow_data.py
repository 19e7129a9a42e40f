"""Write sweeps in the layout of DESIGN.md ("MLflow layout") straight through MlflowClient."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from orchestrator.names import (
    BUDGET_TAG,
    ROLE_SWEEP,
    ROLE_TAG,
    ROLE_TRIAL,
    SIZE_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
)

BATCH = 1000  # MLflow's most metrics per log_batch


def experiment(client: MlflowClient, name: str, artifacts: str | None = None) -> str:
    """Create experiment ``name`` (artifacts under ``artifacts`` if given); returns its id."""
    return client.create_experiment(name, artifact_location=artifacts)


def log_points(
    client: MlflowClient, run_id: str, metrics: Mapping[str, Mapping[int, float]], ts: int
) -> None:
    """Log ``{key: {step: value}}`` with timestamp ``ts`` (ms), in batches."""
    points = [
        Metric(k, float(v), ts, int(s)) for k, series in metrics.items() for s, v in series.items()
    ]
    for i in range(0, len(points), BATCH):
        client.log_batch(run_id, metrics=points[i : i + BATCH])


def log_run(
    client: MlflowClient,
    exp_id: str,
    name: str,
    *,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, object] | None = None,
    metrics: Mapping[str, Mapping[int, float]] | None = None,
    parent: str | None = None,
    cells: list[dict] | None = None,
    status: str = "FINISHED",
) -> str:
    """One finished run with tags, params and ``{key: {step: value}}`` metrics; its id."""
    all_tags = dict(tags or {})
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    if cells is not None:
        all_tags["cells"] = json.dumps(cells)
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    run_id = run.info.run_id
    plist = [Param(k, str(v)) for k, v in (params or {}).items()]
    for i in range(0, len(plist), 100):
        client.log_batch(run_id, params=plist[i : i + 100])
    log_points(client, run_id, metrics or {}, int(time.time() * 1000))
    client.set_terminated(run_id, status)
    return run_id


def log_parent(client: MlflowClient, exp_id: str, sweep: str) -> str:
    """The sweep's parent run (tag diffscale.role=sweep), left RUNNING like a live sweep."""
    run = client.create_run(exp_id, run_name=sweep, tags={ROLE_TAG: ROLE_SWEEP, SWEEP_TAG: sweep})
    return run.info.run_id


def trial_tags(sweep: str, trial: str, size: str, budget: str) -> dict[str, str]:
    return {
        ROLE_TAG: ROLE_TRIAL,
        SWEEP_TAG: sweep,
        TRIAL_TAG: trial,
        SIZE_TAG: size,
        BUDGET_TAG: budget,
    }
