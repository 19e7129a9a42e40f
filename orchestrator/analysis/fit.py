"""Scaling-law fits with honest uncertainty, the compute-efficient frontier, and tables.

Forms (x is compute C, or parameters N for :func:`fit_by_size`):
- ``henighan``: L(C) = L_inf + (C0/C)^alpha (Henighan et al. 2020, Eq. 1.1);
- ``power``: L(C) = (C0/C)^alpha (Kaplan et al. 2020, Eqs. 1.1-1.3);
- ``chinchilla``: L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, Eq. 2).

All are fitted as Hoffmann et al.'s approach 3 refit by Besiroglu et al. 2024
(arXiv:2404.10102): Huber loss (delta 1e-3) of log residuals in the log-sum-exp
parameterisation, summed over points; a grid of starts; L-BFGS; convergence checked and
reported; unrounded parameters; percentile intervals from a nonparametric bootstrap (points
resampled with replacement). Poorly determined fits come back with ``warnings``, not errors.
The optimiser lives in :mod:`orchestrator.analysis.chinchilla`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from orchestrator.analysis.chinchilla import (
    E_RANGE,
    LSEObjective,
    MultistartResult,
    bootstrap_refits,
    chinchilla_bounds,
    default_starts,
    multistart,
)

log = logging.getLogger(__name__)

__all__ = [
    "FORMS",
    "FitResult",
    "Frontier",
    "compute_frontier",
    "default_starts",
    "fit_by_size",
    "fit_chinchilla",
    "fit_power_law",
    "load_table",
    "optimiser_message",
    "table_columns",
]

FORMS = ("henighan", "power", "chinchilla")
PARAM_NAMES = {
    "henighan": ("L_inf", "C0", "alpha"),
    "power": ("C0", "alpha"),
    "chinchilla": ("E", "A", "B", "alpha", "beta"),
}
# Names of the optimiser's (log-sum-exp) coordinates, in the order of PARAM_NAMES.
_INTERNAL = {
    "henighan": ("log L_inf", "alpha log C0 (centred)", "alpha"),
    "power": ("alpha log C0 (centred)", "alpha"),
    "chinchilla": ("e = log E", "a = log A", "b = log B", "alpha", "beta"),
}
_GRAD_TOL = 1e-6  # converged: projected gradient <= this * LSEObjective.grad_scale


def _formula(form: str, variable: str) -> str:
    if form == "chinchilla":
        return "L(N, D) = E + A/N^alpha + B/D^beta"
    if form == "henighan":
        return f"L({variable}) = L_inf + (C0/{variable})^alpha"
    return f"L({variable}) = (C0/{variable})^alpha"


def _predict(form: str, p: np.ndarray, *x: np.ndarray) -> np.ndarray:
    """Predictions for parameter rows p [..., n_params] (PARAM_NAMES order) at x: [..., n]."""
    p = np.asarray(p, dtype=np.float64)[..., None, :]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if form == "chinchilla":
            n, d = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in x))
            return p[..., 0] + p[..., 1] / n ** p[..., 3] + p[..., 2] / d ** p[..., 4]
        c = np.asarray(x[0], dtype=np.float64)
        term = np.exp(p[..., -1] * (np.log(p[..., -2]) - np.log(c)))  # (C0/C)^alpha
        return p[..., 0] + term if form == "henighan" else term


@dataclass(frozen=True)
class FitResult:
    """One fitted scaling law, its bootstrap intervals and its diagnostics."""

    form: str  # one of FORMS
    params: dict[str, float]  # PARAM_NAMES[form] -> unrounded estimate
    intervals: dict[str, tuple[float, float]]  # percentile bootstrap interval at `level`
    level: float
    n_points: int
    loss: float  # summed Huber loss of log residuals at the optimum
    converged: bool  # optimiser reported success and projected gradient small
    r2_log: float  # R^2 of log(y) against log(prediction); NaN for flat data
    residuals: np.ndarray  # log(y) - log(pred), in input order
    warnings: tuple[str, ...]
    bootstrap: np.ndarray | None  # [B, n_params] parameter samples, columns in params order
    variable: str = "C"  # name of x in the formula: "C" (compute) or "N" (fit_by_size)

    def _x(self, x: tuple) -> tuple[np.ndarray, ...]:
        want = 2 if self.form == "chinchilla" else 1
        if len(x) != want:
            raise ValueError(f"predict for form {self.form!r} takes {want} array(s), got {len(x)}")
        return tuple(np.asarray(v, dtype=np.float64) for v in x)

    def predict(self, *x) -> np.ndarray:
        """L at x: predict(C) for henighan/power, predict(N, D) for chinchilla."""
        p = np.array([self.params[k] for k in PARAM_NAMES[self.form]])
        return _predict(self.form, p, *self._x(x))

    def predict_interval(self, *x, level: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise percentile interval of the prediction over the bootstrap samples
        (NaN without samples)."""
        xs = self._x(x)
        level = self.level if level is None else _check_level(level)
        if self.bootstrap is None or len(self.bootstrap) == 0:
            nan = np.full(np.broadcast_shapes(*(v.shape for v in xs)), np.nan)
            return nan, nan.copy()
        preds = _predict(self.form, self.bootstrap, *xs)  # [B, ...]
        lo, hi = np.nanpercentile(
            preds, [50 * (1 - level), 50 * (1 + level)], axis=0, method="inverted_cdf"
        )
        return lo, hi

    def to_dict(self) -> dict:
        """JSON-ready summary: parameters also at top level; NaN and inf become None."""

        def num(v: float) -> float | None:
            return float(v) if np.isfinite(v) else None

        params = {k: num(v) for k, v in self.params.items()}
        return {
            "form": self.form,
            **params,
            "params": params,
            "intervals": {k: [num(lo), num(hi)] for k, (lo, hi) in self.intervals.items()},
            "level": float(self.level),
            "n_points": int(self.n_points),
            "loss": num(self.loss),
            "converged": bool(self.converged),
            "r2_log": num(self.r2_log),
            "warnings": list(self.warnings),
            "formula": _formula(self.form, self.variable),
        }


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: got {level}; must be in (0, 1)")
    return float(level)


