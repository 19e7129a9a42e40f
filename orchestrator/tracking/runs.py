"""Every MLflow lookup the orchestrator makes: the tracking URI, experiments by name, paged
run searches, a trial's unfinished run, a sweep's child runs and its parent run.

The names searched for (tags ``diffscale.role``, ``trial``) come from
:mod:`orchestrator.names`, so the writers (sweep driver, trial) and these readers agree.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Experiment, Run, ViewType

from orchestrator.names import DEFAULT_TRACKING_DB, ROLE_SWEEP, ROLE_TAG, ROLE_TRIAL, TRIAL_TAG

__all__ = [
    "RUN_PAGE_SIZE",
    "client_for",
    "experiment_names",
    "find_experiment",
    "resolve_tracking_uri",
    "search_runs",
    "sweep_parent_run_id",
    "trial_runs",
    "unfinished_run_id",
]

RUN_PAGE_SIZE = 1000  # mlflow.store.tracking.SEARCH_MAX_RESULTS_DEFAULT


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else a SQLite file ``./mlflow.db``
    (absolute path; MLflow 3.x refuses the old ``./mlruns`` file store)."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd().resolve() / DEFAULT_TRACKING_DB}"


def client_for(client_or_uri: MlflowClient | str) -> MlflowClient:
    """A client for a tracking URI, or the client itself."""
    if isinstance(client_or_uri, MlflowClient):
        return client_or_uri
    return MlflowClient(client_or_uri)


def find_experiment(client: MlflowClient, name: str) -> Experiment | None:
    """The experiment called ``name`` (active or deleted), or None."""
    return client.get_experiment_by_name(name)


def experiment_names(client: MlflowClient) -> list[str]:
    """Every active experiment's name, sorted (all pages)."""
    names, token = [], None
    while True:
        page = client.search_experiments(max_results=RUN_PAGE_SIZE, page_token=token)
        names += [e.name for e in page]
        token = page.token
        if not token:
            return sorted(names)


def search_runs(
    client: MlflowClient, experiment_id: str, filter_string: str, page_size: int = RUN_PAGE_SIZE
) -> list[Run]:
    """Every active run of an experiment matching ``filter_string``, oldest first (all
    pages)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=page_size,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs += page
        token = page.token
        if not token:
            return runs


def unfinished_run_id(client_or_uri: MlflowClient | str, experiment: str, trial: str) -> str | None:
    """The newest MLflow run of ``trial`` (tag ``trial``) that did not finish, if any.

    Ray restarts a worker group from scratch when it fails before its first checkpoint is
    committed; that attempt's run is continued rather than orphaned. Steps it already logged
    are not logged again, and on the CPU they replay bit-exactly.
    """
    client = client_for(client_or_uri)
    exp = find_experiment(client, experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.{TRIAL_TAG} = '{trial}'",
        order_by=["attributes.start_time DESC"],
    )
    return next((r.info.run_id for r in runs if r.info.status != "FINISHED"), None)


def trial_runs(
    client_or_uri: MlflowClient | str, experiment: str, *, max_results: int = 5000
) -> dict[str, Run]:
    """trial id -> its newest MLflow child run (tagged ``diffscale.role=trial``) in
    ``experiment``; empty if the experiment does not exist. MLflow errors propagate."""
    client = client_for(client_or_uri)
    exp = find_experiment(client, experiment)
    if exp is None:
        return {}
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'",
        max_results=max_results,
        order_by=["attributes.start_time ASC"],
    )
    return {r.data.tags.get(TRIAL_TAG): r for r in runs}


def sweep_parent_run_id(client: MlflowClient, experiment_id: str, sweep: str) -> str | None:
    """The sweep's parent run (tagged ``diffscale.role=sweep``): the one named after the
    sweep, else the newest if there are several; None if there is none."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{ROLE_TAG}` = '{ROLE_SWEEP}'",
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        return None
    named = [r for r in runs if r.info.run_name == sweep]
    return (named or runs)[0].info.run_id
