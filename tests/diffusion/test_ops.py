"""diffusion.ops: the leaf math of the bound, coefficient extraction and noise drawing."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion.ops import (
    approx_standard_normal_cdf,
    check_choice,
    discretized_gaussian_log_likelihood,
    draw_noise,
    extract,
    math_dtype,
    mean_flat,
    normal_kl,
)

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


def test_mean_flat_averages_all_but_the_batch_dimension():
    x = torch.arange(24, dtype=torch.float64).view(2, 3, 4)
    torch.testing.assert_close(mean_flat(x), x.view(2, -1).mean(1))
    assert mean_flat(torch.ones(5, 1, 1, 1)).shape == (5,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_math_dtype_is_float64_only_for_float64(dtype):
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert math_dtype(torch.zeros(1, dtype=dtype)) == expected


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), ndim=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_extract_gathers_per_example_and_broadcasts(n, ndim, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(10, generator=g, dtype=torch.float64)
    t = torch.randint(0, 10, (n,), generator=g)
    like = torch.zeros((n,) + (2,) * (ndim - 1))
    out = extract(values, t, like)
    assert out.shape == (n,) + (1,) * (ndim - 1) and out.dtype == values.dtype
    assert torch.equal(out.reshape(n), values[t])
    assert (out * like).shape == like.shape


def test_draw_noise_uses_the_function_or_the_generator():
    like = torch.zeros(2, 3, dtype=torch.float64)
    a = draw_noise(None, 4, like, torch.Generator().manual_seed(7))
    b = draw_noise(None, 4, like, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == like.shape and a.dtype == like.dtype
    table = {4: torch.ones(2, 3)}
    given_noise = draw_noise(table.__getitem__, 4, like, None)
    assert torch.equal(given_noise, torch.ones(2, 3, dtype=torch.float64))
    assert given_noise.dtype == torch.float64
    with pytest.raises(ValueError, match=r"noise_fn\(4\) returned shape \(3,\)"):
        draw_noise(lambda t: torch.zeros(3), 4, like, None)


def test_check_choice_names_the_argument_and_the_allowed_values():
    check_choice("kind", "a", ("a", "b"))
    with pytest.raises(ValueError, match=r"kind: got 'c'; allowed values: \['a', 'b'\]"):
        check_choice("kind", "c", ("a", "b"))
