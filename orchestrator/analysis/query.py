"""MLflow experiment -> pyarrow Table: one row per (run, step), every metric joined on step.

The sweep driver writes one experiment per sweep (DESIGN.md, "MLflow layout"): a parent run
tagged ``diffscale.role=sweep`` and one child run per trial whose metrics are logged with
``step`` = optimizer step. :func:`load_runs` pages through the run search and through each
metric's full history (``MlflowClient.get_metric_history`` requests pages of 25,000 points
until the store's page token runs out, for SQLite and for an ``mlflow server`` alike) and
joins the metrics of a run on step. :func:`cell_rows` then reads one row per grid cell.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from mlflow import MlflowClient
from mlflow.entities import Run

from orchestrator.names import (
    BUDGET_TAG,
    CELLS_TAG,
    COMPUTE_FLOPS,
    COMPUTE_IMAGES,
    MLFLOW_TAG_PREFIX,
    PARENT_RUN_TAG,
    ROLE_SWEEP,
    ROLE_TAG,
    SIZE_TAG,
    TRIAL_TAG,
)
from orchestrator.tracking import (
    RUN_PAGE_SIZE,
    experiment_names,
    find_experiment,
    resolve_tracking_uri,
    search_runs,
)

log = logging.getLogger(__name__)

__all__ = [
    "BASE_COLUMNS",
    "QueryError",
    "cell_rows",
    "experiment_id",
    "load_runs",
    "metric_columns",
    "to_csv",
    "to_parquet",
]

BASE_COLUMNS = ("run_id", "run_name", "status", "parent_run_id")
_RUN_COLUMNS = (*BASE_COLUMNS, "step")


class QueryError(ValueError):
    """The experiment, a run's tags or a requested column cannot be read as asked."""


def _quote_key(key: str) -> str | None:
    """``key`` in MLflow's search syntax (backticks allow dots), or None if it cannot be."""
    return None if "`" in key else f"`{key}`"


def _filter_string(params: Mapping[str, str], tags: Mapping[str, str]) -> str:
    """The server-side part of the filters; the rest is applied to the runs in Python."""
    clauses = []
    for kind, items in (("params", params), ("tags", tags)):
        for key, value in items.items():
            quoted = _quote_key(key)
            if quoted is not None and "'" not in value and "\\" not in value:
                clauses.append(f"{kind}.{quoted} = '{value}'")
    return " and ".join(clauses)


def _matches(run: Run, params: Mapping[str, str], tags: Mapping[str, str]) -> bool:
    return all(run.data.params.get(k) == v for k, v in params.items()) and all(
        run.data.tags.get(k) == v for k, v in tags.items()
    )


def experiment_id(client: MlflowClient, experiment: str) -> str:
    """The id of an active experiment; QueryError listing the existing names otherwise."""
    exp = find_experiment(client, experiment)
    if exp is not None and exp.lifecycle_stage != "deleted":
        return exp.experiment_id
    listing = ", ".join(repr(n) for n in experiment_names(client)) or "none"
    state = "is deleted" if exp is not None else "does not exist"
    raise QueryError(
        f"MLflow experiment {experiment!r} {state} at {client.tracking_uri}; "
        f"existing experiments: {listing}"
    )