def _positive(name: str, v) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
    if not np.isfinite(a).all():
        bad = np.flatnonzero(~np.isfinite(a))[:10].tolist()
        raise ValueError(f"{name}: contains NaN or inf (at positions {bad})")
    if (a <= 0).any():
        raise ValueError(f"{name}: must be > 0 (a log is taken); got {a[a <= 0][:5].tolist()}")
    return a


def _inputs(names: tuple[str, ...], arrays: tuple, min_points: int) -> list[np.ndarray]:
    out = [_positive(n, a) for n, a in zip(names, arrays, strict=True)]
    lengths = {n: len(a) for n, a in zip(names, out, strict=True)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"length mismatch: {lengths}")
    if len(out[0]) < min_points:
        raise ValueError(f"need at least {min_points} points, got {len(out[0])}")
    return out


def _options(bootstrap: int, level: float, huber_delta: float) -> None:
    if bootstrap < 0:
        raise ValueError(f"bootstrap: got {bootstrap}; must be >= 0")
    _check_level(level)
    if not huber_delta > 0:
        raise ValueError(f"huber_delta: got {huber_delta}; must be > 0")


def _finish(
    form: str,
    objective: LSEObjective,
    opt: MultistartResult,
    lower: np.ndarray,
    upper: np.ndarray,
    natural,
    n_boot: int,
    level: float,
    seed: int,
) -> FitResult:
    """Natural parameters, bootstrap intervals, residuals and warnings for an optimum."""
    names = PARAM_NAMES[form]
    n, p = len(objective.log_y), len(names)
    theta = opt.theta
    est = natural(theta[None])[0]
    resid = -objective.residuals(theta)[0]  # log(y) - log(pred)
    ly = objective.log_y
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    grad_tol = _GRAD_TOL * objective.grad_scale
    converged = opt.success and opt.pgrad <= grad_tol
    warns: list[str] = []
    if not converged:
        warns.append(
            f"the optimiser did not converge: {optimiser_message(opt.message)} (projected "
            f"gradient {opt.pgrad:.3g}, tolerance {grad_tol:.3g}); treat the parameters as "
            "rough"
        )
    if n < 2 * p:
        warns.append(
            f"{n} points for {p} parameters (fewer than 2 per parameter): "
            "the fit is poorly determined"
        )
    flat = bool(np.abs(ly - np.median(ly)).max() <= objective.delta)
    if flat:
        warns.append(
            "the data are flat (every log loss within the Huber delta of the median): "
            "the scale and exponent parameters are not determined"
        )
    regressors = ("N", "D") if form == "chinchilla" else ("x",)
    constant = [v for k, v in enumerate(regressors) if np.ptp(objective.log_x[:, k]) == 0]
    for v in constant:
        warns.append(
            f"every point has the same {v}: the exponent and scale of its term are not determined"
        )
    span = upper - lower
    for i, name in enumerate(_INTERNAL[form]):
        for side, bound in (("lower", lower[i]), ("upper", upper[i])):
            if abs(theta[i] - bound) <= 1e-8 * span[i]:
                warns.append(
                    f"{names[i]} is at the {side} bound of the search "
                    f"({name} = {bound:.6g}): not determined by the data"
                )
    intervals = {k: (float("nan"), float("nan")) for k in names}
    samples = None
    if n_boot > 0:
        boot_theta, ok = bootstrap_refits(
            objective, theta, lower, upper, n_boot, np.random.default_rng(seed)
        )
        samples = natural(boot_theta)
        samples[~ok] = np.nan
        failed = int((~ok).sum())
        if failed:
            warns.append(f"{failed} of {n_boot} bootstrap fits failed and were left out")
        if n <= p:
            warns.append("no more points than parameters: no bootstrap intervals")
        elif flat or constant:
            warns.append("parameters not identifiable: no bootstrap intervals")
        elif failed > n_boot / 2:
            warns.append("most bootstrap fits failed: no bootstrap intervals")
        else:
            q = np.nanpercentile(
                samples, [50 * (1 - level), 50 * (1 + level)], axis=0, method="inverted_cdf"
            )
            intervals = {k: (float(q[0, i]), float(q[1, i])) for i, k in enumerate(names)}
        for i, k in enumerate(names):
            lo, hi = intervals[k]
            if not np.isfinite([lo, hi]).all():
                continue
            span = f"the {level:.0%} interval of {k}, [{lo:.4g}, {hi:.4g}]"
            if lo > 0 and hi > 10 * lo:
                warns.append(f"{span} spans {np.log10(hi / lo):.1f} orders of magnitude")
            elif hi - lo > abs(est[i]):
                warns.append(f"{span} is wider than the estimate {est[i]:.4g}")
    result = FitResult(
        form=form,
        params={k: float(v) for k, v in zip(names, est, strict=True)},
        intervals=intervals,
        level=level,
        n_points=n,
        loss=opt.value * objective.delta,
        converged=converged,
        r2_log=r2,
        residuals=resid,
        warnings=tuple(warns),
        bootstrap=samples,
    )
    log.info("%s fit on %d points: %s, loss %.6g", form, n, result.params, result.loss)
    for w in warns:  # the caller shows them (the CLI prints each once)
        log.info("%s fit: %s", form, w)
    return result


