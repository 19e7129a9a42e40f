"""``diffscale fit`` and ``diffscale table``: scaling fits and the paper's ablation table from a
sweep's MLflow experiment (or, for ``fit``, from a plain CSV/Parquet table).

Exit codes: 0 ok, 2 bad input (the message names the file, column, experiment or flag and
what is allowed), 1 failure (tracking server, fitter or file system).

The fitters, plots and MLflow queries are imported by the handlers, not here: building the
``diffscale`` parser loads no MLflow, scipy, matplotlib or pyarrow.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tabulate import tabulate

from orchestrator.choices import FIT_FORMS
from orchestrator.names import (
    ANALYSIS_FIT_FILE,
    COMPUTE_FLOPS,
    COMPUTE_IMAGES,
    COMPUTE_PREFIX,
    EVAL_DIGITS_FD,
    EVAL_FID,
    EVAL_NLL,
    EVAL_PREFIX,
    MODEL_PARAMS_PARAM,
    SAMPLING_PREFIX,
    SIZE_TAG,
)

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["add_parsers", "cmd_fit", "cmd_table", "fit_name"]

METRIC_ALIASES = {"nll": EVAL_NLL, "fid": EVAL_FID}
FD_FALLBACK = {EVAL_FID: EVAL_DIGITS_FD}  # the digits dataset logs a digits-feature FD
PARAMS_COL, FLOPS_COL, IMAGES_COL = f"params.{MODEL_PARAMS_PARAM}", COMPUTE_FLOPS, COMPUTE_IMAGES
TABLE_COLUMNS = ("Iters", "T", "Schedule", "Objective", "NLL", "FID", "paper NLL", "paper FID")
FD_COLUMN = {EVAL_FID: "FID", EVAL_DIGITS_FD: "digits FD"}  # table header of each FD metric


class BadInput(ValueError):
    """User input the command refuses (exit 2)."""


def print_error(cmd: str, msg: object) -> None:
    print(f"diffscale {cmd}: error: {msg}", file=sys.stderr)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, default=_jsonable, allow_nan=True)


# -- fit ------------------------------------------------------------------------------------


def _valid(table: pa.Table, col: str) -> bool:
    return col in table.column_names and table.column(col).null_count < table.num_rows


def resolve_metric(table: pa.Table, metric: str) -> str:
    metric = METRIC_ALIASES.get(metric, metric)
    if _valid(table, metric):
        return metric
    fallback = FD_FALLBACK.get(metric)
    if fallback and _valid(table, fallback):
        return fallback
    from orchestrator.analysis.query import metric_columns

    logged = [c for c in metric_columns(table) if _valid(table, c)]
    raise BadInput(
        f"metric {metric!r} was not logged; metrics with values: {', '.join(logged) or 'none'} "
        f"(aliases: {', '.join(f'{k}={v}' for k, v in METRIC_ALIASES.items())})"
    )


def float_column(table: pa.Table, col: str) -> np.ndarray:
    """A column as float64 ``[R]`` (strings parsed; null, 'null' or unparsable -> nan)."""
    if col not in table.column_names:
        return np.full(table.num_rows, np.nan)
    values = table.column(col).to_pylist()
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            pass
    return out


def _groups(table: pa.Table) -> np.ndarray:
    """Model-size label per row: tags.size, else params.model.name, else the run name."""
    for col in (f"tags.{SIZE_TAG}", "params.model.name", "run_name"):
        if col in table.column_names and table.column(col).null_count == 0:
            return np.array(table.column(col).to_pylist(), dtype=object)
    return np.array(table.column("run_id").to_pylist(), dtype=object)


def _largest_compute_per_size(
    n: np.ndarray, compute: np.ndarray, metric: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(params [K], metric [K]) at each size's largest compute (what fit_by_size fits)."""
    sizes = np.unique(n)
    best = [np.flatnonzero(n == s)[np.argmax(compute[n == s])] for s in sizes]
    return sizes, metric[best]


