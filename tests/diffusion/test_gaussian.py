import itertools
import math

import numpy as np
import pytest
import torch

from diffusion.gaussian import MEAN_TYPES, OBJECTIVES, VAR_TYPES, GaussianDiffusion
from diffusion.ops import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from diffusion.schedules import get_beta_schedule

from .helpers import ConvModel, images, make_diffusion

VALID = [
    (m, v, o)
    for m, v, o in itertools.product(MEAN_TYPES, VAR_TYPES, OBJECTIVES)
    if not (o == "hybrid" and v.startswith("fixed")) and not (o == "simple" and v.startswith("l"))
]
INVALID = [
    (m, v, o)
    for m, v, o in itertools.product(MEAN_TYPES, VAR_TYPES, OBJECTIVES)
    if (m, v, o) not in VALID
]


@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_p_mean_variance_with_an_oracle_recovers_the_posterior(mean_type):
    d = make_diffusion(50, mean_type=mean_type, var_type="fixed_small", objective="vlb")
    x0, g = images()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 20, 49])
    x_t = d.q_sample(x0, t, noise=eps)
    post_mean, post_var, _ = d.q_posterior_mean_variance(x0, x_t, t)
    truth = {"eps": eps, "x0": x0, "xprev": post_mean}[mean_type]
    out = d.p_mean_variance(lambda x, ts: truth, x_t, t, clip_denoised=False)
    torch.testing.assert_close(out.pred_xstart, x0)
    torch.testing.assert_close(out.mean, post_mean)
    torch.testing.assert_close(out["variance"], post_var.expand_as(x0))
    mean, _, _, pred = out  # unpacks as a tuple too
    assert mean is out.mean and pred is out["pred_xstart"]


def test_variance_types():
    x = torch.zeros(4, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 7, 49])
    tt = t.numpy()

    def out(var_type, v):
        d = make_diffusion(50, var_type=var_type, objective="vlb")
        c = 6 if var_type.startswith("learned") else 3
        model_out = torch.zeros(4, c, 2, 2, dtype=torch.float64)
        model_out[:, 3:] = v
        return d, d.p_mean_variance(lambda *_: model_out, x, t)

    d, o = out("fixed_small", 0)
    assert np.allclose(o.log_variance[:, 0, 0, 0], d.posterior_log_variance_clipped[tt])
    assert np.allclose(o.variance[:, 0, 0, 0], d.posterior_variance[tt])
    d, o = out("fixed_large", 0)
    expected = np.where(tt == 0, d.posterior_variance[1], d.betas[tt])
    assert np.allclose(o.variance[:, 0, 0, 0], expected, rtol=1e-14)
    # Eq. 15: v = 1 gives b_t, v = -1 gives beta~_t (clipped), v = 0 their geometric mean
    d, o = out("learned_range", 1.0)
    assert np.allclose(o.log_variance[:, 0, 0, 0], np.log(d.betas[tt]))
    d, o = out("learned_range", -1.0)
    assert np.allclose(o.log_variance[:, 0, 0, 0], d.posterior_log_variance_clipped[tt])
    d, o = out("learned_range", 0.0)
    mid = 0.5 * (np.log(d.betas[tt]) + d.posterior_log_variance_clipped[tt])
    assert np.allclose(o.log_variance[:, 0, 0, 0], mid)
    d, o = out("learned", -3.0)
    assert torch.allclose(o.variance, torch.exp(torch.tensor(-3.0, dtype=torch.float64)))


def test_wrong_number_of_output_channels_is_an_error():
    d = make_diffusion(10)
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="needs 6"):
        d.p_mean_variance(lambda *_: torch.zeros(2, 3, 4, 4), x, torch.tensor([1, 2]))


@pytest.mark.parametrize("mean_type,var_type,objective", INVALID)
def test_invalid_combinations_name_the_argument(mean_type, var_type, objective):
    with pytest.raises(ValueError, match=r"objective.*var_type"):
        make_diffusion(10, mean_type=mean_type, var_type=var_type, objective=objective)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"mean_type": "v"}, "mean_type"),
        ({"var_type": "big"}, "var_type"),
        ({"objective": "l2"}, "objective"),
        ({"hybrid_lambda": 0}, "hybrid_lambda"),
    ],
)
def test_unknown_values_name_the_argument_and_allowed_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_diffusion(10, **kwargs)
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(np.array([0.1, 1.5]))


@pytest.mark.parametrize("mean_type,var_type,objective", VALID)
def test_training_losses_every_combination(mean_type, var_type, objective):
    T = 40
    d = make_diffusion(T, mean_type=mean_type, var_type=var_type, objective=objective)
    model = ConvModel(learn_sigma=d.learns_sigma)
    x0, g = images()
    t = torch.tensor([0, 1, 17, 39])
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    terms = d.training_losses(model, x0, t, noise=noise)
    assert terms["loss"].shape == (4,) and torch.isfinite(terms["loss"]).all()
    x_t = d.q_sample(x0, t, noise=noise)
    out = model(x_t, t)
    if objective == "vlb":
        vb = d.vb_terms_bpd(model, x0, x_t, t, clip_denoised=False)["output"]
        torch.testing.assert_close(terms["loss"], T * vb)
        assert "mse" not in terms
        return
    target = {"eps": noise, "x0": x0, "xprev": d.q_posterior_mean_variance(x0, x_t, t)[0]}
    mse = mean_flat((target[mean_type] - out[:, :3]) ** 2)
    torch.testing.assert_close(terms["mse"], mse)
    if objective == "simple":
        torch.testing.assert_close(terms["loss"], mse)
        assert "vb" not in terms
    else:
        vb = d.vb_terms_bpd(model, x0, x_t, t, clip_denoised=False)["output"]
        torch.testing.assert_close(terms["vb"], vb * T / 1000)  # lambda * T * L_t, Eq. 16
        torch.testing.assert_close(terms["loss"], mse + vb * T / 1000)


