"""The optimiser behind the scaling-law fits: sums of power laws in log-sum-exp form.

Every form fitted by :mod:`orchestrator.analysis.fit` is a special case of

    log L = LSE(e, a_1 - alpha_1 log X_1, ..., a_m - alpha_m log X_m)
          = log(E + A_1/X_1^alpha_1 + ... + A_m/X_m^alpha_m),  E = exp(e), A_k = exp(a_k),

the Chinchilla parameterisation (Hoffmann et al. 2022, Sec. 3.3 and App. D.2; m = 2, X = (N, D)),
with Henighan et al. 2020's L_inf + (C0/C)^alpha as m = 1 and Kaplan et al. 2020's (C0/C)^alpha
as m = 1 without e. The objective is the Huber loss (delta 1e-3) of the log residuals, summed
over points, not averaged (Besiroglu et al. 2024, arXiv:2404.10102, Sec. 2).

Minimisation from a grid of starts is vectorised: :func:`batched_lbfgs` runs projected L-BFGS
on all starts at once (one [K, n, terms] numpy evaluation per step, analytic gradients),
:func:`multistart` prunes to the best starts after a screening phase and polishes the best few
with scipy's L-BFGS-B. :func:`reference_multistart` is the plain per-start scipy loop it is
checked against (tests, ``benchmarks/chinchilla_fit.py``).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

log = logging.getLogger(__name__)

__all__ = [
    "POLISH_OPTIONS",
    "LSEObjective",
    "MultistartResult",
    "batched_lbfgs",
    "bootstrap_refits",
    "chinchilla_bounds",
    "default_starts",
    "multistart",
    "reference_multistart",
]

# Tighter than scipy's defaults (ftol 2.2e-9, gtol 1e-5): the loss ends within ~1e-13 of the
# optimum. The gradient tolerance is relative to LSEObjective.grad_scale; maxls 50 (default 20)
# because near an optimum the kinks of the Huber loss can need more backtracking than 20 steps.
POLISH_OPTIONS = {"maxiter": 20_000, "maxfun": 40_000, "ftol": 1e-13, "gtol": 1e-8, "maxls": 50}
BOOT_STARTS = 4  # per resample: the full-data optimum, it with E at its lower bound, perturbations
BOOT_ITER = 100  # batched L-BFGS steps on the resamples; scipy finishes the rare slow one
# E (and L_inf) are searched down to 1e-4 * min(y): an irreducible loss that small cannot be told
# from 0, and the search does not crawl along the valley towards E = 0.
E_RANGE = float(np.log(1e4))


def chinchilla_bounds(log_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Search box for (e, a, b, alpha, beta): E in [1e-4 min(L), e^5 max(L)], a and b in
    [-50, 150], alpha and beta in [0, 10]."""
    lower = np.array([np.min(log_y) - E_RANGE, -50.0, -50.0, 0.0, 0.0])
    upper = np.array([np.max(log_y) + 5.0, 150.0, 150.0, 10.0, 10.0])
    return lower, upper


def default_starts() -> np.ndarray:
    """The Chinchilla grid of starting points (Hoffmann et al. 2022, App. D.2), as used by
    Besiroglu et al. 2024: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
    a, b in {0, 5, ..., 25}. Rows of (e, a, b, alpha, beta): [4500, 5]."""
    exps = np.arange(0.0, 2.5, 0.5)
    es = np.arange(-1.0, 1.5, 0.5)
    coefs = np.arange(0.0, 30.0, 5.0)
    return np.array(list(itertools.product(es, coefs, coefs, exps, exps)), dtype=np.float64)