def _predictions(fit: Any, form: str, values: list[float] | None) -> list[dict[str, Any]]:
    if not values:
        return []
    if form == "chinchilla":
        if len(values) % 2:
            raise BadInput("--form chinchilla: --predict takes pairs N D (an even count)")
        points = [values[i : i + 2] for i in range(0, len(values), 2)]
        args = (np.array([p[0] for p in points]), np.array([p[1] for p in points]))
        keys = [{"N": p[0], "D": p[1]} for p in points]
    else:
        args = (np.asarray(values, dtype=float),)
        keys = [{"x": v} for v in values]
    if any(v <= 0 for v in values):
        raise BadInput(f"--predict values must be positive, got {values}")
    mid = np.atleast_1d(fit.predict(*args))
    lo, hi = (np.atleast_1d(a) for a in fit.predict_interval(*args))
    return [
        {**k, "value": float(m), "low": float(a), "high": float(b)}
        for k, m, a, b in zip(keys, mid, lo, hi, strict=True)
    ]


def _fit_sweep(args: argparse.Namespace, out: Path) -> tuple[Any, dict[str, Any], list[Path]]:
    """Load the sweep, fit, plot. Returns (FitResult, extra JSON fields, plot paths)."""
    from orchestrator.analysis import fit as F
    from orchestrator.analysis import report
    from orchestrator.analysis.query import load_runs

    x = args.x or "compute"
    if x not in ("compute", "params"):
        raise BadInput(f"--x for a sweep must be 'compute' or 'params', got {x!r}")
    wanted = METRIC_ALIASES.get(args.metric, args.metric)
    # train/* can be long and is not needed
    keys = [wanted, f"{EVAL_PREFIX}*", f"{COMPUTE_PREFIX}*", f"{SAMPLING_PREFIX}*"]
    table = load_runs(args.name, tracking_uri=args.tracking_uri, metrics=keys)
    if table.num_rows == 0:
        raise BadInput(f"experiment {args.name!r} has no trial runs")
    metric = resolve_metric(table, args.metric)
    x_name = "params-data" if args.form == "chinchilla" else x
    name = fit_name(metric, x_name, args.form, all_points=not args.frontier and x == "compute")
    out = out / name
    y, compute = float_column(table, metric), float_column(table, FLOPS_COL)
    n, group = float_column(table, PARAMS_COL), _groups(table)
    keep = np.isfinite(y) & (y > 0) & np.isfinite(compute) & (compute > args.min_compute)
    if x == "params" or args.form == "chinchilla":
        keep &= np.isfinite(n) & (n > 0)
    if args.form == "chinchilla":
        images = float_column(table, IMAGES_COL)
        keep &= np.isfinite(images) & (images > 0)
    if not keep.any():
        need = f"{metric}, {FLOPS_COL}" + (f", {PARAMS_COL}" if x == "params" else "")
        raise BadInput(f"experiment {args.name!r}: no step has positive values of {need}")
    y, compute, n, group = y[keep], compute[keep], n[keep], group[keep]
    kw = {
        "seed": args.seed,
        **({"bootstrap": args.bootstrap} if args.bootstrap is not None else {}),
    }
    frontier = F.compute_frontier(compute, y, group)
    desc = f"{metric} vs {'training compute' if x == 'compute' else 'parameters'}"
    if args.form == "chinchilla":
        result = F.fit_chinchilla(n, float_column(table, IMAGES_COL)[keep], y, **kw)
        desc = f"{metric} as L(N = {PARAMS_COL}, D = {IMAGES_COL})"
    elif x == "params":
        result = F.fit_by_size(n, compute, y, form=args.form, **kw)
        desc += f" at the largest compute of each of {len(np.unique(n))} sizes"
    elif args.frontier:
        result = frontier.fit(form=args.form, **kw)
        desc += f" along the frontier of {len(set(group.tolist()))} sizes"
    else:
        result = F.fit_power_law(compute, y, form=args.form, **kw)
        desc += f" over all {len(y)} points"
    plots = [
        report.plot_metric_vs_compute(
            compute,
            y,
            group,
            out / "compute.png",
            metric_name=metric,
            fit=result if x == "compute" and args.form != "chinchilla" else None,
            frontier=(frontier.compute, frontier.metric),
            title=f"{args.name}: {metric}",
        )
    ]
    if np.isfinite(n).any():
        has_n = np.isfinite(n) & (n > 0)
        sizes, best = _largest_compute_per_size(n[has_n], compute[has_n], y[has_n])
        plots.append(
            report.plot_metric_vs_params(
                sizes,
                best,
                out / "params.png",
                metric_name=metric,
                fit=result if x == "params" else None,
                title=f"{args.name}: {metric}",
            )
        )
    sampling = report.plot_sampling_steps(table, out / "sampling.png", title=args.name)
    plots += [sampling] if sampling else []
    extra = {
        "experiment": args.name,
        "metric": metric,
        "x": x,
        "description": desc,
        "fit_name": name,
        "out_dir": str(out),
    }
    return result, extra, plots