def _history(client: MlflowClient, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps ``[S]`` (int64, sorted) and values ``[S]`` (float64) of one metric; a step logged
    more than once keeps the value with the latest timestamp (later in the listing on ties)."""
    latest: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):  # all pages
        seen = latest.get(m.step)
        if seen is None or m.timestamp >= seen[0]:
            latest[m.step] = (m.timestamp, m.value)
    steps = np.array(sorted(latest), dtype=np.int64)
    values = np.array([latest[s][1] for s in steps.tolist()], dtype=np.float64)
    return steps, values


def _metric_keys(runs: list[Run], metrics: Sequence[str] | None) -> list[str]:
    """Plain names are always columns; glob patterns (``sampling/*``) pick logged keys."""
    logged = {k for r in runs for k in r.data.metrics}
    if metrics is None:
        return sorted(logged)
    patterns = [m for m in metrics if any(ch in m for ch in "*?[")]
    chosen = {m for m in metrics if m not in patterns}
    chosen |= {k for k in logged if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    return sorted(chosen)


def load_runs(
    experiment: str,
    *,
    tracking_uri: str | None = None,
    params: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
    include_parent: bool = False,
    metrics: Sequence[str] | None = None,
    page_size: int = RUN_PAGE_SIZE,
) -> pa.Table:
    """Read the active runs of an MLflow experiment into one row per (run, step).

    Args:
        experiment: experiment name (the sweep name).
        tracking_uri: see :func:`orchestrator.tracking.resolve_tracking_uri`.
        params, tags: keep runs whose params / tags equal these strings.
        include_parent: also the sweep's parent run (tag ``diffscale.role=sweep``).
        metrics: read only these metric keys (columns present even if never logged) and
            the logged keys matching any glob pattern among them (``"eval/*"``); default
            every key a run logged. Rows are the steps where a selected metric was logged.
        page_size: runs per search request.

    Returns:
        Columns ``run_id, run_name, status, parent_run_id``, ``tags.<k>`` (user tags; MLflow's
        own ``mlflow.*`` tags are left out), ``params.<k>`` (strings, null where a run lacks
        them), ``step`` (int64) and one float64 column per metric, null where the metric was
        not logged at that step. Rows are sorted by run start time, then step; a run with no
        metric at all gives one row with a null step.

    Raises:
        QueryError: the experiment does not exist (the message lists the existing ones).
    """
    params, tags = dict(params or {}), dict(tags or {})
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    exp_id = experiment_id(client, experiment)
    runs = [
        run
        for run in search_runs(client, exp_id, _filter_string(params, tags), page_size)
        if _matches(run, params, tags)
        and (include_parent or run.data.tags.get(ROLE_TAG) != ROLE_SWEEP)
    ]
    log.info("experiment %r at %s: %d runs", experiment, uri, len(runs))
    tag_keys = sorted({k for r in runs for k in r.data.tags if not k.startswith(MLFLOW_TAG_PREFIX)})
    param_keys = sorted({k for r in runs for k in r.data.params})
    metric_keys = _metric_keys(runs, metrics)
    strings: dict[str, list[str | None]] = {
        name: [] for name in (*BASE_COLUMNS, *(f"tags.{k}" for k in tag_keys))
    }
    strings.update({f"params.{k}": [] for k in param_keys})
    steps: list[np.ndarray] = []
    no_step: list[np.ndarray] = []  # True for the one row of a run without metrics
    values: dict[str, list[np.ndarray]] = {k: [] for k in metric_keys}
    masks: dict[str, list[np.ndarray]] = {k: [] for k in metric_keys}
    for run in runs:
        histories = {
            k: _history(client, run.info.run_id, k) for k in metric_keys if k in run.data.metrics
        }
        run_steps = np.unique(np.concatenate([s for s, _ in histories.values()] or [[]]))
        run_steps = run_steps.astype(np.int64)
        n = max(len(run_steps), 1)
        steps.append(run_steps if len(run_steps) else np.zeros(1, dtype=np.int64))
        no_step.append(np.full(n, not len(run_steps)))
        for key in metric_keys:
            vals, mask = np.full(n, np.nan), np.ones(n, dtype=bool)  # mask: True = null
            if key in histories and len(run_steps):
                s, v = histories[key]
                idx = np.searchsorted(run_steps, s)
                vals[idx], mask[idx] = v, False
            values[key].append(vals)
            masks[key].append(mask)
        row = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "parent_run_id": run.data.tags.get(PARENT_RUN_TAG),
            **{f"tags.{k}": run.data.tags.get(k) for k in tag_keys},
            **{f"params.{k}": run.data.params.get(k) for k in param_keys},
        }
        for name, column in strings.items():
            column.extend([row[name]] * n)
    columns: dict[str, pa.Array] = {
        name: pa.array(col, type=pa.string()) for name, col in strings.items()
    }
    all_steps = np.concatenate(steps) if steps else np.zeros(0, dtype=np.int64)
    null_steps = np.concatenate(no_step) if no_step else np.zeros(0, dtype=bool)
    columns["step"] = pa.array(all_steps, type=pa.int64(), mask=null_steps)
    for key in metric_keys:
        vals = np.concatenate(values[key]) if runs else np.zeros(0)
        mask = np.concatenate(masks[key]) if runs else np.zeros(0, dtype=bool)
        columns[key] = pa.array(vals, type=pa.float64(), mask=mask)
    return pa.table(columns)


def metric_columns(table: pa.Table) -> list[str]:
    """The metric columns of a :func:`load_runs` table (float columns other than the keys)."""
    return [
        f.name
        for f in table.schema
        if pa.types.is_floating(f.type) and not f.name.startswith(("params.", "tags."))
    ]


def _last_at_or_before(
    steps: np.ndarray, values: np.ndarray, valid: np.ndarray, step: int
) -> tuple[float | None, int | None]:
    """The last valid value at a step <= ``step`` (steps ``[S]`` sorted), and its step."""
    s, v = steps[valid], values[valid]
    i = int(np.searchsorted(s, step, side="right")) - 1
    return (None, None) if i < 0 else (float(v[i]), int(s[i]))


def _cells_of(run_id: str, raw: str | None, final_step: int | None) -> list[dict[str, Any]]:
    """The grid cells a run serves, from its ``cells`` tag, else one cell at its final step."""
    if raw is None:
        return [{"cell": None, "budget": None, "step": final_step}]
    try:
        cells = json.loads(raw)
        out = [
            {"cell": c.get("cell"), "budget": c.get("budget"), "step": int(c["step"])}
            for c in cells
        ]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise QueryError(
            f"run {run_id}: tag 'cells' must be a JSON list of objects with 'cell', 'budget' "
            f"and an integer 'step', got {raw[:200]!r} ({exc})"
        ) from exc
    return out


def cell_rows(
    table: pa.Table, metrics: Sequence[str] | None = None, *, with_steps: bool = False
) -> pa.Table:
    """One row per grid cell: each run's ``tags.cells`` entries (a run without that tag gives
    one row at its final step), with each metric's last value logged at or before the cell's
    step (null if none).

    Args:
        table: a :func:`load_runs` table.
        metrics: metric columns to read (``compute/flops`` and ``compute/images`` are always
            added when present); default all of them.
        with_steps: also a column ``<metric>@step`` (int64) giving the step each value was
            logged at, to tell a value of the cell's own step from an older one.

    Returns:
        The run's string columns (``run_id`` ... ``tags.*``, ``params.*``), ``trial`` and
        ``size`` (from the tags), the cell's ``cell``, ``budget`` and ``step``, then the metrics.
    """
    available = metric_columns(table)
    wanted = list(metrics) if metrics is not None else available
    missing = [m for m in wanted if m not in table.column_names]
    if missing:
        raise QueryError(
            f"metric column(s) {', '.join(map(repr, missing))} not in the table; "
            f"available: {', '.join(available) or 'none'}"
        )
    for extra in (COMPUTE_FLOPS, COMPUTE_IMAGES):
        if extra in available and extra not in wanted:
            wanted.append(extra)
    string_cols = [f.name for f in table.schema if pa.types.is_string(f.type)]
    out: dict[str, list[Any]] = {name: [] for name in (*string_cols, "trial", "size", "cell")}
    out.update({"budget": [], "step": []})
    out.update({m: [] for m in wanted})
    if with_steps:
        out.update({f"{m}@step": [] for m in wanted})
    run_ids = table.column("run_id").to_pylist()
    order = list(dict.fromkeys(run_ids))  # first appearance
    for run_id in order:
        sub = table.filter(pc.equal(table.column("run_id"), run_id))
        sub = sub.sort_by([("step", "ascending")])
        step_col = sub.column("step")
        steps = step_col.fill_null(0).to_numpy().astype(np.int64)
        has_step = step_col.is_valid().to_numpy()
        first = {name: sub.column(name)[0].as_py() for name in string_cols}
        final = int(steps[has_step][-1]) if has_step.any() else None
        series = {
            m: (sub.column(m).fill_null(np.nan).to_numpy(), sub.column(m).is_valid().to_numpy())
            for m in wanted
        }
        for cell in _cells_of(run_id, first.get(f"tags.{CELLS_TAG}"), final):
            for name in string_cols:
                out[name].append(first[name])
            out["trial"].append(first.get(f"tags.{TRIAL_TAG}"))
            out["size"].append(first.get(f"tags.{SIZE_TAG}"))
            out["cell"].append(cell["cell"])
            out["budget"].append(cell["budget"] or first.get(f"tags.{BUDGET_TAG}"))
            out["step"].append(cell["step"])
            for m, (vals, valid) in series.items():
                if cell["step"] is None:
                    value, at = None, None
                else:
                    value, at = _last_at_or_before(steps, vals, valid & has_step, cell["step"])
                out[m].append(value)
                if with_steps:
                    out[f"{m}@step"].append(at)
    types = {m: pa.float64() for m in wanted}
    types.update({"step": pa.int64(), **{f"{m}@step": pa.int64() for m in wanted}})
    return pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in out.items()})


def to_parquet(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` as Parquet (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def to_csv(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` as CSV with a header (nulls as empty fields); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(table, path)
    return path
