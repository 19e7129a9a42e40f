"""``diffscale submit``, ``resume``, ``status`` and ``cancel``: the sweep commands.

Exit codes: 0 ok, 2 bad input (the message names the file, key and what is allowed), 1 a
trial failed, 130 interrupted or cancelled (``diffscale resume`` continues it).

Only argparse, tabulate and names are imported here: the handlers import the configs
(torch), Ray, MLflow and storage (pyarrow) they need, so ``diffscale status`` reads a few
small files without loading them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from tabulate import tabulate

from orchestrator.names import EVAL_FD_KEYS, EVAL_NLL

if TYPE_CHECKING:
    from orchestrator.sweep.driver import SubmitResult

__all__ = ["MLFLOW_HEADER", "STATUS_HEADERS", "add_parsers", "print_status"]

STATUS_HEADERS = ["trial", "size", "status", "step", "cells", "eval at step", "NLL bpd", "FD"]
MLFLOW_HEADER = "MLflow run"  # a last column when the report read MLflow (--mlflow)


def print_status(report: dict) -> None:
    """The table of ``diffscale status``: one row per trial, then the errors."""
    rows = []
    with_mlflow = report.get("mlflow", False)
    for r in report["trials"]:
        m = r["metrics"]
        fd = next((k for k in EVAL_FD_KEYS if k in m), None)
        rows.append(
            [
                r["trial"],
                r["size"],
                r["status"],
                f"{r['step']}/{r['total']}",
                r["cells"],
                r.get("metrics_step") or "-",  # the step the NLL and FD were measured at
                f"{m[EVAL_NLL]:.4f}" if EVAL_NLL in m else "-",
                f"{m[fd]:.4g}" if fd else "-",
                *([(r["mlflow_run"] or "-")[:12]] if with_mlflow else []),
            ]
        )
    print(f"sweep {report['name']}: {report['state']}  (storage {report['storage']})")
    runs = "" if with_mlflow else "; a run per trial, named after it (--mlflow: their ids)"
    print(f"MLflow: {report['tracking_uri']} (experiment {report['experiment']!r}){runs}")
    print(tabulate(rows, headers=[*STATUS_HEADERS, *([MLFLOW_HEADER] if with_mlflow else [])]))
    for r in report["trials"]:
        if r["status"] == "ERROR" and r["error"]:
            print(f"\n{r['trial']} failed:\n  " + r["error"].strip().splitlines()[-1][:400])


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.config import ConfigError, dataset_problems
    from orchestrator.grid import trial_table
    from orchestrator.sweep.status import status
    from orchestrator.sweep.store import SweepError
    from orchestrator.sweep.submit import capacity_problems, prepare, submit

    try:
        prepared = prepare(args.sweep, args.set, check_data=False)
    except (ConfigError, SweepError) as e:
        print(f"diffscale submit: error: {e}", file=sys.stderr)
        return 2
    spec, plan, store = prepared.spec, prepared.plan, prepared.store
    data_error = ConfigError(dataset_problems(c.config for c in plan.cells), spec.source)
    capacity = ConfigError(capacity_problems(plan), spec.source)
    if not args.dry_run and (data_error.problems or capacity.problems):
        error = data_error if data_error.problems else capacity
        print(f"diffscale submit: error: {error}", file=sys.stderr)
        return 2
    if args.dry_run or not args.quiet:
        print(
            f"sweep {spec.name}: {len(plan.cells)} cells, {len(plan.trials)} trials, at most "
            f"{spec.max_concurrent_trials} at once"
        )
        print(tabulate(*trial_table(plan)))
        print(plan.saving())
        print(plan.totals())
        print(f"storage: {store.uri}")
        print(f"MLflow:  {spec.tracking_uri} (experiment {spec.experiment!r})")
    if args.dry_run:
        if prepared.record is not None:
            print(f"(already submitted: `diffscale status {spec.name}`)")
        if capacity.problems:  # a cluster may have what this machine lacks
            print(f"note: without RAY_ADDRESS this machine cannot run it:\n{capacity}")
        if data_error.problems:
            print(f"diffscale submit: error: {data_error}", file=sys.stderr)
            return 2
        return 0
    try:
        result = submit(prepared, retry_errored=args.retry_errored, say=_say)
    except (ConfigError, SweepError) as e:
        print(f"diffscale submit: error: {e}", file=sys.stderr)
        return 2
    root = spec.storage_path.rsplit("/", 1)[0]
    print_status(status(spec.name, storage_path=root, endpoint_url=store.endpoint_url))
    return _exit_code(result)


def _exit_code(result: SubmitResult) -> int:
    if result.interrupted:
        print(f"interrupted: `diffscale resume {result.plan.spec.name}` continues it")
        return 130
    return 0 if all(s == "FINISHED" for s in result.statuses.values()) else 1


def _cmd_resume(args: argparse.Namespace) -> int:
    from orchestrator.config import ConfigError
    from orchestrator.sweep.status import status
    from orchestrator.sweep.store import SweepError
    from orchestrator.sweep.submit import resume

    try:
        result = resume(
            args.name,
            storage_path=args.storage,
            endpoint_url=args.endpoint_url,
            retry_errored=args.retry_errored,
            say=_say,
        )
    except (ConfigError, SweepError) as e:
        print(f"diffscale resume: error: {e}", file=sys.stderr)
        return 2
    print_status(status(args.name, storage_path=args.storage, endpoint_url=args.endpoint_url))
    return _exit_code(result)


def _cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.sweep.status import status
    from orchestrator.sweep.store import SweepError

    try:
        report = status(
            args.name,
            storage_path=args.storage,
            endpoint_url=args.endpoint_url,
            with_mlflow=args.mlflow,
        )
    except (SweepError, ValueError) as e:  # ValueError: a storage URI it cannot read
        print(f"diffscale status: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print_status(report)
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from orchestrator.sweep.status import cancel
    from orchestrator.sweep.store import SweepError

    try:
        message = cancel(
            args.name, storage_path=args.storage, endpoint_url=args.endpoint_url, wait_s=args.wait
        )
        print(message)
    except (SweepError, ValueError) as e:
        print(f"diffscale cancel: error: {e}", file=sys.stderr)
        return 2
    return 0


def _sweep_location(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the sweep's name (its `name:` key)")
    p.add_argument(
        "--storage",
        default=None,
        help="storage.path the sweep was submitted with (default: $DIFFSCALE_STORAGE, "
        "else ./diffscale_runs)",
    )
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint of the storage")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``submit``, ``resume``, ``status`` and ``cancel`` to the ``diffscale`` subcommands."""
    sb = sub.add_parser(
        "submit",
        help="run a sweep YAML (model size x compute grid) on Ray Tune",
        description="Validate and expand a sweep YAML, then run every trial with Ray Tune "
        "(the local Ray, or the cluster in RAY_ADDRESS). Submitting a sweep that already "
        "exists continues it: finished trials are not trained again.",
    )
    sb.add_argument("sweep", help="sweep YAML, e.g. sweeps/demo.yaml")
    sb.add_argument("--dry-run", action="store_true", help="print the trial table; start nothing")
    sb.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override: train.lr=3e-4, max_concurrent_trials=1, "
        "grid.budget.steps=[100,200] (repeatable)",
    )
    sb.add_argument("--retry-errored", action="store_true", help="retry trials that failed")
    sb.add_argument("--quiet", action="store_true", help="no trial table before running")
    sb.set_defaults(func=_cmd_submit)

    rs = sub.add_parser("resume", help="continue an interrupted sweep")
    _sweep_location(rs)
    rs.add_argument("--retry-errored", action="store_true", help="retry trials that failed")
    rs.set_defaults(func=_cmd_resume)

    st = sub.add_parser("status", help="per-trial state, progress and latest metrics")
    _sweep_location(st)
    st.add_argument("--json", action="store_true", help="print one JSON document")
    st.add_argument(
        "--mlflow",
        action="store_true",
        help="also look up each trial's MLflow run (seconds: imports MLflow, opens its store)",
    )
    st.set_defaults(func=_cmd_status)

    cn = sub.add_parser("cancel", help="stop a running sweep (checkpoints are kept)")
    _sweep_location(cn)
    cn.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the stop")
    cn.set_defaults(func=_cmd_cancel)