def _fit_table(args: argparse.Namespace, out: Path) -> tuple[Any, dict[str, Any], list[Path]]:
    from orchestrator.analysis import fit as F
    from orchestrator.analysis import report

    kw = {
        "seed": args.seed,
        **({"bootstrap": args.bootstrap} if args.bootstrap is not None else {}),
    }
    needed = ("n", "d", "loss") if args.form == "chinchilla" else ("x", "y")
    missing = [f"--{k}" for k in needed if not getattr(args, k)]
    if missing:
        raise BadInput(f"--table with --form {args.form} needs {' '.join(missing)} (column names)")
    try:
        table = F.load_table(args.table)  # ValueError naming the file
        cols = F.table_columns(table, *(getattr(args, k) for k in needed))
    except ValueError as exc:
        raise BadInput(f"{args.table}: {exc}") from exc
    x_col = f"{args.n}-{args.d}" if args.form == "chinchilla" else args.x
    name = fit_name(args.loss if args.form == "chinchilla" else args.y, x_col, args.form)
    out = out / name
    extra: dict[str, Any] = {
        "table": str(args.table),
        "columns": [getattr(args, k) for k in needed],
        "fit_name": name,
        "out_dir": str(out),
    }
    if args.form == "chinchilla":
        result = F.fit_chinchilla(*cols, **kw)
        extra["description"] = f"{args.loss} as L(N = {args.n}, D = {args.d})"
        return result, extra, []
    x, y = cols
    result = F.fit_power_law(x, y, form=args.form, **kw)
    extra["description"] = f"{args.y} vs {args.x}"
    plot = report.plot_metric_vs_compute(
        x,
        y,
        np.array(["data"] * len(x), dtype=object),
        out / "fit.png",
        fit=result,
        metric_name=args.y,
        title=f"{Path(args.table).name}: {args.y} vs {args.x}",
    )
    return result, extra, [plot]


