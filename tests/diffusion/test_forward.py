"""diffusion.forward: q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0) and the x_0 / eps
conversions (Ho et al. 2020 Eq. 9-12)."""

import math

import numpy as np
import pytest
import torch

from .helpers import images, make_diffusion


@pytest.mark.parametrize("schedule,T", [("cosine", 1000), ("linear", 1000), ("cosine", 4000)])
def test_coefficients_and_posterior_identities(schedule, T):
    d = make_diffusion(T, schedule)
    b, abar, abar_prev = d.betas, d.alphas_cumprod, d.alphas_cumprod_prev
    for arr in (
        d.alphas_cumprod,
        d.posterior_variance,
        d.posterior_log_variance_clipped,
        d.posterior_mean_coef1,
        d.posterior_mean_coef2,
    ):
        assert arr.dtype == np.float64 and arr.shape == (T,)
    assert np.all(np.diff(abar) < 0) and abar_prev[0] == 1.0
    assert np.allclose(d.posterior_variance, b * (1 - abar_prev) / (1 - abar), rtol=1e-14)
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == np.log(d.posterior_variance[1])
    assert np.array_equal(d.posterior_log_variance_clipped[1:], np.log(d.posterior_variance[1:]))
    # beta~_t <= b_t: the two fixed variances bracket the learned one (Sec. 3.1)
    assert np.all(d.posterior_variance <= b)
    # mean coefficients: coef1 + coef2 * sqrt(abar_t)/sqrt(abar_{t-1}) ... reproduce x_0 = x_t
    # when there is no noise: mu~(x0, sqrt(abar_t) x0) = sqrt(abar_{t-1}) x0
    lhs = d.posterior_mean_coef1 + d.posterior_mean_coef2 * np.sqrt(abar)
    assert np.allclose(lhs, np.sqrt(abar_prev), rtol=1e-12)


def test_posterior_mean_matches_ho_et_al_eps_form():
    """mu~_t(x_0, x_t) = (x_t - b_t / sqrt(1 - abar_t) eps) / sqrt(a_t) (Ho et al. Eq. 11)."""
    d = make_diffusion(1000)
    x0, g = images()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    x_t = d.q_sample(x0, t, noise=eps)
    mean, var, _ = d.q_posterior_mean_variance(x0, x_t, t)
    b = torch.from_numpy(d.betas)[t].view(-1, 1, 1, 1)
    abar = torch.from_numpy(d.alphas_cumprod)[t].view(-1, 1, 1, 1)
    expected = (x_t - b / (1 - abar).sqrt() * eps) / (1 - b).sqrt()
    torch.testing.assert_close(mean, expected, rtol=1e-10, atol=1e-10)
    assert mean.dtype == torch.float64 and var.shape == (4, 1, 1, 1)


def test_q_sample_moments():
    d = make_diffusion(1000)
    x0 = torch.linspace(-1, 1, 5, dtype=torch.float64).view(1, 1, 1, 5).expand(20000, 1, 1, 5)
    t = torch.full((20000,), 300)
    x_t = d.q_sample(
        x0,
        t,
        noise=torch.randn(
            x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
        ),
    )
    mean, var, logvar = d.q_mean_variance(x0[:1], t[:1])
    torch.testing.assert_close(x_t.mean(0, keepdim=True), mean, atol=0.02, rtol=0)
    assert torch.allclose(x_t.var(0), var.expand(1, 1, 1, 5)[0], rtol=0.04)
    assert math.isclose(float(logvar), math.log(float(var)), rel_tol=1e-12)


def test_xstart_predictions_invert_the_forward_process():
    x0, g = images()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 25, 49])
    d = make_diffusion(50)
    x_t = d.q_sample(x0, t, noise=eps)
    torch.testing.assert_close(d.predict_xstart_from_eps(x_t, t, eps), x0)
    torch.testing.assert_close(d.predict_eps_from_xstart(x_t, t, x0), eps)
    xprev = d.q_posterior_mean_variance(x0, x_t, t)[0]
    torch.testing.assert_close(d.predict_xstart_from_xprev(x_t, t, xprev), x0)
