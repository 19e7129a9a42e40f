"""Tables (tabulate) and PNG plots (matplotlib, Agg) of scaling fits, logged to the sweep.

Plots are drawn on ``matplotlib.figure.Figure`` objects directly (no pyplot, no global backend
switch), so they work headless and from threads. :func:`log_report` attaches the files to the
sweep's parent run (tag ``diffscale.role=sweep``) under ``analysis/``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter
from mlflow import MlflowClient
from tabulate import tabulate

from orchestrator.analysis.query import QueryError, experiment_id
from orchestrator.names import (
    ANALYSIS_ARTIFACT_DIR,
    EVAL_DIGITS_FD,
    EVAL_FID,
    EVAL_NLL,
    EVAL_NLL_FULL,
    EVAL_PREFIX,
    ROLE_SWEEP,
    ROLE_TAG,
    ROLE_TRIAL,
    SAMPLES_ARTIFACT_DIR,
    SAMPLING_PREFIX,
    TRIAL_TAG,
)
from orchestrator.tracking import resolve_tracking_uri, sweep_parent_run_id

if TYPE_CHECKING:
    from orchestrator.analysis.fit import FitResult
    from orchestrator.analysis.isoflop import ComputeOptimal

log = logging.getLogger(__name__)

__all__ = [
    "SAMPLING_PATTERN",
    "fit_summary",
    "fit_table",
    "human_tick",
    "isoflop_figure",
    "log_report",
    "log_ticks",
    "metric_label",
    "metric_vs_compute_figure",
    "metric_vs_params_figure",
    "plot_isoflop",
    "plot_metric_vs_compute",
    "plot_metric_vs_params",
    "plot_sampling_steps",
    "rows_table",
    "sample_grid_locations",
    "sampling_curves",
]

ARTIFACT_DIR = ANALYSIS_ARTIFACT_DIR
# sampling/<fd>/<method>/<steps>, logged once at a trial's final step
SAMPLING_PATTERN = re.compile(
    rf"^{re.escape(SAMPLING_PREFIX)}(?P<fd>[^/]+)/(?P<method>[^/]+)/(?P<steps>\d+)$"
)
_DPI = 240  # 1536 x 1152 pixels at the default 6.4 x 4.8 in: 2x a screen's 120 dpi
MAX_TICK_LABELS = 8  # labels of a log x axis ("0.72M", "4T"): at most this many ...
MIN_TICK_GAP = 0.08  # ... and at least this fraction of the axis apart, so none touch
# labelled mantissas of a log axis, sparsest first: 1 (decades), 1-2-5, 1-2-3-5-7, all
_MANTISSAS = ((1,), (1, 2, 5), (1, 2, 3, 5, 7), tuple(range(1, 10)))

# axis labels with units, by metric key (anything else is shown as its key)
METRIC_LABELS = {
    EVAL_NLL: "NLL (bits/dim)",
    EVAL_NLL_FULL: "NLL, full bound (bits/dim)",
    EVAL_FID: "FID (Inception features)",
    EVAL_DIGITS_FD: "digits FD (Frechet distance, digits-classifier features)",
}
COMPUTE_LABEL = "training compute (FLOPs)"
PARAMS_LABEL = "parameters"


def _fmt(value: float) -> str:
    """Unrounded enough to re-use (Besiroglu et al. 2024 ask for unrounded parameters)."""
    return f"{value:.6g}"


def fit_table(fit: FitResult, *, tablefmt: str = "simple") -> str:
    """Parameters of a fit with their intervals: columns param, value, ``<level>% interval``."""
    rows = []
    for name, value in fit.params.items():
        lo, hi = fit.intervals.get(name, (math.nan, math.nan))
        interval = "-" if math.isnan(lo) or math.isnan(hi) else f"[{_fmt(lo)}, {_fmt(hi)}]"
        rows.append([name, _fmt(value), interval])
    level = f"{100 * fit.level:g}% interval"
    return tabulate(
        rows, headers=["param", "value", level], tablefmt=tablefmt, disable_numparse=True
    )


def fit_summary(fit: FitResult) -> str:
    """One line of fit quality, plus one line per warning of the fitter."""
    boot = 0 if fit.bootstrap is None else len(fit.bootstrap)
    line = (
        f"form {fit.form}: {fit.n_points} points, R^2 (log) {fit.r2_log:.4f}, "
        f"Huber loss {fit.loss:.4g}, converged {'yes' if fit.converged else 'NO'}, "
        f"bootstrap {boot}"
    )
    return "\n".join([line, *(f"warning: {w}" for w in fit.warnings)])


def rows_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    floatfmt: str = ".4g",
    tablefmt: str = "simple",
) -> str:
    """A table of ``rows`` (dicts) restricted to ``columns``; None shows as ``-``."""
    body = [[row.get(c) for c in columns] for row in rows]
    return tabulate(
        body, headers=list(columns), floatfmt=floatfmt, tablefmt=tablefmt, missingval="-"
    )


def metric_label(metric: str) -> str:
    """The axis label of a metric key, with its unit: ``eval/nll_bpd`` -> NLL (bits/dim)."""
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric]
    found = SAMPLING_PATTERN.match(metric)
    if found:
        return f"{found['fd']} ({found['method']}, {found['steps']} steps)"
    return metric


def _new_figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _legend_outside(ax: Any) -> None:
    """The legend under the figure (below the x label), never over the data or the band."""
    n = len(ax.get_legend_handles_labels()[1])
    ax.figure.legend(fontsize=8, loc="outside lower center", ncol=min(3, max(n, 1)))


def human_tick(value: float, _pos: Any = None) -> str:
    """A log-axis tick in engineering units: 7e5 -> 0.7M, 1e6 -> 1M, 3e12 -> 3T."""
    if value <= 0 or not math.isfinite(value):
        return ""
    for scale, suffix in (
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
    ):
        if value >= 0.1 * scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:g}"


def _spaced(ticks: Sequence[float], lo: float, hi: float) -> bool:
    """Whether ``ticks`` (sorted, inside [lo, hi]) are 2 to MAX_TICK_LABELS, each at least
    MIN_TICK_GAP of the log axis from the next."""
    gaps = np.diff(np.log(ticks)) / math.log(hi / lo)
    return 2 <= len(ticks) <= MAX_TICK_LABELS and bool(np.all(gaps >= MIN_TICK_GAP))


def log_ticks(lo: float, hi: float, values: Iterable[float] | None = None) -> list[float] | None:
    """Labelled tick positions of a log axis that shows [lo, hi] (``lo`` > 0): ``values``
    (e.g. the model sizes) where they are few and far enough apart; else the richest of the
    mantissa sets 1, 1-2-5, 1-2-3-5-7, 1..9 that fits (2 to MAX_TICK_LABELS ticks, at least
    MIN_TICK_GAP of the axis apart); else three round values across a very short axis; None
    when even the decades are too many (matplotlib's own locator then thins them)."""
    if values is not None:
        chosen = sorted({float(v) for v in values if lo <= v <= hi})
        if _spaced(chosen, lo, hi) or len(chosen) == 1:
            return chosen
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    best = None
    for mantissas in _MANTISSAS:
        ticks = sorted(m * 10.0**k for k in decades for m in mantissas if lo <= m * 10.0**k <= hi)
        if len(ticks) > MAX_TICK_LABELS:
            break
        if _spaced(ticks, lo, hi):
            best = ticks
    if best is None and len([k for k in decades if lo <= 10.0**k <= hi]) > MAX_TICK_LABELS:
        return None
    if best is None:  # no two round values inside: a sliver of one decade
        quarters = np.geomspace(lo, hi, 5)[1:4]
        for digits in (2, 3, 4, 6):  # as few digits as keep three distinct, spaced ticks
            best = sorted({float(f"{v:.{digits}g}") for v in quarters})
            if _spaced(best, lo, hi) and len(best) == 3:
                break
    return best


def _human_log_axis(axis: Any, values: Iterable[float] | None = None) -> None:
    """Engineering-unit labels (0.7M, 1M, 3T) on a log axis at :func:`log_ticks`; the
    unlabelled minor ticks stay as marks."""
    axis.set_major_formatter(FuncFormatter(human_tick))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    lo, hi = sorted(axis.get_view_interval())
    ticks = log_ticks(lo, hi, values) if lo > 0 else None
    if ticks:
        axis.set_major_locator(FixedLocator(ticks))


def _plain_log_axes(ax: Any, *, x: bool = True, y: bool = True) -> None:
    """Log axes labelled 2.5, 3, 1e+15 instead of 2.5x10^0; minor ticks labelled too when
    the axis spans less than a decade (otherwise it would carry no label at all)."""
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for on, axis, (lo, hi) in ((x, ax.xaxis, ax.get_xlim()), (y, ax.yaxis, ax.get_ylim())):
        if not on:
            continue
        axis.set_major_formatter(plain)
        if lo > 0 and hi / lo < 10:
            axis.set_minor_formatter(plain)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    log.info("wrote %s", path)
    return path


def _trend(ax: Any, fit: FitResult, lo: float, hi: float, label: str) -> None:
    """The fitted curve over [lo, hi] (log-spaced) with its interval band; a fit that did
    not converge or is poorly determined (any warning) is dashed, with a note under the
    axes."""
    grid = np.geomspace(lo, hi, 200)
    doubtful = not fit.converged or bool(fit.warnings)
    if doubtful:
        why = "did not converge" if not fit.converged else "is poorly determined"
        label = f"{label} ({why.removeprefix('is ').replace('did not converge', 'not converged')})"
        note = f"dashed: the fit {why} (warnings in its fit.json)"
        ax.set_xlabel(f"{ax.get_xlabel()}\n{note}")  # under the axes, off the data
    ax.plot(
        grid, fit.predict(grid), color="black", lw=1.5, ls="--" if doubtful else "-", label=label
    )
    if not any(np.isfinite(v).all() for v in fit.intervals.values()):
        return  # the fitter judged its bootstrap unusable (see fit.warnings)
    band_lo, band_hi = fit.predict_interval(grid)
    ax.fill_between(
        grid, band_lo, band_hi, color="black", alpha=0.15, lw=0, label=f"{100 * fit.level:g}% band"
    )


def _fit_label(fit: FitResult) -> str:
    p = fit.params
    if fit.form == "henighan" and {"L_inf", "C0", "alpha"} <= set(p):
        return f"fit: {p['L_inf']:.3g} + ({p['C0']:.3g}/x)^{p['alpha']:.3g}"
    if "C0" in p and "alpha" in p:
        return f"fit: ({p['C0']:.3g}/x)^{p['alpha']:.3g}"
    return f"fit ({fit.form})"


def plot_metric_vs_compute(
    compute: np.ndarray, metric: np.ndarray, group: np.ndarray, path: str | Path, **kw: Any
) -> Path:
    """:func:`metric_vs_compute_figure` (keywords as there) as a PNG at ``path``."""
    return _save(metric_vs_compute_figure(compute, metric, group, **kw), path)


def metric_vs_compute_figure(
    compute: np.ndarray,
    metric: np.ndarray,
    group: np.ndarray,
    *,
    fit: FitResult | None = None,
    frontier: tuple[np.ndarray, np.ndarray] | None = None,
    metric_name: str = "metric",
    title: str | None = None,
) -> Figure:
    """Log-log curves of ``metric [P]`` vs training ``compute [P]`` (FLOPs), one line per
    ``group [P]`` (model size), with the compute-efficient ``frontier`` (compute, metric)
    and the fitted trend with its band."""
    compute, metric, group = (
        np.asarray(compute, float),
        np.asarray(metric, float),
        np.asarray(group),
    )
    ylabel = metric_label(metric_name)
    fig, ax = _new_figure(title or f"{ylabel} vs compute", COMPUTE_LABEL, ylabel)
    for g in sorted(set(group.tolist()), key=str):
        sel = group == g
        order = np.argsort(compute[sel])
        ax.plot(compute[sel][order], metric[sel][order], marker="o", ms=3, lw=1, label=str(g))
    if frontier is not None:
        fc, fm = (np.asarray(a, float) for a in frontier)
        ax.plot(fc, fm, color="red", lw=2, ls="--", marker="s", ms=4, label="frontier")
    if fit is not None and len(compute):
        _trend(ax, fit, float(compute.min()), float(compute.max()), _fit_label(fit))
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_axes(ax, x=False)
    _human_log_axis(ax.xaxis)
    _legend_outside(ax)
    return fig


def plot_metric_vs_params(
    params: np.ndarray, metric: np.ndarray, path: str | Path, **kw: Any
) -> Path:
    """:func:`metric_vs_params_figure` (keywords as there) as a PNG at ``path``."""
    return _save(metric_vs_params_figure(params, metric, **kw), path)


def metric_vs_params_figure(
    params: np.ndarray,
    metric: np.ndarray,
    *,
    fit: FitResult | None = None,
    labels: Sequence[str] | None = None,
    metric_name: str = "metric",
    title: str | None = None,
) -> Figure:
    """Log-log ``metric [K]`` vs parameter count ``params [K]`` (one point per model size,
    at its largest compute), with the fitted trend."""
    params, metric = np.asarray(params, float), np.asarray(metric, float)
    ylabel = metric_label(metric_name)
    fig, ax = _new_figure(title or f"{ylabel} vs parameters", PARAMS_LABEL, ylabel)
    ax.plot(params, metric, "o", color="C0", label="largest compute per size")
    for x, y, text in zip(params, metric, labels or [], strict=False):
        ax.annotate(str(text), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if fit is not None and len(params):
        _trend(ax, fit, float(params.min()), float(params.max()), _fit_label(fit))
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_axes(ax, x=False)
    _human_log_axis(ax.xaxis, params.tolist())  # a tick at each size: 0.7M, 2.9M, 4.1M
    _legend_outside(ax)
    return fig


def plot_isoflop(result: ComputeOptimal, path: str | Path, **kw: Any) -> Path:
    """:func:`isoflop_figure` (keywords as there) as a PNG at ``path``."""
    return _save(isoflop_figure(result, **kw), path)


def isoflop_figure(
    result: ComputeOptimal, *, metric_name: str = "metric", title: str | None = None
) -> Figure:
    """IsoFLOP profiles (Hoffmann et al. 2022, approach 2): ``metric`` against parameters,
    one curve per compute budget with its fitted parabola in log N; each located minimum
    N_opt(C) is marked."""
    ylabel = metric_label(metric_name)
    fig, ax = _new_figure(title or f"IsoFLOP profiles: {ylabel}", PARAMS_LABEL, ylabel)
    for i, profile in enumerate(result.profiles):
        color = f"C{i % 10}"
        label = f"C = {human_tick(profile.compute)}FLOPs"
        ax.plot(profile.params, profile.metric, "o", color=color, ms=4, label=label)
        n, y = profile.curve()
        ax.plot(n, y, color=color, lw=1, ls="-" if profile.n_opt else ":")
        if profile.n_opt is not None:
            x_star = np.log(profile.n_opt)
            y_star = np.polyval(profile.coefficients, x_star)
            ax.plot(profile.n_opt, y_star, "*", color=color, ms=12, mec="black", mew=0.5)
    ax.plot([], [], "*", color="gray", ms=10, mec="black", mew=0.5, label="N_opt(C)")
    if result.warnings:
        ax.set_xlabel(f"{ax.get_xlabel()}\ndotted: no minimum inside the sizes (see warnings)")
    ax.set_xscale("log")
    _human_log_axis(ax.xaxis, [n for p in result.profiles for n in p.params])  # at each size
    _legend_outside(ax)
    return fig


def sampling_curves(table: pa.Table) -> dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]]:
    """FD vs sampling steps from ``sampling/<fd>/<method>/<steps>`` columns of a load_runs
    table: ``{(trial, fd, method): (steps [K], value [K])}`` with each run's last logged value;
    only the ``fid`` kind when a run has it, else the other kinds (e.g. ``digits_fd``)."""
    cols = [(c, SAMPLING_PATTERN.match(c)) for c in table.column_names]
    cols = [(c, m) for c, m in cols if m]
    trial_col = f"tags.{TRIAL_TAG}"
    label_col = trial_col if trial_col in table.column_names else "run_name"
    curves: dict[tuple[str, str, str], dict[int, float]] = {}
    for run in table.to_pylist():  # rows in step order: later values overwrite earlier ones
        for c, m in cols:
            if run[c] is not None:
                key = (str(run[label_col] or run["run_id"]), m["fd"], m["method"])
                curves.setdefault(key, {})[int(m["steps"])] = float(run[c])
    has_fid = {trial for trial, fd, _ in curves if fd == "fid"}
    return {
        key: (np.array(sorted(pts)), np.array([pts[s] for s in sorted(pts)]))
        for key, pts in sorted(curves.items())
        if key[1] == "fid" or key[0] not in has_fid
    }