def cmd_fit(args: argparse.Namespace) -> int:
    """``diffscale fit``: see the subcommand's help."""
    from mlflow.exceptions import MlflowException

    from orchestrator.analysis import report
    from orchestrator.analysis.query import QueryError

    if bool(args.name) == bool(args.table):
        print_error("fit", "give exactly one of NAME (a sweep's MLflow experiment) or --table FILE")
        return 2
    if args.bootstrap is not None and args.bootstrap < 0:
        print_error("fit", f"--bootstrap must be >= 0, got {args.bootstrap}")
        return 2
    source = args.name or Path(args.table).stem
    out = Path(args.out or Path("outputs") / "analysis" / source)
    try:
        fitter = _fit_table if args.table else _fit_sweep
        result, extra, plots = fitter(args, out)
        predictions = _predictions(result, result.form, args.predict)
        doc = {**result.to_dict(), **extra, "plots": [str(p) for p in plots]}
        if args.predict:
            doc["predictions"] = predictions
        out = Path(extra["out_dir"])  # this fit's own folder: other fits are left alone
        out.mkdir(parents=True, exist_ok=True)
        fit_json = out / ANALYSIS_FIT_FILE
        fit_json.write_text(dumps(doc))
        logged_to = None
        artifact_path = f"{report.ARTIFACT_DIR}/{extra['fit_name']}"
        if args.name and not args.no_log:
            try:
                logged_to = report.log_report(
                    args.name, args.tracking_uri, [*plots, fit_json], artifact_path=artifact_path
                )
            except QueryError as exc:
                print(f"diffscale fit: warning: not logged to MLflow: {exc}", file=sys.stderr)
        doc["logged_to_run"] = logged_to
    except ValueError as exc:  # BadInput, QueryError, and data the fitter refuses
        print_error("fit", exc)
        return 2
    except (MlflowException, OSError, RuntimeError) as exc:
        print_error("fit", f"{type(exc).__name__}: {exc}")
        return 1
    if args.json:
        print(dumps(doc))
        return 0
    print(f"diffscale fit: {extra.get('experiment') or extra.get('table')}: {extra['description']}")
    print(report.fit_table(result))
    print(report.fit_summary(result))
    for p in predictions:
        at = f"N={p['N']:.4g}, D={p['D']:.4g}" if "N" in p else f"x={p['x']:.4g}"
        print(f"prediction at {at}: {p['value']:.6g} [{p['low']:.6g}, {p['high']:.6g}]")
    print(f"plots and fit (in {out}/):")
    for path in [*plots, fit_json]:
        print(f"  {path}")
    if logged_to:
        print(f"logged to MLflow run {logged_to} under {artifact_path}/")
    if args.name:
        grids = report.sample_grid_locations(args.name, args.tracking_uri)
        if grids:
            print("sample grids (per trial, one per eval point):")
            for line in grids:
                print(f"  {line}")
    return 0


def fit_name(metric: str, x: str, form: str, *, all_points: bool = False) -> str:
    """The folder of one fit's plots and JSON, on disk and under the parent run's
    ``analysis/``: metric, x axis and form, e.g. ``nll_bpd-vs-compute-henighan``; fits of
    other metrics, axes or forms never overwrite it, and re-running it replaces only it."""

    def slug(text: str) -> str:
        text = text.removeprefix(EVAL_PREFIX)
        return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_") or "metric"

    return f"{slug(metric)}-vs-{slug(x)}-{form}" + ("-all-points" if all_points else "")


# -- table ----------------------------------------------------------------------------------


def cmd_table(args: argparse.Namespace) -> int:
    """``diffscale table``: see the subcommand's help."""
    from mlflow.exceptions import MlflowException

    from orchestrator.analysis.paper import ablation_rows, human_count
    from orchestrator.analysis.query import QueryError, load_runs

    try:
        table = load_runs(args.name, tracking_uri=args.tracking_uri, metrics=[f"{EVAL_PREFIX}*"])
        if table.num_rows == 0:
            raise BadInput(f"experiment {args.name!r} has no trial runs")
        rows = ablation_rows(table)
    except (BadInput, QueryError) as exc:
        print_error("table", exc)
        return 2
    except (MlflowException, OSError) as exc:
        print_error("table", f"{type(exc).__name__}: {exc}")
        return 1
    if args.json:
        print(dumps({"experiment": args.name, "columns": [*TABLE_COLUMNS, "trial"], "rows": rows}))
        return 0

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    def fd(v: float | None) -> str:  # FID ~ 1..100; digits-feature FD can be ~0.01
        return num(v, ".2f" if v is None or abs(v) >= 0.1 else ".3g")

    body = [
        [
            human_count(r["Iters"]),
            human_count(r["T"]),
            r["Schedule"] or "-",
            r["Objective"] or "-",
            num(r["NLL"], ".3f"),
            fd(r["FID"]),
            num(r["paper NLL"], ".2f"),
            num(r["paper FID"], ".1f"),
            r["trial"] or "-",
        ]
        for r in rows
    ]
    # the FD column is named after the metric its rows show: FID, or the digits-feature FD
    shown = sorted({r["FID metric"] for r in rows if r["FID metric"]})
    fd_column = " / ".join(FD_COLUMN.get(m, m) for m in shown) or "FID"
    headers = [fd_column if c == "FID" else c for c in TABLE_COLUMNS]
    print(f"diffscale table: {args.name} ({len(rows)} cells)")
    print(tabulate(body, headers=[*headers, "trial"], disable_numparse=True))
    nll_from = sorted({r["NLL metric"] for r in rows if r["NLL metric"]})
    fd_from = sorted({r["FID metric"] for r in rows if r["FID metric"]})
    print(
        f"NLL from: {', '.join(nll_from) or 'nothing logged'}; {fd_column} from: "
        f"{', '.join(fd_from) or 'nothing logged'}; paper: ImageNet 64x64, "
        "Nichol & Dhariwal 2021 (matched on Iters, T, Schedule, Objective)"
    )
    return 0


