"""Shared helpers for the diffusion tests: small float64 processes, analytic models and
random pixel images."""

import torch

from diffusion.gaussian import GaussianDiffusion
from diffusion.schedules import get_beta_schedule


def make_diffusion(T=50, schedule="cosine", **kwargs) -> GaussianDiffusion:
    kwargs.setdefault("mean_type", "eps")
    kwargs.setdefault("var_type", "learned_range")
    kwargs.setdefault("objective", "hybrid")
    return GaussianDiffusion(get_beta_schedule(schedule, T), **kwargs)


class ConvModel(torch.nn.Module):
    """A tiny float64 model whose output depends on x and t (for gradients and bits/dim)."""

    def __init__(self, channels=3, learn_sigma=True, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        out = 2 * channels if learn_sigma else channels
        self.conv = torch.nn.Conv2d(channels, out, 3, padding=1).double()
        with torch.no_grad():
            self.conv.weight.copy_(0.1 * torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(0.1 * torch.randn(self.conv.bias.shape, generator=g))
        self.seen_t: list[torch.Tensor] = []

    def forward(self, x, t):
        self.seen_t.append(t.detach().clone())
        out = self.conv(x)
        return torch.tanh(out + 0.001 * t.to(out.dtype).view(-1, 1, 1, 1))


def oracle_eps_model(base: GaussianDiffusion, x0: torch.Tensor, learn_sigma: bool):
    """The exact eps for data that is the single image x0, using the ORIGINAL process's abar
    at the timestep the model receives (so it is only right if respacing maps timesteps)."""

    abar = torch.from_numpy(base.alphas_cumprod)

    def model(x, t):
        a = abar[t.long()].view(-1, 1, 1, 1).to(x)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    return model


def images(n=4, c=3, hw=8, seed=0):
    """Random uint8 pixels in the model range as float64 [n, c, hw, hw], and the generator."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 256, (n, c, hw, hw), generator=g)
    return (k.double() / 127.5 - 1.0), g
