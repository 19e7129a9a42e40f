"""``diffscale isoflop``: compute-optimal allocation of a sweep, two ways side by side.

1. IsoFLOP profiles (Hoffmann et al. 2022, approach 2): the sweep's cells at each
   ``budget.flops`` value, a parabola in log N per budget, N_opt = k C^a
   (:func:`~orchestrator.analysis.isoflop.fit_isoflop`);
2. the L(N, D) fit (approach 3) over the same cells, N = parameters and D = images seen,
   whose a = beta / (alpha + beta)
   (:func:`~orchestrator.analysis.isoflop.chinchilla_allocation`).

Exit codes as ``diffscale fit``: 0 ok, 2 bad input, 1 failure of the tracking server or files.
The fitters, the plot and MLflow are imported by the handler (the parser stays light).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tabulate import tabulate

from orchestrator.analysis.commands import (
    IMAGES_COL,
    METRIC_ALIASES,
    PARAMS_COL,
    BadInput,
    dumps,
    fit_name,
    float_column,
    print_error,
    resolve_metric,
)
from orchestrator.names import ANALYSIS_FIT_FILE, COMPUTE_PREFIX, EVAL_NLL, EVAL_PREFIX

if TYPE_CHECKING:
    from orchestrator.analysis.isoflop import ComputeOptimal

__all__ = ["add_parser", "cmd_isoflop", "flops_budgets"]

FORM = "isoflop"


def flops_budgets(labels: list[str | None]) -> np.ndarray:
    """Nominal compute budgets from the cells' budget labels (``flops=1e+12``); BadInput
    naming the labels when the sweep's budgets are not in FLOPs."""
    out = np.full(len(labels), np.nan)
    others = set()
    for i, label in enumerate(labels):
        kind, _, value = (label or "").partition("=")
        if kind == "flops":
            out[i] = float(value)
        else:
            others.add(label)
    if others:
        raise BadInput(
            "IsoFLOP profiles compare sizes at equal compute: they need a budget.flops grid "
            f"axis; this sweep's cells have budgets {sorted(map(str, others))}"
        )
    return out


def _line(name: str, a: float, interval: tuple[float, float], level: float) -> list[Any]:
    lo, hi = interval
    shown = "-" if not math.isfinite(a) else f"{a:.4g}"
    band = "-" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{lo:.4g}, {hi:.4g}]"
    return [name, shown, band, f"{100 * level:g}%"]


def _profile_rows(result: ComputeOptimal) -> list[list[Any]]:
    from orchestrator.analysis import report

    rows = []
    for p in result.profiles:
        best = int(np.argmin(p.metric))
        rows.append(
            [
                f"{p.compute:.3g}",
                len(p.params),
                report.human_tick(float(p.params[best])),
                f"{p.metric[best]:.4f}",
                report.human_tick(p.n_opt) if p.n_opt else "-",
                p.warning or "",
            ]
        )
    return rows


def _analyse(args: argparse.Namespace) -> tuple[dict[str, Any], ComputeOptimal, Path]:
    from orchestrator.analysis import report
    from orchestrator.analysis.fit import fit_chinchilla
    from orchestrator.analysis.isoflop import chinchilla_allocation, fit_isoflop
    from orchestrator.analysis.query import cell_rows, load_runs

    keys = [METRIC_ALIASES.get(args.metric, args.metric), f"{EVAL_PREFIX}*", f"{COMPUTE_PREFIX}*"]
    table = load_runs(args.name, tracking_uri=args.tracking_uri, metrics=keys)
    if table.num_rows == 0:
        raise BadInput(f"experiment {args.name!r} has no trial runs")
    metric = resolve_metric(table, args.metric)
    cells = cell_rows(table, [metric])
    y, n = float_column(cells, metric), float_column(cells, PARAMS_COL)
    images = float_column(cells, IMAGES_COL)
    keep = np.isfinite(y) & (y > 0) & np.isfinite(n) & (n > 0)
    if not keep.any():
        raise BadInput(f"experiment {args.name!r}: no cell has {metric} and {PARAMS_COL}")
    budget = flops_budgets([cells.column("budget")[i].as_py() for i in np.flatnonzero(keep)])
    y, n, images = y[keep], n[keep], images[keep]
    kw = {
        "seed": args.seed,
        **({"bootstrap": args.bootstrap} if args.bootstrap is not None else {}),
    }
    result = fit_isoflop(budget, n, y, **kw)
    doc: dict[str, Any] = {
        "experiment": args.name,
        "metric": metric,
        "isoflop": result.to_dict(),
        "chinchilla": None,
    }
    has_d = np.isfinite(images) & (images > 0)
    if len(np.unique(n)) >= 2 and has_d.sum() >= 5:
        fit = fit_chinchilla(n[has_d], images[has_d], y[has_d], **kw)
        a, interval = chinchilla_allocation(fit)
        doc["chinchilla"] = {
            "a": a if math.isfinite(a) else None,
            "interval": [v if math.isfinite(v) else None for v in interval],
            "level": fit.level,
            "fit": fit.to_dict(),
        }
    name = fit_name(metric, "params", FORM)
    out = Path(args.out or Path("outputs") / "analysis" / args.name) / name
    plot = report.plot_isoflop(
        result, out / "isoflop.png", metric_name=metric, title=f"{args.name}: IsoFLOP profiles"
    )
    doc.update({"fit_name": name, "out_dir": str(out), "plots": [str(plot)]})
    return doc, result, out


