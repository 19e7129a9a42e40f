"""Compute-optimal model size: IsoFLOP profiles (Hoffmann et al. 2022, approach 2) and the
same allocation exponent read off an L(N, D) fit (approach 3).

Approach 2: at each compute budget C, several sizes N are trained to C. A parabola in
x = ln N is fitted to the loss of each profile, L(x) ~ c2 x^2 + c1 x + c0; its minimum
x* = -c1 / (2 c2) is ln N_opt(C) when c2 > 0 and both x* and the smallest sampled loss lie
inside the sizes sampled (a minimum at the smallest or largest size does not locate N_opt:
widen the sizes). Then
ln N_opt = ln k + a ln C is fitted by least squares over the budgets, N_opt = k C^a.
Hoffmann et al. report a = 0.49 this way.

Approach 3: from L(N, D) = E + A/N^alpha + B/D^beta with D proportional to C / N, minimising
L at fixed C gives N_opt proportional to C^(beta / (alpha + beta)) (Hoffmann et al. 2022,
Eq. 4); Besiroglu et al.'s refit gives 0.513.

Uncertainty on a (approach 2) comes from a parametric bootstrap: the noise sigma of the loss
is the pooled residual scatter of the parabolas (n - 3 degrees of freedom per profile); each
replicate adds N(0, sigma^2) to the fitted losses, refits every parabola and the power law,
and the percentile interval of a is reported. Profiles with no residual degrees of freedom
(exactly three sizes everywhere) give no interval and say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from orchestrator.analysis.fit import FitResult

__all__ = ["ComputeOptimal", "IsoFlopProfile", "chinchilla_allocation", "fit_isoflop"]

MIN_SIZES = 3  # a parabola needs three sizes


@dataclass(frozen=True)
class IsoFlopProfile:
    """Loss against parameters at one compute budget, and the parabola's minimum."""

    compute: float  # the budget C in FLOPs
    params: np.ndarray  # [K] N of each size, sorted
    metric: np.ndarray  # [K] the loss of each size at C
    coefficients: tuple[float, float, float] | None  # (c2, c1, c0) in x = ln N
    n_opt: float | None  # exp(x*) when the minimum lies inside the sampled sizes
    warning: str | None  # why there is no N_opt, when there is none

    def curve(self, points: int = 100) -> tuple[np.ndarray, np.ndarray]:
        """The fitted parabola over the sampled sizes: N [points], L [points] (for plots)."""
        if self.coefficients is None:
            return np.array([]), np.array([])
        x = np.linspace(np.log(self.params[0]), np.log(self.params[-1]), points)
        return np.exp(x), np.polyval(self.coefficients, x)


@dataclass(frozen=True)
class ComputeOptimal:
    """N_opt = k C^a over the IsoFLOP profiles, with a bootstrap interval on a."""

    profiles: tuple[IsoFlopProfile, ...]
    exponent: float  # a (NaN when fewer than two budgets locate N_opt)
    coefficient: float  # k
    interval: tuple[float, float]  # percentile interval of a at `level` (NaN if none)
    level: float
    warnings: tuple[str, ...]
    bootstrap: np.ndarray | None  # [B] bootstrap samples of a

    @property
    def located(self) -> list[IsoFlopProfile]:
        """The profiles whose minimum lies inside their sizes."""
        return [p for p in self.profiles if p.n_opt is not None]

    def predict(self, compute: float | np.ndarray) -> np.ndarray:
        """N_opt at ``compute``."""
        return self.coefficient * np.asarray(compute, dtype=np.float64) ** self.exponent

    def to_dict(self) -> dict:
        """JSON-ready summary; NaN becomes None."""

        def num(v: float | None) -> float | None:
            return float(v) if v is not None and np.isfinite(v) else None

        return {
            "form": "isoflop",
            "formula": "N_opt(C) = k C^a",
            "a": num(self.exponent),
            "k": num(self.coefficient),
            "interval": [num(self.interval[0]), num(self.interval[1])],
            "level": self.level,
            "profiles": [
                {
                    "compute": p.compute,
                    "params": p.params.tolist(),
                    "metric": p.metric.tolist(),
                    "n_opt": num(p.n_opt),
                    "warning": p.warning,
                }
                for p in self.profiles
            ],
            "warnings": list(self.warnings),
        }