def test_hybrid_vb_term_trains_only_the_variance_channels():
    d = make_diffusion(20)
    x0, g = images()
    t = torch.tensor([0, 5, 10, 19])
    out = torch.randn(4, 6, 8, 8, generator=g, dtype=torch.float64).mul(0.3).requires_grad_()
    terms = d.training_losses(lambda *_: out, x0, t)
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert grad_vb[:, :3].abs().max() == 0  # the mean is frozen in the vb term
    assert grad_vb[:, 3:].abs().max() > 0
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert grad_mse[:, 3:].abs().max() == 0 and grad_mse[:, :3].abs().max() > 0


def test_vlb_objective_trains_mean_and_variance():
    d = make_diffusion(20, objective="vlb")
    x0, g = images()
    out = torch.randn(4, 6, 8, 8, generator=g, dtype=torch.float64).mul(0.3).requires_grad_()
    loss = d.training_losses(lambda *_: out, x0, torch.tensor([0, 5, 10, 19]))["loss"]
    (grad,) = torch.autograd.grad(loss.sum(), out)
    assert grad[:, :3].abs().max() > 0 and grad[:, 3:].abs().max() > 0


def test_vb_terms_are_kl_for_t_positive_and_decoder_nll_at_zero():
    d = make_diffusion(30, var_type="learned_range", objective="vlb")
    model = ConvModel()
    x0, g = images()
    t = torch.tensor([0, 0, 4, 29])
    x_t = d.q_sample(x0, t, noise=torch.randn(x0.shape, generator=g, dtype=torch.float64))
    vb = d.vb_terms_bpd(model, x0, x_t, t, clip_denoised=False)["output"]
    out = d.p_mean_variance(model, x_t, t, clip_denoised=False)
    true_mean, _, true_logvar = d.q_posterior_mean_variance(x0, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_logvar, out.mean, out.log_variance)) / math.log(2)
    nll = -mean_flat(
        discretized_gaussian_log_likelihood(x0, means=out.mean, log_scales=0.5 * out.log_variance)
    ) / math.log(2)
    torch.testing.assert_close(vb[2:], kl[2:])
    torch.testing.assert_close(vb[:2], nll[:2])
    assert (vb[2:] >= 0).all()


def test_vb_is_zero_for_the_exact_posterior():
    d = make_diffusion(30, var_type="fixed_small", objective="vlb")
    x0, g = images()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 4, 15, 29])
    x_t = d.q_sample(x0, t, noise=eps)
    vb = d.vb_terms_bpd(lambda *_: eps, x0, x_t, t, clip_denoised=False)["output"]
    assert vb.abs().max() < 1e-9


def test_prior_term_is_tiny_for_cosine_and_linear():
    x0, _ = images()
    for schedule in ("cosine", "linear"):
        prior = make_diffusion(1000, schedule).prior_bpd(x0)
        assert (prior >= 0).all() and (prior < 1e-3).all()


def test_respace_keeps_alpha_bar_and_feeds_original_timesteps():
    base = make_diffusion(100, rescale_timesteps=False)
    keep = [0, 9, 10, 50, 99]
    spaced = base.respace(keep)
    assert spaced.num_timesteps == 5 and spaced.original_num_steps == 100
    assert np.allclose(spaced.alphas_cumprod, base.alphas_cumprod[keep], rtol=1e-13)
    assert spaced.betas[0] == base.betas[0]
    model = ConvModel()
    x = torch.zeros(5, 3, 4, 4, dtype=torch.float64)
    spaced.p_mean_variance(model, x, torch.arange(5))
    assert model.seen_t[-1].tolist() == keep
    # rescaled timesteps use the ORIGINAL T: t * 1000 / 100
    rescaled = make_diffusion(100, rescale_timesteps=True).respace("10")
    rescaled.p_mean_variance(model, x[:2], torch.tensor([0, 9]))
    assert model.seen_t[-1].tolist() == [0.0, 990.0]
    # respacing a respaced process composes the maps
    again = base.respace("50").respace("ddim5")
    fifty = base.respace("50").timestep_map
    assert again.timestep_map.tolist() == [fifty[i] for i in range(0, 50, 10)]
    # keeping every step gives back the same process
    full = base.respace(range(100))
    assert np.allclose(full.betas, base.betas, rtol=1e-12)


def test_respace_bad_timesteps():
    with pytest.raises(ValueError, match="timesteps"):
        make_diffusion(10).respace([3, 12])


def test_hybrid_scale_uses_the_respaced_T():
    base = make_diffusion(4000)
    spaced = base.respace("100")
    x0, g = images(2)
    out = torch.zeros(2, 6, 8, 8, dtype=torch.float64)
    t = torch.tensor([3, 50])
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    terms = spaced.training_losses(lambda *_: out, x0, t, noise=noise)
    x_t = spaced.q_sample(x0, t, noise=noise)
    vb = spaced.vb_terms_bpd(lambda *_: out, x0, x_t, t, clip_denoised=False)["output"]
    torch.testing.assert_close(terms["vb"], vb * 100 / 1000)


def test_float32_images_compute_in_float32_and_bf16_outputs_are_upcast():
    d = GaussianDiffusion(get_beta_schedule("cosine", 100))
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    t = torch.tensor([1, 50])
    assert d.q_sample(x0, t).dtype == torch.float32
    out = d.p_mean_variance(lambda *_: torch.zeros(2, 6, 4, 4, dtype=torch.bfloat16), x0, t)
    assert out.mean.dtype == torch.float32 and out.log_variance.dtype == torch.float32