def cmd_isoflop(args: argparse.Namespace) -> int:
    """``diffscale isoflop``: see the subcommand's help."""
    from mlflow.exceptions import MlflowException

    from orchestrator.analysis import report
    from orchestrator.analysis.query import QueryError

    if args.bootstrap is not None and args.bootstrap < 0:
        print_error("isoflop", f"--bootstrap must be >= 0, got {args.bootstrap}")
        return 2
    try:
        doc, result, out = _analyse(args)
        out.mkdir(parents=True, exist_ok=True)
        fit_json = out / ANALYSIS_FIT_FILE
        fit_json.write_text(dumps(doc))
        logged_to = None
        artifact_path = f"{report.ARTIFACT_DIR}/{doc['fit_name']}"
        if not args.no_log:
            try:
                files = [*map(Path, doc["plots"]), fit_json]
                logged_to = report.log_report(
                    args.name, args.tracking_uri, files, artifact_path=artifact_path
                )
            except QueryError as exc:
                print(f"diffscale isoflop: warning: not logged to MLflow: {exc}", file=sys.stderr)
        doc["logged_to_run"] = logged_to
    except ValueError as exc:
        print_error("isoflop", exc)
        return 2
    except (MlflowException, OSError, RuntimeError) as exc:
        print_error("isoflop", f"{type(exc).__name__}: {exc}")
        return 1
    if args.json:
        print(dumps(doc))
        return 0
    print(f"diffscale isoflop: {args.name}: {doc['metric']} at equal training compute")
    headers = ["budget (FLOPs)", "sizes", "best size", "its loss", "N_opt (parabola)", "note"]
    print(tabulate(_profile_rows(result), headers=headers))
    lines = [_line("IsoFLOP profiles (approach 2)", result.exponent, result.interval, result.level)]
    if doc["chinchilla"]:
        c = doc["chinchilla"]
        interval = tuple(float("nan") if v is None else v for v in c["interval"])
        a = float("nan") if c["a"] is None else c["a"]
        lines.append(_line("L(N, D) fit, beta/(alpha+beta) (approach 3)", a, interval, c["level"]))
    print()
    print("compute-optimal size N_opt = k C^a:")
    print(tabulate(lines, headers=["estimate of a", "a", "interval", "level"]))
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(f"plot and JSON (in {out}/):")
    for path in [*doc["plots"], fit_json]:
        print(f"  {path}")
    if logged_to:
        print(f"logged to MLflow run {logged_to} under {artifact_path}/")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``isoflop`` subcommand."""
    iso = sub.add_parser(
        "isoflop",
        help="compute-optimal model size: IsoFLOP profiles and the L(N, D) fit side by side",
        description="For a sweep with a budget.flops axis: at each budget, a parabola in "
        "log N through the loss of every size; its minimum is N_opt(C); then N_opt = k C^a "
        "with a bootstrap interval on a (Hoffmann et al. 2022, approach 2), beside "
        "a = beta/(alpha+beta) from L(N, D) = E + A/N^alpha + B/D^beta (approach 3).",
    )
    iso.add_argument("name", help="sweep name (its MLflow experiment)")
    iso.add_argument("--metric", default=EVAL_NLL, help="metric, e.g. eval/nll_bpd (alias nll)")
    iso.add_argument("--bootstrap", type=int, default=None, help="bootstrap replicates")
    iso.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    iso.add_argument("--out", help="plot folder (default: outputs/analysis/NAME)")
    iso.add_argument(
        "--tracking-uri",
        help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)",
    )
    iso.add_argument("--json", action="store_true", help="print one JSON document only")
    iso.add_argument("--no-log", action="store_true", help="do not log to the sweep's run")
    iso.set_defaults(func=cmd_isoflop)