def optimiser_message(message: str) -> str:
    """SciPy's L-BFGS-B status in plain words: ``ABNORMAL: `` (a line search that found no
    lower point) and the other codes become what they mean for the fit."""
    text = message.strip()
    known = {
        "ABNORMAL": "the line search could not lower the loss any further (the optimum is "
        "flat or at a search bound)",
        "STOP: TOTAL NO. OF ITERATIONS": "it stopped at the iteration limit",
        "STOP: TOTAL NO. OF F,G EVALUATIONS": "it stopped at the evaluation limit",
        "NaN": "the loss became non-finite",
        "CONVERGENCE": "it stopped because the loss stopped falling, with the gradient still "
        "above tolerance",
    }
    for key, plain in known.items():
        if text.upper().startswith(key.upper()):
            return plain
    text = re.sub(r"^[A-Z_ ]+:\s*", "", text).rstrip(";. ")
    return text.lower() if text else "no reason given"


def fit_power_law(
    x,
    y,
    *,
    form: str = "henighan",
    bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    huber_delta: float = 1e-3,
) -> FitResult:
    """Fit L(C) = L_inf + (C0/C)^alpha (``henighan``) or L(C) = (C0/C)^alpha (``power``).

    x: [n] compute (or parameters), y: [n] losses; both > 0. Fitted as
    log L = LSE(e, a - alpha log(C/g)) with g the geometric mean of x (for conditioning), so
    L_inf = exp(e) and C0 = g exp(a/alpha); starts on a grid around the data; bounds
    alpha in [1e-3, 10], L_inf within [1e-4 min(y), e^5 max(y)].
    """
    if form not in FORMS:
        raise ValueError(f"form: got {form!r}; allowed: {list(FORMS)}")
    if form == "chinchilla":
        raise ValueError("form 'chinchilla' takes N and D: use fit_chinchilla(n, d, loss)")
    _options(bootstrap, level, huber_delta)
    x, y = _inputs(("x", "y"), (x, y), min_points=2)
    log_g = float(np.log(x).mean())
    ly = np.log(y)
    has_e = form == "henighan"
    objective = LSEObjective((np.log(x) - log_g)[:, None], ly, has_e=has_e, delta=huber_delta)
    a_range = (ly.min() - 50.0, ly.max() + 50.0)
    lower = np.array([a_range[0], 1e-3])
    upper = np.array([a_range[1], 10.0])
    alphas = np.array([0.03, 0.1, 0.3, 1.0, 3.0])
    shifts = np.array([-1.0, 0.0, 1.0])
    y_min, y_med = float(y.min()), float(np.median(y))
    if has_e:
        lower = np.concatenate([[ly.min() - E_RANGE], lower])
        upper = np.concatenate([[ly.max() + 5.0], upper])
        starts = [
            (np.log(frac * y_min), np.log(max(y_med - frac * y_min, 1e-3 * y_med)) + s, al)
            for frac in (1e-3, 0.5, 0.8, 0.95, 0.99)
            for al in alphas
            for s in shifts
        ]
    else:
        starts = [(np.log(y_med) + s, al) for al in alphas for s in shifts]
    opt = multistart(objective, np.array(starts), lower, upper, screen_iter=30, keep=12, n_polish=3)

    def natural(theta: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            c0 = np.exp(log_g + theta[:, -2] / theta[:, -1])
        cols = ([np.exp(theta[:, 0])] if has_e else []) + [c0, theta[:, -1]]
        return np.stack(cols, axis=1)

    return _finish(form, objective, opt, lower, upper, natural, bootstrap, level, seed)


def fit_chinchilla(
    n,
    d,
    loss,
    *,
    bootstrap: int = 200,
    level: float = 0.95,
    seed: int = 0,
    huber_delta: float = 1e-3,
    starts: np.ndarray | None = None,
) -> FitResult:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, Eq. 2; approach 3).

    Minimises sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i) over
    (e, a, b, alpha, beta) = (log E, log A, log B, alpha, beta) from ``starts`` [K, 5] (default:
    :func:`default_starts`, the Chinchilla grid), as refit by Besiroglu et al. 2024, within
    :func:`~orchestrator.analysis.chinchilla.chinchilla_bounds`.
    """
    _options(bootstrap, level, huber_delta)
    n, d, loss = _inputs(("n", "d", "loss"), (n, d, loss), min_points=2)
    starts = default_starts() if starts is None else np.asarray(starts, dtype=np.float64)
    if starts.ndim != 2 or starts.shape[1] != 5 or len(starts) == 0:
        raise ValueError(
            f"starts: expected shape [K, 5] of (e, a, b, alpha, beta), got {starts.shape}"
        )
    ly = np.log(loss)
    objective = LSEObjective(
        np.stack([np.log(n), np.log(d)], axis=1), ly, has_e=True, delta=huber_delta
    )
    lower, upper = chinchilla_bounds(ly)
    opt = multistart(objective, starts, lower, upper)

    def natural(theta: np.ndarray) -> np.ndarray:
        return np.concatenate([np.exp(theta[:, :3]), theta[:, 3:]], axis=1)

    return _finish("chinchilla", objective, opt, lower, upper, natural, bootstrap, level, seed)


@dataclass(frozen=True)
class Frontier:
    """The compute-efficient frontier (Kaplan et al. 2020, Sec. 6.1): points sorted by compute."""

    compute: np.ndarray
    metric: np.ndarray
    group: np.ndarray  # the group (model size) each frontier point comes from

    def fit(self, form: str = "henighan", **kwargs) -> FitResult:
        """fit_power_law of metric against compute along the frontier."""
        return fit_power_law(self.compute, self.metric, form=form, **kwargs)


def compute_frontier(compute, metric, group) -> Frontier:
    """Lower envelope of metric vs compute over groups, as a Pareto set: a point is on it when
    no point with compute <= its compute has a strictly lower metric. Sorted by compute
    (ties by metric, then input order)."""
    c = np.asarray(compute, dtype=np.float64)
    m = np.asarray(metric, dtype=np.float64)
    g = np.asarray(group)
    if not (c.ndim == m.ndim == g.ndim == 1 and len(c) == len(m) == len(g)):
        raise ValueError(
            f"compute, metric, group: expected 1-D arrays of one length, got "
            f"shapes {c.shape}, {m.shape}, {g.shape}"
        )
    for name, a in (("compute", c), ("metric", m)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: contains NaN or inf")
    if len(c) == 0:
        return Frontier(c, m, g)
    order = np.lexsort((np.arange(len(c)), m, c))
    c, m, g = c[order], m[order], g[order]
    _, first, which = np.unique(c, return_index=True, return_inverse=True)
    tie_min = np.minimum.reduceat(m, first)  # lowest metric at each distinct compute
    before = np.concatenate([[np.inf], np.minimum.accumulate(tie_min)[:-1]])
    on = (m == tie_min[which]) & (tie_min[which] <= before[which])
    return Frontier(c[on], m[on], g[on])


def fit_by_size(params, compute, metric, *, form: str = "henighan", **kwargs) -> FitResult:
    """L(N): for each distinct model size N the metric at its largest compute (lowest metric
    on ties), fitted with fit_power_law in N. The parameters keep their names: L_inf, C0 and
    alpha, with C0 meaning N0 (L(N) = L_inf + (N0/N)^alpha); ``variable`` is "N"."""
    n, c, m = _inputs(("params", "compute", "metric"), (params, compute, metric), min_points=2)
    order = np.lexsort((m, -c, n))  # by size; within a size, largest compute then lowest metric
    sizes, first = np.unique(n[order], return_index=True)
    result = fit_power_law(sizes, m[order][first], form=form, **kwargs)
    return replace(result, variable="N")


def load_table(path: str | Path) -> pa.Table:
    """A .csv, .tsv or .parquet file as an Arrow table."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".parquet"):
        raise ValueError(
            f"{path}: unsupported table format {suffix or '(none)'!r}; use .csv, .tsv or .parquet"
        )
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        delimiter = "\t" if suffix == ".tsv" else ","
        return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))
    except pa.ArrowException as e:
        raise ValueError(f"{path}: cannot read as {suffix[1:]}: {e}") from e


def table_columns(table: pa.Table, *names: str) -> list[np.ndarray]:
    """The named columns as float64 arrays (nulls become NaN)."""
    out = []
    for name in names:
        if name not in table.column_names:
            raise ValueError(f"column {name!r} not in table; available: {table.column_names}")
        column = table.column(name)
        try:
            column = pc.cast(column, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ValueError(f"column {name!r} is not numeric ({column.type})") from e
        out.append(column.to_numpy(zero_copy_only=False).astype(np.float64))
    return out