class LSEObjective:
    """Summed Huber loss of log residuals of an LSE power-law model, divided by delta.

    Parameters theta are laid out as [e,] a_1..a_m, alpha_1..alpha_m. Dividing by delta keeps
    the objective O(sum |r|) and its gradient O(n) whatever delta is; multiply by delta for the
    loss of Besiroglu et al. 2024 (Eq. 2: sum_i Huber_delta(r_i)).

    log_x: [n, m] logs of the regressors; log_y: [n] logs of the losses; weights: optional
    [K, n] per-row multiplicities (bootstrap resamples), row k of a batch using weights[rows[k]].
    """

    def __init__(
        self,
        log_x: np.ndarray,
        log_y: np.ndarray,
        *,
        has_e: bool,
        delta: float,
        weights: np.ndarray | None = None,
    ) -> None:
        self.log_x = np.asarray(log_x, dtype=np.float64).reshape(len(log_y), -1)  # [n, m]
        self.log_y = np.asarray(log_y, dtype=np.float64)  # [n]
        self.m = self.log_x.shape[1]
        self.has_e = has_e
        self.delta = float(delta)
        self.weights = weights
        self.n_params = int(has_e) + 2 * self.m

    def with_weights(self, weights: np.ndarray) -> LSEObjective:
        """The same data with per-row multiplicities [K, n]."""
        return LSEObjective(
            self.log_x, self.log_y, has_e=self.has_e, delta=self.delta, weights=weights
        )

    @property
    def grad_scale(self) -> float:
        """Size of the gradient when every residual pulls one way: n * max(1, max |log x|)."""
        return len(self.log_y) * max(1.0, float(np.abs(self.log_x).max(initial=0.0)))

    def options(self) -> dict:
        """POLISH_OPTIONS with the gradient tolerance scaled to this problem."""
        return {**POLISH_OPTIONS, "gtol": POLISH_OPTIONS["gtol"] * self.grad_scale}

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        """log(pred) - log(y): [K, n] for theta [K, p]."""
        return self._lse(np.atleast_2d(theta))[0] - self.log_y

    def _lse(self, theta: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """LSE over the terms [K, n], the terms' exp(u - max) (each [K, n]) and their sum."""
        off = int(self.has_e)
        u = [
            theta[:, off + k, None] - theta[:, off + self.m + k, None] * self.log_x[:, k]
            for k in range(self.m)
        ]  # a_k - alpha_k log X_k, each [K, n]
        if self.has_e:
            u.insert(0, np.broadcast_to(theta[:, :1], u[0].shape))
        top = u[0]
        for term in u[1:]:
            top = np.maximum(top, term)
        ex = [np.exp(term - top) for term in u]
        total = ex[0]
        for term in ex[1:]:
            total = total + term
        return top + np.log(total), ex, total

    def value_grad(
        self, theta: np.ndarray, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Objective [K] and its gradient [K, p] at theta [K, p]."""
        lse, ex, total = self._lse(theta)
        r = (lse - self.log_y) / self.delta  # [K, n], in units of delta
        absr = np.abs(r)
        h = np.where(absr <= 1.0, 0.5 * r * r, absr - 0.5)  # Huber / delta^2
        psi = np.clip(r, -1.0, 1.0)  # its derivative in r / delta
        if self.weights is not None:
            w = self.weights if rows is None else self.weights[rows]
            h *= w
            psi *= w
        f = h.sum(axis=1) * self.delta
        psi /= total
        q = [psi * term for term in ex]  # psi times each term's softmax weight, [K, n]
        off = int(self.has_e)
        grad = [qj.sum(axis=1) for qj in q]  # d/de, d/da_k
        grad += [-np.einsum("kn,n->k", q[off + k], self.log_x[:, k]) for k in range(self.m)]
        return f, np.stack(grad, axis=1)

    def single(self, theta: np.ndarray, row: int | None = None) -> tuple[float, np.ndarray]:
        """value_grad for one parameter vector (scipy's fun with jac=True)."""
        rows = None if row is None else np.array([row])
        f, g = self.value_grad(theta[None], rows)
        return float(f[0]), g[0]


@dataclass
class BatchResult:
    """Where each row of a batched L-BFGS run ended."""

    x: np.ndarray  # [K, p]
    f: np.ndarray  # [K]
    pgrad: np.ndarray  # [K] inf-norm of the projected gradient
    converged: np.ndarray  # [K] bool: gradient or relative-decrease test met
    iterations: int


def _blocked(x: np.ndarray, g: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Components at a bound whose gradient pushes out of the box [lower, upper]."""
    return ((x <= lower) & (g > 0)) | ((x >= upper) & (g < 0))


def projected_gradient(x: np.ndarray, g: np.ndarray, lower: np.ndarray, upper: np.ndarray):
    """The gradient with the components pushing out of the box zeroed."""
    return np.where(_blocked(x, g, lower, upper), 0.0, g)


def _two_loop(g, s_hist, y_hist, rho, gamma):
    """L-BFGS two-loop recursion (Nocedal & Wright, Alg. 7.4) for every row: H g, [K, p].
    History [K, mem, p], newest last; unused slots have rho = 0 and contribute nothing."""
    q = g.copy()
    coef = np.zeros(rho.shape)
    for i in range(rho.shape[1] - 1, -1, -1):
        coef[:, i] = rho[:, i] * np.einsum("kp,kp->k", s_hist[:, i], q)
        q -= coef[:, i, None] * y_hist[:, i]
    r = gamma[:, None] * q
    for i in range(rho.shape[1]):
        b = rho[:, i] * np.einsum("kp,kp->k", y_hist[:, i], r)
        r += (coef[:, i] - b)[:, None] * s_hist[:, i]
    return r


def _weak_wolfe(objective, rows, x, f, g, d, lower, upper, c1=1e-4, c2=0.9, max_steps=40):
    """Weak Wolfe line search by bisection and doubling (Lewis & Overton 2013, robust at the
    kinks of the Huber loss) along the projected path clip(x + t d), for every row at once.
    Returns the new points, values, gradients and a mask of rows where a step was found."""
    k = len(x)
    t, t_lo, t_hi = np.ones(k), np.zeros(k), np.full(k, np.inf)
    xn, fn, gn = x.copy(), np.full(k, np.inf), np.zeros_like(x)
    found = np.zeros(k, dtype=bool)  # an Armijo step is stored in xn
    pending = np.ones(k, dtype=bool)
    for _ in range(max_steps):
        sel = np.flatnonzero(pending)
        if sel.size == 0:
            break
        trial = np.clip(x[sel] + t[sel, None] * d[sel], lower, upper)
        ft, gt = objective.value_grad(trial, rows[sel])
        step = trial - x[sel]
        slope = np.einsum("kp,kp->k", g[sel], step)
        armijo = np.isfinite(ft) & (ft <= f[sel] + c1 * slope)
        stalled = armijo & found[sel] & (np.abs(trial - xn[sel]).max(axis=1) == 0)  # at a bound
        curv = np.einsum("kp,kp->k", gt, step) >= c2 * slope
        store = sel[armijo]
        xn[store], fn[store], gn[store] = trial[armijo], ft[armijo], gt[armijo]
        found[store] = True
        pending[sel[(armijo & curv) | stalled]] = False
        shrink, grow = sel[~armijo], sel[armijo & ~curv & ~stalled]
        t_hi[shrink] = t[shrink]
        t_lo[grow] = t[grow]
        t[shrink] = 0.5 * (t_lo[shrink] + t_hi[shrink])
        t[grow] = np.where(np.isinf(t_hi[grow]), 2.0 * t[grow], 0.5 * (t_lo[grow] + t_hi[grow]))
    return xn, fn, gn, found


def batched_lbfgs(
    objective: LSEObjective,
    x0: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    *,
    max_iter: int = 1000,
    memory: int = 10,
    ftol: float = 1e-13,
    gtol: float = 1e-9,
    rows: np.ndarray | None = None,
) -> BatchResult:
    """Projected L-BFGS with a weak Wolfe line search on every row of x0 [K, p] at once.

    Rows stop independently: converged when the projected gradient's inf-norm is <= gtol or the
    decrease is <= ftol * max(|f|, 1) (scipy's L-BFGS-B tests); stopped unconverged when the
    line search fails from steepest descent. ``rows`` maps batch rows to objective weight rows.
    """
    k_rows, p = x0.shape
    rows = np.arange(k_rows) if rows is None else rows
    x = np.clip(x0, lower, upper)
    f, g = objective.value_grad(x, rows)
    s_hist = np.zeros((k_rows, memory, p))
    y_hist = np.zeros((k_rows, memory, p))
    rho = np.zeros((k_rows, memory))
    gamma = np.zeros(k_rows)  # 0: no curvature pair yet
    converged = np.zeros(k_rows, dtype=bool)
    active = np.isfinite(f) & np.isfinite(g).all(axis=1)
    pgrad = np.full(k_rows, np.inf)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (reported)
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        xa, fa, ga = x[idx], f[idx], g[idx]
        blocked = _blocked(xa, ga, lower, upper)
        gp = np.where(blocked, 0.0, ga)
        pgrad[idx] = np.abs(gp).max(axis=1)
        done = pgrad[idx] <= gtol
        converged[idx[done]] = True
        active[idx[done]] = False
        keep = ~done
        idx, xa, fa, gp, blocked = idx[keep], xa[keep], fa[keep], gp[keep], blocked[keep]
        if idx.size == 0:
            break
        fresh = gamma[idx] == 0
        scale = np.where(fresh, 1.0 / np.maximum(np.linalg.norm(gp, axis=1), 1e-300), gamma[idx])
        d = -_two_loop(gp, s_hist[idx], y_hist[idx], rho[idx], scale)
        d[blocked] = 0.0  # variables held at a bound stay there
        slope = np.einsum("kp,kp->k", gp, d)
        bad = ~(slope < 0)  # not a descent direction: restart from steepest descent
        d[bad] = -gp[bad] * scale[bad, None]
        fresh |= bad
        xn, fn, gn, found = _weak_wolfe(objective, rows[idx], xa, fa, gp, d, lower, upper)
        failed = ~found
        # A failed line search restarts the row's memory; a failed steepest step ends the row.
        stop = failed & fresh
        active[idx[stop]] = False
        restart = idx[failed & ~fresh]
        gamma[restart], rho[restart] = 0.0, 0.0
        moved = ~failed
        im = idx[moved]
        s = xn[moved] - xa[moved]
        y = gn[moved] - g[im]
        sy = np.einsum("kp,kp->k", s, y)
        yy = np.einsum("kp,kp->k", y, y)
        curv = sy > 1e-12 * np.maximum(yy, 1e-300)
        upd = im[curv]
        s_hist[upd] = np.concatenate([s_hist[upd, 1:], s[curv, None]], axis=1)
        y_hist[upd] = np.concatenate([y_hist[upd, 1:], y[curv, None]], axis=1)
        rho[upd] = np.concatenate([rho[upd, 1:], 1.0 / sy[curv, None]], axis=1)
        gamma[upd] = sy[curv] / yy[curv]
        small = fa[moved] - fn[moved] <= ftol * np.maximum(np.abs(fa[moved]), 1.0)
        x[im], f[im], g[im] = xn[moved], fn[moved], gn[moved]
        converged[im[small]] = True
        active[im[small]] = False
    pgrad = np.abs(projected_gradient(x, g, lower, upper)).max(axis=1)
    return BatchResult(x=x, f=f, pgrad=pgrad, converged=converged, iterations=it)


@dataclass
class MultistartResult:
    """The best optimum found from a set of starts."""

    theta: np.ndarray  # [p]
    value: float  # objective (summed Huber / delta)
    success: bool  # scipy's L-BFGS-B reported success
    pgrad: float  # inf-norm of the projected gradient at theta
    message: str
    n_starts: int


def _lbfgsb(objective: LSEObjective, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray):
    """One scipy L-BFGS-B run with the analytic gradient and objective.options()."""
    bounds = list(zip(lower, upper, strict=True))
    return minimize(
        objective.single,
        x0,
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options=objective.options(),
    )


def polish(
    objective: LSEObjective, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray, retries: int = 2
):
    """scipy L-BFGS-B from x0, restarted from where it stopped (fresh memory) when the line
    search gave up, which the kinks of the Huber loss can cause."""
    res = _lbfgsb(objective, x0, lower, upper)
    for _ in range(retries):
        if res.success:
            break
        res = _lbfgsb(objective, res.x, lower, upper)
    return res


def _result(objective, res, lower, upper, n_starts) -> MultistartResult:
    f, g = objective.single(res.x)
    pg = float(np.abs(projected_gradient(res.x, g, lower, upper)).max())
    return MultistartResult(res.x, f, bool(res.success), pg, str(res.message), n_starts)


def _best_rows(f: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k lowest finite values, lowest first."""
    order = np.argsort(np.where(np.isfinite(f), f, np.inf), kind="stable")[:k]
    return order[np.isfinite(f[order])]


def multistart(
    objective: LSEObjective,
    starts: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    *,
    screen_iter: int = 60,
    keep: int = 32,
    n_polish: int = 4,
) -> MultistartResult:
    """Best optimum over ``starts`` [K, p], by successive halving: batched L-BFGS on all
    starts for screen_iter / 3 steps, the best quarter (at least 4 * keep) on for the rest of
    ``screen_iter``, the best ``keep`` on to convergence, and the best ``n_polish`` distinct
    ones polished with scipy's L-BFGS-B; the lowest polished objective wins."""
    x = np.clip(np.asarray(starts, dtype=np.float64), lower, upper)
    first = screen_iter // 3
    for iters, k in ((first, max(4 * keep, len(x) // 4)), (screen_iter - first, keep)):
        run = batched_lbfgs(objective, x, lower, upper, max_iter=iters)
        x = run.x[_best_rows(run.f, k)]
        if len(x) == 0:
            raise ValueError("the objective is not finite at any start")
    gtol = objective.options()["gtol"]
    run = batched_lbfgs(objective, x, lower, upper, max_iter=2000, gtol=gtol)
    chosen: list[np.ndarray] = []
    for i in _best_rows(run.f, len(x)):
        if len(chosen) < n_polish and all(np.abs(run.x[i] - c).max() > 1e-6 for c in chosen):
            chosen.append(run.x[i])
    results = [polish(objective, c, lower, upper) for c in chosen]
    res = min(results, key=lambda r: r.fun)
    log.debug("multistart: %d starts, best %.12g (%s)", len(starts), res.fun, res.message)
    return _result(objective, res, lower, upper, len(starts))


def bootstrap_refits(
    objective: LSEObjective,
    theta: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    n_boot: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Refits on n_boot resamples of the points (with replacement), all in one batch, each
    warm-started from theta, theta with E (L_inf) at its lower bound, and perturbations of
    theta (Besiroglu et al. 2024, Sec. 3); the lowest start of each resample is kept.
    Returns internal parameters [n_boot, p] and a mask of the fits that converged."""
    n = len(objective.log_y)
    picks = rng.integers(0, n, size=(n_boot, n))
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], picks), 1.0)  # multiplicities [n_boot, n]
    x0 = np.repeat(theta[None], n_boot * BOOT_STARTS, axis=0)  # [n_boot * S, p]
    noise = rng.normal(0.0, 0.05, size=x0.shape) * np.maximum(np.abs(theta), 1.0)
    noise[::BOOT_STARTS] = 0.0
    if objective.has_e:  # a resample without an irreducible loss ends in a long, slow valley
        noise[1::BOOT_STARTS] = 0.0  # towards E = 0: this start begins at its end
        x0[1::BOOT_STARTS, 0] = lower[0]
    boot_obj = objective.with_weights(np.repeat(counts, BOOT_STARTS, axis=0))
    gtol = objective.options()["gtol"]
    run = batched_lbfgs(boot_obj, x0 + noise, lower, upper, max_iter=BOOT_ITER, gtol=gtol)
    f = np.where(np.isfinite(run.f), run.f, np.inf).reshape(n_boot, BOOT_STARTS)
    rows = np.arange(n_boot) * BOOT_STARTS + f.argmin(axis=1)
    theta_b, ok = run.x[rows], run.converged[rows] & np.isfinite(run.f[rows])
    for i in np.flatnonzero(~ok & np.isfinite(run.f[rows])):  # the slow few: scipy finishes
        res = polish(objective.with_weights(counts[i : i + 1]), theta_b[i], lower, upper)
        theta_b[i], ok[i] = res.x, bool(res.success) and np.isfinite(res.fun)
    return theta_b, ok


def reference_multistart(
    objective: LSEObjective, starts: np.ndarray, lower: np.ndarray, upper: np.ndarray
) -> MultistartResult:
    """The plain loop: scipy L-BFGS-B (analytic gradient, objective.options()) from every start,
    keeping the lowest objective. The check on :func:`multistart`; slow by design."""
    best = None
    for x0 in np.clip(np.asarray(starts, dtype=np.float64), lower, upper):
        res = _lbfgsb(objective, x0, lower, upper)
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    if best is None:
        raise ValueError("the objective is not finite at any start")
    return _result(objective, best, lower, upper, len(starts))
