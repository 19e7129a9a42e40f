"""IsoFLOP profiles and the compute-optimal exponent, on data drawn from a known
Chinchilla law (Besiroglu et al. 2024's refit), where N_opt grows as C^(beta/(alpha+beta))."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.analysis.fit import fit_chinchilla
from orchestrator.analysis.isoflop import chinchilla_allocation, fit_isoflop

E, A, B, ALPHA, BETA = 1.8172, 482.01, 2085.43, 0.3478, 0.3658
TRUE_A = BETA / (ALPHA + BETA)  # 0.5126
LADDER = np.geomspace(1e7, 3e10, 25)
BUDGETS = (1e18, 1e19, 1e20, 1e21)


def chinchilla_loss(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return E + A / n**ALPHA + B / d**BETA


def n_opt(compute: float) -> float:
    """argmin_N L(N, C / (6N)) in closed form (Hoffmann et al. 2022, Eq. 4)."""
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    return g * (compute / 6) ** TRUE_A


def isoflop_grid(seed: int, noise: float = 0.003, sizes: int = 7):
    """At each budget, the ``sizes`` ladder sizes nearest N_opt (as a researcher would pick
    them), their losses with log-normal noise."""
    rng = np.random.default_rng(seed)
    compute, params, loss = [], [], []
    for c in BUDGETS:
        nearest = np.argsort(np.abs(np.log(LADDER / n_opt(c))))[:sizes]
        for n in LADDER[np.sort(nearest)]:
            compute.append(c)
            params.append(n)
            loss.append(chinchilla_loss(n, c / (6 * n)) * math.exp(rng.normal(0, noise)))
    return np.array(compute), np.array(params), np.array(loss)


def test_profiles_locate_the_true_optimum_and_recover_the_exponent() -> None:
    result = fit_isoflop(*isoflop_grid(seed=0), bootstrap=200, seed=1)
    assert result.warnings == ()
    assert len(result.located) == len(BUDGETS)
    for profile in result.profiles:
        # the parabola's minimum sits near the closed-form optimum (one ladder step apart)
        assert abs(math.log(profile.n_opt / n_opt(profile.compute))) < math.log(
            LADDER[1] / LADDER[0]
        )
    lo, hi = result.interval
    assert lo < TRUE_A < hi
    assert abs(result.exponent - TRUE_A) < 0.03
    assert hi - lo < result.exponent  # an interval narrower than its estimate
    # k C^a reproduces the located optima
    located = np.array([p.n_opt for p in result.located])
    np.testing.assert_allclose(
        result.predict([p.compute for p in result.located]), located, rtol=0.2
    )


def test_interval_covers_the_truth_across_seeds() -> None:
    covered = [
        lo < TRUE_A < hi
        for seed in range(20)
        for lo, hi in [
            fit_isoflop(*isoflop_grid(seed), bootstrap=100, level=0.9, seed=seed).interval
        ]
    ]
    assert sum(covered) >= 15  # nominal 0.9 of 20 seeds is 18


def test_noise_free_exponent_is_exact_up_to_the_ladder() -> None:
    # without noise the only error is where the discrete ladder puts each window
    result = fit_isoflop(*isoflop_grid(seed=0, noise=0.0), bootstrap=0)
    assert abs(result.exponent - TRUE_A) < 0.02
    assert result.bootstrap is not None and len(result.bootstrap) == 0


def test_chinchilla_allocation_agrees_with_the_isoflop_exponent() -> None:
    rng = np.random.default_rng(3)
    n = np.repeat(np.geomspace(1e7, 1e10, 8), 6)
    d = np.tile(np.geomspace(1e9, 1e12, 6), 8)
    loss = chinchilla_loss(n, d) * np.exp(rng.normal(0, 0.003, size=n.size))
    fit = fit_chinchilla(n, d, loss, bootstrap=60, seed=0)
    a, (lo, hi) = chinchilla_allocation(fit)
    assert a == pytest.approx(fit.params["beta"] / (fit.params["alpha"] + fit.params["beta"]))
    assert lo <= a <= hi
    assert lo < TRUE_A < hi
    isoflop = fit_isoflop(*isoflop_grid(seed=3), bootstrap=100)
    assert abs(isoflop.exponent - a) < 0.05  # two roads to the same allocation


def test_one_size_per_budget_warns_instead_of_failing() -> None:
    compute, params, loss = isoflop_grid(seed=0, sizes=1)
    result = fit_isoflop(compute, params, loss)
    assert math.isnan(result.exponent) and all(math.isnan(v) for v in result.interval)
    assert all(p.n_opt is None for p in result.profiles)
    assert any("a parabola needs 3" in w for w in result.warnings)
    assert any("0 budget(s) locate N_opt" in w for w in result.warnings)
    assert result.to_dict()["a"] is None


def test_a_minimum_at_the_edge_of_the_sizes_is_not_an_optimum() -> None:
    compute, params, loss = isoflop_grid(seed=0, noise=0.0)
    # at the largest budget, only sizes below its optimum: the loss still falls at the top
    top = BUDGETS[-1]
    small = LADDER[LADDER < n_opt(top) / 1.5][-5:]
    keep = compute != top
    compute = np.concatenate([compute[keep], np.full(len(small), top)])
    params = np.concatenate([params[keep], small])
    loss = np.concatenate([loss[keep], chinchilla_loss(small, top / (6 * small))])
    result = fit_isoflop(compute, params, loss, bootstrap=0)
    edge = next(p for p in result.profiles if p.compute == top)
    assert edge.n_opt is None and "add larger sizes" in edge.warning
    assert len(result.located) == len(BUDGETS) - 1
    assert abs(result.exponent - TRUE_A) < 0.03  # the other three still give the law


def test_three_sizes_per_budget_give_no_interval_and_say_why() -> None:
    result = fit_isoflop(*isoflop_grid(seed=0, sizes=3), bootstrap=50)
    assert np.isfinite(result.exponent)
    assert all(math.isnan(v) for v in result.interval)
    assert any("add sizes per budget" in w for w in result.warnings)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        fit_isoflop([1.0, 2.0], [1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        fit_isoflop([1.0, -2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="level"):
        fit_isoflop(*isoflop_grid(seed=0), level=1.5)


def test_a_parabola_minimum_inside_but_the_best_size_at_the_edge_is_no_optimum() -> None:
    # the demo's own largest budget: the smallest model is best, yet the parabola through
    # the three sizes bottoms out just above it
    params = np.array([0.718e6, 2.86e6, 4.06e6])
    loss = np.array([4.5822, 5.1493, 5.5481])
    result = fit_isoflop(np.full(3, 4e12), params, loss, bootstrap=0)
    (profile,) = result.profiles
    c2, c1, _ = profile.coefficients
    assert c2 > 0 and math.log(params[0]) < -c1 / (2 * c2)  # the parabola alone would say yes
    assert profile.n_opt is None and "add smaller sizes" in profile.warning