def _parabola(
    compute: float, x: np.ndarray, y: np.ndarray
) -> tuple[tuple[float, float, float] | None, float | None, str | None]:
    """(coefficients, x*, warning) of one profile; x = ln N sorted, y the losses."""
    sizes = len(np.unique(x))
    if sizes < MIN_SIZES:
        return (
            None,
            None,
            (
                f"budget {compute:.3g} FLOPs: {sizes} size(s), a parabola needs {MIN_SIZES}: "
                "train more sizes at this budget"
            ),
        )
    c2, c1, c0 = np.polyfit(x, y, 2)
    coefficients = (float(c2), float(c1), float(c0))
    if not c2 > 0:
        return (
            coefficients,
            None,
            (
                f"budget {compute:.3g} FLOPs: the loss has no minimum over these sizes (it is "
                "concave in log N): widen the sizes"
            ),
        )
    x_star = -c1 / (2 * c2)
    best = int(np.argmin(y))  # the sampled minimum must be inside too, not only the parabola's
    if x_star <= x[0] or best == 0:
        return (
            coefficients,
            None,
            (
                f"budget {compute:.3g} FLOPs: the minimum lies at or below the smallest size "
                f"({np.exp(x[0]):.3g} parameters): add smaller sizes"
            ),
        )
    if x_star >= x[-1] or best == len(x) - 1:
        return (
            coefficients,
            None,
            (
                f"budget {compute:.3g} FLOPs: the minimum lies at or above the largest size "
                f"({np.exp(x[-1]):.3g} parameters): add larger sizes"
            ),
        )
    return coefficients, float(x_star), None


def _power_law(log_c: np.ndarray, log_n: np.ndarray) -> tuple[float, float]:
    """(a, ln k) of ln N_opt = ln k + a ln C by least squares."""
    a, log_k = np.polyfit(log_c, log_n, 1)
    return float(a), float(log_k)


def _group(compute: np.ndarray) -> list[np.ndarray]:
    """Indices of the points of each budget, budgets ascending."""
    return [np.flatnonzero(compute == c) for c in np.unique(compute)]