# -- parsers --------------------------------------------------------------------------------


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``fit`` and ``table`` to the ``diffscale`` subcommands."""
    fit = sub.add_parser(
        "fit",
        help="fit a scaling law to a sweep (MLflow) or to a CSV/Parquet table",
        description="Fit L(C) = L_inf + (C0/C)^alpha (henighan), (C0/C)^alpha (power) or "
        "L(N, D) = E + A/N^alpha + B/D^beta (chinchilla) with bootstrap intervals. From a "
        "sweep: x = training compute along the compute-efficient frontier (default) or "
        "parameters at each size's largest compute; plots go to --out and to the sweep's "
        "parent MLflow run under analysis/.",
    )
    fit.add_argument("name", nargs="?", help="sweep name (its MLflow experiment)")
    fit.add_argument("--table", help="fit a CSV or Parquet table instead of a sweep")
    fit.add_argument(
        "--metric",
        default=EVAL_NLL,
        help="sweep: metric to fit, e.g. eval/nll_bpd, eval/fid (eval/digits_fd "
        "if no eval/fid); aliases nll, fid",
    )
    fit.add_argument("--form", choices=FIT_FORMS, default="henighan")
    fit.add_argument("--x", help="sweep: compute (default) or params; table: the x column")
    fit.add_argument("--y", help="table, henighan/power: the y column")
    fit.add_argument("--n", help="table, chinchilla: the parameter-count column")
    fit.add_argument("--d", help="table, chinchilla: the data (tokens/images) column")
    fit.add_argument("--loss", help="table, chinchilla: the loss column")
    fit.add_argument(
        "--frontier",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sweep, --x compute: fit the frontier (default) or all points",
    )
    fit.add_argument(
        "--min-compute",
        type=float,
        default=0.0,
        metavar="FLOPS",
        help="sweep: leave out points at or below this training compute (the initial "
        "transient of each curve is not a power law)",
    )
    fit.add_argument(
        "--predict",
        type=float,
        nargs="+",
        metavar="X",
        help="predict at these x (chinchilla: pairs N D), with an interval",
    )
    fit.add_argument(
        "--bootstrap",
        type=int,
        default=None,
        help="bootstrap resamples for the intervals (default: the fitter's)",
    )
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    fit.add_argument("--out", help="plot folder (default: outputs/analysis/NAME)")
    fit.add_argument(
        "--tracking-uri",
        help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)",
    )
    fit.add_argument("--json", action="store_true", help="print one JSON document only")
    fit.add_argument("--no-log", action="store_true", help="do not log to the sweep's run")
    fit.set_defaults(func=cmd_fit)

    tab = sub.add_parser(
        "table",
        help="the paper's ablation table (Iters, T, Schedule, Objective, NLL, FID) of a sweep",
        description="One row per grid cell of a sweep, with the paper's published NLL and "
        "FID beside the rows whose (Iters, T, Schedule, Objective) it reports.",
    )
    tab.add_argument("name", help="sweep name (its MLflow experiment)")
    tab.add_argument(
        "--tracking-uri",
        help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)",
    )
    tab.add_argument("--json", action="store_true", help="print one JSON document only")
    tab.set_defaults(func=cmd_table)
