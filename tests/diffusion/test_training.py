import numpy as np
import pytest
import torch

from diffusion.timesteps import LossSecondMomentResampler, UniformSampler
from diffusion.training import EMA, draw_noise, draw_timesteps, train_step

from .helpers import make_diffusion


class Tiny(torch.nn.Module):
    def __init__(self, learn_sigma=True):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2 if learn_sigma else 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) + 1e-3 * t.float().view(-1, 1, 1, 1)


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def test_ema_is_polyak_average():
    model = Tiny()
    ema = EMA(model, rate=0.9)
    before = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for b, e, p in zip(before, ema.module.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="ema rate"):
        EMA(model, rate=1.0)


def test_train_step_replays_exactly_with_the_same_generator():
    def run():
        torch.manual_seed(0)
        model = Tiny()
        d = make_diffusion(50)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ema = EMA(model, 0.99)
        g = torch.Generator().manual_seed(3)
        out = [
            train_step(
                model, d, UniformSampler(50), opt, batch(), generator=g, ema=ema, grad_clip=1.0
            )
            for _ in range(5)
        ]
        return model, ema, out

    m1, e1, o1 = run()
    m2, e2, o2 = run()
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(e1.module.parameters(), e2.module.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(o1[-1]["loss"], o2[-1]["loss"]) and "grad_norm" in o1[-1]
    assert set(o1[0]) >= {"t", "loss", "mse", "vb", "objective"}


def test_train_step_reduces_the_loss_and_feeds_the_importance_sampler():
    torch.manual_seed(0)
    model = Tiny(learn_sigma=True)
    d = make_diffusion(20, objective="vlb")
    sampler = LossSecondMomentResampler(20)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(1)
    x = batch(32)
    losses = [
        float(train_step(model, d, sampler, opt, x, generator=g)["objective"]) for _ in range(60)
    ]
    assert sampler.loss_counts.sum() == min(60 * 32, 20 * 10) or sampler.warmed_up()
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_bf16_autocast_step_runs_and_stays_finite():
    model = Tiny()
    d = make_diffusion(20)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = train_step(
        model,
        d,
        UniformSampler(20),
        opt,
        batch(),
        autocast_dtype=torch.bfloat16,
        generator=torch.Generator().manual_seed(0),
    )
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"]).all()


def test_nan_loss_raises():
    model = Tiny()
    with torch.no_grad():
        model.conv.bias.fill_(float("nan"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(FloatingPointError, match="nan"):
        train_step(model, make_diffusion(20), UniformSampler(20), opt, batch())


def test_cpu_draws_are_the_sampler_and_randn_streams():
    """With a CPU generator, t and the noise are the draws of every earlier version:
    sampler.sample, then torch.randn on the CPU (what exact resume and old runs rely on)."""
    sampler, x = UniformSampler(50), batch()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    t, w = draw_timesteps(sampler, 8, x.device, g1)
    noise = draw_noise(x, g1)
    t_ref, w_ref = sampler.sample(8, generator=g2)
    assert torch.equal(t, t_ref) and torch.equal(w, w_ref)
    assert torch.equal(noise, torch.randn(x.shape, generator=g2))


def test_unchecked_step_returns_the_non_finite_objective():
    model = Tiny()
    with torch.no_grad():
        model.conv.bias.fill_(float("nan"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = train_step(
        model, make_diffusion(20), UniformSampler(20), opt, batch(), check_finite=False
    )
    assert torch.isnan(out["objective"])  # the caller's watch reads it later
