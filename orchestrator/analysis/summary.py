"""``diffscale summary``: a sweep's scaling study in plain words, after the tables.

It answers what a scaling study exists to find, from the sweep's MLflow experiment and the
fits ``diffscale fit`` and ``diffscale isoflop`` wrote (their ``fit.json`` under
``outputs/analysis/NAME/``; it runs no fit itself, so it says the same as they did):

- which size is best at the largest budget, and by how much;
- which sizes hold the compute frontier (the best size at each budget), in budget order;
- how the compute-optimal size grows: N_opt = k C^a with a's interval, from the IsoFLOP
  profiles (Hoffmann et al. 2022, approach 2) and from the L(N, D) fit (approach 3);
- the frontier law the compute fit found, with its intervals;
- the warnings of those fits a reader can act on, and where the plots and the MLflow UI are.

Exit codes as ``diffscale fit``: 0 ok, 2 bad input, 1 failure of the tracking server or files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.analysis.commands import (
    PARAMS_COL,
    BadInput,
    dumps,
    fit_name,
    float_column,
    print_error,
    resolve_metric,
)
from orchestrator.analysis.optimal import FORM as ISOFLOP_FORM
from orchestrator.analysis.optimal import flops_budgets
from orchestrator.names import ANALYSIS_FIT_FILE, COMPUTE_PREFIX, EVAL_NLL

__all__ = ["BudgetWinner", "add_parser", "budget_winners", "cmd_summary", "frontier_holders"]


@dataclass(frozen=True)
class BudgetWinner:
    """The best size at one compute budget, and the runner-up."""

    compute: float  # the budget C in FLOPs
    size: str
    params: float
    metric: float
    runner_up: str | None
    runner_up_metric: float | None


def budget_winners(
    compute: np.ndarray, size: np.ndarray, params: np.ndarray, metric: np.ndarray
) -> list[BudgetWinner]:
    """The lowest-``metric`` size at each distinct ``compute`` (ties: the smaller size)."""
    out = []
    for c in np.unique(compute):
        at = np.flatnonzero(compute == c)
        order = at[np.lexsort((params[at], metric[at]))]
        second = order[1] if len(order) > 1 else None
        out.append(
            BudgetWinner(
                compute=float(c),
                size=str(size[order[0]]),
                params=float(params[order[0]]),
                metric=float(metric[order[0]]),
                runner_up=None if second is None else str(size[second]),
                runner_up_metric=None if second is None else float(metric[second]),
            )
        )
    return out


def frontier_holders(winners: list[BudgetWinner]) -> list[tuple[str, float, float, float]]:
    """Runs of consecutive budgets won by one size: (size, params, first C, last C)."""
    runs: list[tuple[str, float, float, float]] = []
    for w in winners:
        if runs and runs[-1][0] == w.size:
            runs[-1] = (w.size, w.params, runs[-1][2], w.compute)
        else:
            runs.append((w.size, w.params, w.compute, w.compute))
    return runs


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _band(interval: list[float | None] | None) -> str:
    if not interval or any(v is None or not math.isfinite(v) for v in interval):
        return "(no interval)"
    return f"[{_num(interval[0])}, {_num(interval[1])}]"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path}: not a readable fit document ({exc})") from exc


def _compute_fit(root: Path, metric: str) -> dict[str, Any] | None:
    """The newest fit of ``metric`` against compute (any form) under ``root``."""
    prefix = fit_name(metric, "compute", "x").removesuffix("-x") + "-"
    found = sorted(root.glob(f"{prefix}*/{ANALYSIS_FIT_FILE}"), key=lambda p: p.stat().st_mtime)
    return _read(found[-1]) if found else None


def _law(doc: dict[str, Any]) -> str:
    level = f"{100 * doc.get('level', 0.95):g}%"
    values = doc.get("params") or {}
    intervals = doc.get("intervals") or {}
    parts = [f"{k} = {_num(v)} {_band(intervals.get(k))}" for k, v in values.items()]
    return f"{doc.get('formula', doc.get('form'))}: {', '.join(parts)} ({level} intervals)"


def summarize(args: argparse.Namespace) -> dict[str, Any]:
    """The summary document (what ``--json`` prints)."""
    from orchestrator.analysis.query import cell_rows, load_runs
    from orchestrator.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    table = load_runs(args.name, tracking_uri=uri, metrics=[args.metric, f"{COMPUTE_PREFIX}*"])
    if table.num_rows == 0:
        raise BadInput(f"experiment {args.name!r} has no trial runs")
    metric = resolve_metric(table, args.metric)
    cells = cell_rows(table, [metric])
    y, n = float_column(cells, metric), float_column(cells, PARAMS_COL)
    keep = np.flatnonzero(np.isfinite(y) & np.isfinite(n) & (n > 0))
    if len(keep) == 0:
        raise BadInput(f"experiment {args.name!r}: no cell has {metric} and {PARAMS_COL}")
    budget = flops_budgets([cells.column("budget")[i].as_py() for i in keep])
    sizes = np.array([cells.column("size")[i].as_py() for i in keep], dtype=object)
    winners = budget_winners(budget, sizes, n[keep], y[keep])
    root = Path(args.out or Path("outputs") / "analysis" / args.name)
    iso = _read(root / fit_name(metric, "params", ISOFLOP_FORM) / ANALYSIS_FIT_FILE)
    return {
        "experiment": args.name,
        "metric": metric,
        "tracking_uri": uri,
        "sizes": len(set(sizes.tolist())),
        "winners": [w.__dict__ for w in winners],
        "frontier": [
            {"size": s, "params": p, "from": a, "to": b} for s, p, a, b in frontier_holders(winners)
        ],
        "compute_fit": _compute_fit(root, metric),
        "isoflop": iso,
    }


def _lines(doc: dict[str, Any]) -> list[str]:
    from orchestrator.analysis.report import human_tick

    metric, last = doc["metric"], doc["winners"][-1]
    lines = []
    best = f"{last['size']} ({human_tick(last['params'])} parameters)"
    text = f"At the largest budget, {human_tick(last['compute'])} FLOPs, the best size is {best}"
    if last["runner_up"]:
        gap = last["runner_up_metric"] - last["metric"]
        text += f" at {last['metric']:.3f} {metric}, {gap:.3f} below {last['runner_up']}"
    lines.append(text + ".")
    holders = doc["frontier"]
    spans = [
        f"{h['size']} at {human_tick(h['from'])}"
        + (f"-{human_tick(h['to'])}" if h["to"] != h["from"] else "")
        for h in holders
    ]
    grows = all(b["params"] > a["params"] for a, b in itertools.pairwise(holders))
    if len(holders) == 1:
        lines.append(
            f"One size holds the whole compute frontier ({spans[0]} FLOPs): the budgets do not "
            "reach the point where a larger model pays off; add larger budgets or smaller sizes."
        )
    else:
        order = "larger sizes win at larger budgets" if grows else "the winner does not grow"
        lines.append(
            f"The compute frontier is held by {len(holders)} sizes ({order}): "
            + ", ".join(spans)
            + " FLOPs."
        )
    iso = doc["isoflop"]
    if iso is None:
        lines.append(
            f"Compute-optimal size: not fitted yet (run: diffscale isoflop {doc['experiment']})."
        )
    else:
        opt = iso["isoflop"]
        located = sum(p["n_opt"] is not None for p in opt["profiles"])
        text = (
            f"The compute-optimal size grows as N_opt ~ C^a with a = {_num(opt['a'])} "
            f"{_band(opt['interval'])} ({100 * opt['level']:g}%) from IsoFLOP minima at "
            f"{located} of {len(opt['profiles'])} budgets"
        )
        if (c := iso.get("chinchilla")) and c.get("a") is not None:
            text += f"; the L(N, D) fit gives a = {_num(c['a'])} {_band(c['interval'])}"
        lines.append(text + ".")
    fit = doc["compute_fit"]
    if fit is None:
        lines.append(f"Frontier law: not fitted yet (run: diffscale fit {doc['experiment']}).")
    else:
        state = "" if fit.get("converged", True) else " (the fit did NOT converge)"
        lines.append(f"Frontier law{state}, {fit.get('description', '')}: {_law(fit)}.")
    for source in (fit, iso):
        for warning in (source or {}).get("warnings", []):
            lines.append(f"note: {warning}")
    plots = [p for source in (fit, iso) for p in (source or {}).get("plots", [])]
    if plots:
        lines.append("Plots: " + ", ".join(plots))
    uri = doc["tracking_uri"]
    lines.append(
        f"MLflow UI: mlflow ui --backend-store-uri {uri}  (experiment '{doc['experiment']}')"
    )
    return lines


def cmd_summary(args: argparse.Namespace) -> int:
    """``diffscale summary``: see the subcommand's help."""
    from mlflow.exceptions import MlflowException

    try:
        doc = summarize(args)
    except ValueError as exc:
        print_error("summary", exc)
        return 2
    except (MlflowException, OSError, RuntimeError) as exc:
        print_error("summary", f"{type(exc).__name__}: {exc}")
        return 1
    if args.json:
        print(dumps(doc))
        return 0
    counts = f"{doc['sizes']} sizes, {len(doc['winners'])} budgets"
    print(f"diffscale summary: {doc['experiment']}: {counts}")
    for line in _lines(doc):
        print(f"  {line}" if not line.startswith(("note:", "Plots", "MLflow")) else line)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``summary`` subcommand."""
    sm = sub.add_parser(
        "summary",
        help="the scaling study in plain words: frontier, compute-optimal size, fitted law",
        description="Reads the sweep's cells from MLflow and the fits that `diffscale fit` "
        "and `diffscale isoflop` wrote, and says which size is best at the largest budget, "
        "which sizes hold the compute frontier, how the compute-optimal size grows (a with "
        "its interval) and the frontier law, then where the plots and the MLflow UI are.",
    )
    sm.add_argument("name", help="sweep name (its MLflow experiment)")
    sm.add_argument("--metric", default=EVAL_NLL, help="metric, e.g. eval/nll_bpd (alias nll)")
    sm.add_argument("--out", help="the fits' folder (default: outputs/analysis/NAME)")
    sm.add_argument(
        "--tracking-uri",
        help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)",
    )
    sm.add_argument("--json", action="store_true", help="print one JSON document only")
    sm.set_defaults(func=cmd_summary)