def fit_isoflop(
    compute: Sequence[float] | np.ndarray,
    params: Sequence[float] | np.ndarray,
    metric: Sequence[float] | np.ndarray,
    *,
    bootstrap: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> ComputeOptimal:
    """IsoFLOP profiles and N_opt = k C^a (Hoffmann et al. 2022, approach 2).

    ``compute`` is each point's budget (points of one profile share it exactly: pass the
    nominal budget of the grid cell, not the FLOPs a cell happened to reach), ``params`` its
    model size N and ``metric`` its loss. Degenerate profiles (fewer than three sizes, no
    interior minimum) come back with a warning and are left out of the power law.
    """
    c, n, y = (np.asarray(v, dtype=np.float64).ravel() for v in (compute, params, metric))
    if not (len(c) == len(n) == len(y)):
        raise ValueError(
            f"compute, params and metric differ in length: {len(c)}, {len(n)}, {len(y)}"
        )
    if not (np.isfinite(c).all() and np.isfinite(n).all() and np.isfinite(y).all()):
        raise ValueError("compute, params and metric must be finite")
    if (c <= 0).any() or (n <= 0).any():
        raise ValueError("compute and params must be positive")
    if not 0 < level < 1:
        raise ValueError(f"level: must lie in (0, 1), got {level}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap: must be >= 0, got {bootstrap}")

    groups = [g[np.argsort(n[g], kind="stable")] for g in _group(c)]
    profiles, fitted, dof, sse = [], [], 0, 0.0
    for g in groups:
        x = np.log(n[g])
        coefficients, x_star, warning = _parabola(float(c[g[0]]), x, y[g])
        profiles.append(
            IsoFlopProfile(
                compute=float(c[g[0]]),
                params=n[g],
                metric=y[g],
                coefficients=coefficients,
                n_opt=None if x_star is None else float(np.exp(x_star)),
                warning=warning,
            )
        )
        if coefficients is not None:
            pred = np.polyval(coefficients, x)
            fitted.append(pred)
            sse += float(np.sum((y[g] - pred) ** 2))
            dof += len(g) - MIN_SIZES
        else:
            fitted.append(None)
    warnings = [p.warning for p in profiles if p.warning]
    located = [(i, p) for i, p in enumerate(profiles) if p.n_opt is not None]
    nan2 = (float("nan"), float("nan"))
    if len(located) < 2:
        warnings.append(
            f"{len(located)} budget(s) locate N_opt; the power law needs 2 or more: add budgets "
            "or sizes around the minimum"
        )
        return ComputeOptimal(
            profiles=tuple(profiles),
            exponent=float("nan"),
            coefficient=float("nan"),
            interval=nan2,
            level=level,
            warnings=tuple(warnings),
            bootstrap=None,
        )
    log_c = np.log([p.compute for _, p in located])
    a, log_k = _power_law(log_c, np.log([p.n_opt for _, p in located]))

    samples = _bootstrap(groups, n, fitted, located, sse, dof, bootstrap, seed)
    interval = nan2
    if samples is None:
        warnings.append(
            "no interval on a: every parabola passes exactly through its points (3 sizes per "
            "budget leave no residual to estimate the noise): add sizes per budget"
        )
    elif len(samples) < max(bootstrap // 2, 1):
        warnings.append(
            f"only {len(samples)} of {bootstrap} bootstrap replicates located N_opt at 2+ "
            "budgets: the interval on a is unreliable"
        )
    if samples is not None and len(samples):
        lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
        interval = (float(lo), float(hi))
    return ComputeOptimal(
        profiles=tuple(profiles),
        exponent=a,
        coefficient=float(np.exp(log_k)),
        interval=interval,
        level=level,
        warnings=tuple(warnings),
        bootstrap=samples,
    )


def _bootstrap(groups, n, fitted, located, sse, dof, replicates, seed) -> np.ndarray | None:
    """Parametric bootstrap samples of a (see the module docstring); None without noise
    degrees of freedom."""
    if replicates == 0:
        return np.array([])
    if dof == 0 or sse == 0.0:
        return None
    sigma = np.sqrt(sse / dof)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(replicates):
        log_c, log_n = [], []
        for i, profile in located:
            x = np.log(n[groups[i]])
            y = fitted[i] + rng.normal(0.0, sigma, size=len(x))
            _, x_star, _ = _parabola(profile.compute, x, y)
            if x_star is not None:
                log_c.append(np.log(profile.compute))
                log_n.append(x_star)
        if len(log_c) >= 2:
            samples.append(_power_law(np.array(log_c), np.array(log_n))[0])
    return np.array(samples)


def chinchilla_allocation(fit: FitResult) -> tuple[float, tuple[float, float]]:
    """a = beta / (alpha + beta) from an L(N, D) fit (Hoffmann et al. 2022, Eq. 4), with the
    percentile interval over the fit's bootstrap samples (NaN without them)."""
    if fit.form != "chinchilla":
        raise ValueError(f"fit: needs a 'chinchilla' L(N, D) fit, got form {fit.form!r}")
    alpha, beta = fit.params["alpha"], fit.params["beta"]
    a = beta / (alpha + beta)
    if fit.bootstrap is None or len(fit.bootstrap) == 0:
        return a, (float("nan"), float("nan"))
    names = list(fit.params)
    boot = fit.bootstrap[:, names.index("beta")] / (
        fit.bootstrap[:, names.index("alpha")] + fit.bootstrap[:, names.index("beta")]
    )
    boot = boot[np.isfinite(boot)]
    lo, hi = np.percentile(boot, [50 * (1 - fit.level), 50 * (1 + fit.level)])
    return float(a), (float(lo), float(hi))
