import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion.likelihood import (
    approx_standard_normal_cdf,
    calc_bpd,
    discretized_gaussian_log_likelihood,
    normal_kl,
)

from .helpers import ConvModel, make_diffusion

BIN_CENTERS = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0


@settings(max_examples=100, deadline=None)
@given(m1=st.floats(-5, 5), m2=st.floats(-5, 5), lv1=st.floats(-8, 3), lv2=st.floats(-8, 3))
def test_normal_kl_matches_torch_distributions_and_is_nonnegative(m1, m2, lv1, lv2):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    ours = normal_kl(t(m1), t(lv1), t(m2), t(lv2))
    p = torch.distributions.Normal(t(m1), t(lv1).mul(0.5).exp())
    q = torch.distributions.Normal(t(m2), t(lv2).mul(0.5).exp())
    ref = torch.distributions.kl_divergence(p, q)
    assert ours >= -1e-12
    assert math.isclose(float(ours), float(ref), rel_tol=1e-9, abs_tol=1e-12)


def test_normal_kl_zero_for_equal_gaussians_and_broadcasts_scalars():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 4, dtype=torch.float64, generator=g)
    lv = torch.randn(3, 4, dtype=torch.float64, generator=g)
    assert normal_kl(m, lv, m, lv).abs().max() < 1e-15  # zero up to float64 rounding
    assert normal_kl(m, lv, 0.0, 0.0).shape == (3, 4)
    with pytest.raises(TypeError):
        normal_kl(0.0, 0.0, 0.0, 0.0)


def test_approx_cdf_is_close_to_the_exact_normal_cdf():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max() < 2e-4


@pytest.mark.parametrize("mean", [-1.0, -0.3, 0.0, 0.55, 1.0, 2.5])
@pytest.mark.parametrize("log_scale", [-6.0, -3.0, -1.0, 0.5])
def test_decoder_probabilities_sum_to_one_over_the_256_bins(mean, log_scale):
    x = BIN_CENTERS
    logp = discretized_gaussian_log_likelihood(
        x, means=torch.full_like(x, mean), log_scales=torch.full_like(x, log_scale)
    )
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_decoder_sharp_gaussian_puts_its_mass_on_its_bin():
    x = BIN_CENTERS
    logp = discretized_gaussian_log_likelihood(
        x, means=torch.full_like(x, x[100].item()), log_scales=torch.full_like(x, -8.0)
    )
    assert logp[100].exp() == pytest.approx(1.0, abs=1e-9)
    assert logp[99] == pytest.approx(math.log(1e-12))  # clamped, never -inf
    with pytest.raises(ValueError, match="one shape"):
        discretized_gaussian_log_likelihood(x, means=x[:3], log_scales=x)


@pytest.mark.parametrize("per_batch", [1, 3, 7, 16, 40])
@pytest.mark.parametrize("clip", [True, False])
def test_batched_bits_per_dim_equals_the_one_t_at_a_time_loop(per_batch, clip):
    d = make_diffusion(16)
    model = ConvModel(seed=3).eval()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (3, 3, 6, 6), generator=g).double() / 127.5 - 1

    torch.manual_seed(123)
    loop = d.calc_bpd_loop(model, x0, clip_denoised=clip)
    torch.manual_seed(123)  # the same global draws, in the same order
    fast = calc_bpd(d, model, x0, clip_denoised=clip, timesteps_per_batch=per_batch)
    torch.testing.assert_close(fast.total_bpd, loop["total_bpd"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.prior_bpd, loop["prior_bpd"])
    # the loop keeps the reference's reversed column order (column 0 is t = T-1)
    for key in ("vb", "xstart_mse", "mse"):
        torch.testing.assert_close(fast[key], loop[key].flip(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.total_bpd, fast.vb.sum(1) + fast.prior_bpd)


def test_bits_per_dim_with_explicit_noise_and_generators():
    d = make_diffusion(8)
    model = ConvModel(seed=1).eval()
    x0 = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    table = {t: torch.randn(x0.shape, dtype=torch.float64) for t in range(8)}
    a = calc_bpd(d, model, x0, noise_fn=table.__getitem__, timesteps_per_batch=3)
    b = d.calc_bpd_loop(model, x0, noise_fn=table.__getitem__)
    torch.testing.assert_close(a.total_bpd, b["total_bpd"], rtol=1e-12, atol=1e-12)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    c = calc_bpd(d, model, x0, generator=g1, timesteps_per_batch=5)
    e = d.calc_bpd_loop(model, x0, generator=g2)
    torch.testing.assert_close(c.total_bpd, e["total_bpd"], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="noise_fn"):
        calc_bpd(d, model, x0, noise_fn=lambda t: torch.zeros(1))
    with pytest.raises(ValueError, match="timesteps_per_batch"):
        calc_bpd(d, model, x0, timesteps_per_batch=0)


def test_exact_posterior_model_pays_only_decoder_and_prior():
    """With data = one image and the exact eps (fixed_small variance), every KL term is 0,
    so the bound is the decoder term plus the prior."""
    d = make_diffusion(20, var_type="fixed_small", objective="vlb")
    x0 = (torch.arange(48, dtype=torch.float64).view(1, 3, 4, 4) * 5 % 256) / 127.5 - 1
    abar = torch.from_numpy(d.alphas_cumprod)

    def oracle(x, t):
        a = abar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    res = calc_bpd(d, oracle, x0, timesteps_per_batch=6)
    assert res.vb[:, 1:].abs().max() < 1e-9
    assert res.total_bpd.item() == pytest.approx((res.vb[:, 0] + res.prior_bpd).item())
    assert res.vb[0, 0] > 0