def plot_sampling_steps(
    table: pa.Table, path: str | Path, *, title: str | None = None
) -> Path | None:
    """FID (or digits FD) vs number of sampling steps, one line per (trial, method), from the
    ``sampling/...`` metrics of a load_runs table; None (nothing written) if there are none."""
    curves = sampling_curves(table)
    if not curves:
        return None
    kinds = sorted({fd for _, fd, _ in curves})
    ylabel = " / ".join(metric_label(f"{EVAL_PREFIX}{k}") for k in kinds)
    fig, ax = _new_figure(title or "sample quality vs sampling steps", "sampling steps", ylabel)
    for (trial, fd, method), (steps, values) in curves.items():
        suffix = f" ({fd})" if len(kinds) > 1 else ""
        ax.plot(steps, values, marker="o", ms=3, label=f"{trial} {method}{suffix}")
    ax.set_xscale("log")
    ax.set_xticks(sorted({int(s) for steps, _ in curves.values() for s in steps}))
    _plain_log_axes(ax, y=False)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    _legend_outside(ax)
    return _save(fig, path)


def parent_run_id(client: MlflowClient, experiment: str) -> str:
    """The sweep's parent run (see :func:`orchestrator.tracking.sweep_parent_run_id`);
    QueryError if there is none."""
    run_id = sweep_parent_run_id(client, experiment_id(client, experiment), experiment)
    if run_id is None:
        raise QueryError(
            f"experiment {experiment!r} has no sweep parent run (tag {ROLE_TAG}={ROLE_SWEEP}) "
            "to log the analysis to"
        )
    return run_id


