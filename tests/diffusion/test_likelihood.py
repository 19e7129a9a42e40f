"""diffusion.likelihood: every bits/dim path (full bound, batched, stratified subset)."""

import numpy as np
import pytest
import torch

from diffusion.config import DiffusionConfig
from diffusion.data import load_digits_uint8
from diffusion.images import to_model_range
from diffusion.likelihood import calc_bpd, evaluate_nll, nll_per_image, stratified_timesteps
from diffusion.unet import build_model

from .helpers import ConvModel, make_diffusion


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
    # both order their columns by timestep (column t = L_t)
    for key in ("vb", "xstart_mse", "mse"):
        torch.testing.assert_close(fast[key], loop[key], rtol=1e-12, atol=1e-12)
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


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model("digits-xs").eval()
    with torch.no_grad():  # move off the zero-initialised output so every term matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    diffusion = DiffusionConfig(num_timesteps=100).build()
    images = to_model_range(load_digits_uint8("test")[0][:48])
    return model, diffusion, images


def test_stratified_timesteps_cover_each_stratum():
    t, sizes = stratified_timesteps(10, 3, 500, generator=torch.Generator().manual_seed(0))
    # edges floor(11^(i/3)) - 1 = 0, 1, 3, 10: strata [0], [1, 2], [3, 10)
    assert sizes.tolist() == [1.0, 2.0, 7.0] and t.shape == (500, 3)
    assert set(t[:, 0].tolist()) == {0} and set(t[:, 1].tolist()) == {1, 2}
    assert set(t[:, 2].tolist()) == set(range(3, 10))
    for T, k in [(1000, 50), (4000, 100), (100, 99), (7, 3)]:
        t, sizes = stratified_timesteps(T, k, 200, generator=torch.Generator().manual_seed(1))
        assert sizes.sum() == T and (sizes >= 1).all()
        edges = torch.cat([torch.zeros(1), sizes.cumsum(0)])
        assert ((t >= edges[:-1]) & (t < edges[1:])).all()  # every draw in its stratum
    all_t, _ = stratified_timesteps(7, 7, 2)
    assert all_t.tolist() == [list(range(7))] * 2
    with pytest.raises(ValueError, match="timesteps_per_image"):
        stratified_timesteps(10, 11, 1)


def test_subset_estimate_agrees_with_the_full_bound_within_its_standard_error(setup):
    model, diffusion, images = setup
    batches = list(images.split(16))
    full = evaluate_nll(diffusion, model, batches, kind="full", timesteps_per_batch=25)
    assert full.kind == "full" and full.terms_per_image == 100 and full.num_images == 48
    assert "full bound" in full.describe()
    for seed in (1, 2):
        sub = evaluate_nll(
            diffusion, model, batches, kind="subset", timesteps_per_image=10, seed=seed
        )
        assert sub.kind == "subset" and sub.terms_per_image == 10
        assert "unbiased estimate" in sub.describe()
        assert abs(sub.bpd - full.bpd) < 3 * sub.stderr, (sub, full)
    again = evaluate_nll(diffusion, model, batches, kind="subset", timesteps_per_image=10, seed=1)
    assert again == evaluate_nll(
        diffusion, model, batches, kind="subset", timesteps_per_image=10, seed=1
    )


def test_evaluate_nll_validates(setup):
    model, diffusion, images = setup
    with pytest.raises(ValueError, match="kind"):
        evaluate_nll(diffusion, model, [images[:2]], kind="approx")
    with pytest.raises(ValueError, match="no images"):
        evaluate_nll(diffusion, model, [], kind="full")


@pytest.mark.parametrize("kind", ["subset", "full"])
def test_per_image_seeds_make_an_image_independent_of_its_batch(kind):
    """Image j's noise and timesteps seeded by (seed, j): the per-image values of a set
    evaluated at once equal those of its parts evaluated separately (as workers do)."""
    d = make_diffusion(10, var_type="learned_range")
    model = ConvModel(seed=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (7, 3, 4, 4), generator=g).double() / 127.5 - 1
    kw = {"kind": kind, "timesteps_per_image": 3, "seed": 5, "timesteps_per_batch": 4}
    whole = nll_per_image(d, model, [x], image_seeds=list(range(7)), **kw)
    first = nll_per_image(d, model, [x[:3]], image_seeds=[0, 1, 2], **kw)
    rest = nll_per_image(d, model, [x[3:5], x[5:]], image_seeds=[3, 4, 5, 6], **kw)
    assert whole.shape == (7,)
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, rtol=0, atol=1e-12)
    other = nll_per_image(d, model, [x], image_seeds=list(range(1, 8)), **kw)
    assert not np.allclose(other, whole)  # the seed follows the index, not the position
    with pytest.raises(ValueError, match="image_seeds"):
        nll_per_image(d, model, [x], image_seeds=[0, 1], **kw)