def log_report(
    experiment: str,
    tracking_uri: str | None,
    files: Iterable[str | Path],
    *,
    artifact_path: str = ARTIFACT_DIR,
) -> str:
    """Log ``files`` (plots, the fit's JSON) as artifacts of the sweep's parent run under
    ``artifact_path``; returns the parent run id. QueryError if the experiment or its parent
    run is missing; MLflow errors from the upload propagate."""
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    run_id = parent_run_id(client, experiment)
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path)
    log.info("logged analysis artifacts to run %s of %r", run_id, experiment)
    return run_id


def sample_grid_locations(experiment: str, tracking_uri: str | None) -> list[str]:
    """Where each trial's sample grids are (one PNG per eval point, under ``samples/`` of
    its MLflow run): ``trial: N grids in URI``; empty when MLflow does not answer."""
    try:
        client = MlflowClient(resolve_tracking_uri(tracking_uri))
        runs = client.search_runs(
            [experiment_id(client, experiment)], f"tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'"
        )
        lines = []
        for run in sorted(runs, key=lambda r: r.data.tags.get(TRIAL_TAG, "")):
            grids = client.list_artifacts(run.info.run_id, SAMPLES_ARTIFACT_DIR)
            if grids:
                where = f"{run.info.artifact_uri}/{SAMPLES_ARTIFACT_DIR}/".removeprefix("file://")
                if where.startswith(str(Path.cwd()) + "/"):  # mlruns/... beside mlflow.db
                    where = where[len(str(Path.cwd())) + 1 :]
                trial = run.data.tags.get(TRIAL_TAG, run.info.run_id)
                lines.append(f"{trial}: {len(grids)} grids in {where}")
        return lines
    except Exception as error:  # a listing for the user; the fit itself is done
        log.info("sample grids of %r not listed: %s", experiment, error)
        return []
