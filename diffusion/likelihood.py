"""Likelihood pieces of the variational bound and full bits/dim (Ho et al. 2020 Eq. 5,
Nichol & Dhariwal 2021 Sec. 2 and 3).

* :func:`normal_kl`: KL between diagonal Gaussians, the L_{t-1} terms;
* :func:`discretized_gaussian_log_likelihood`: the decoder L_0 over 256 bins of width 2/255;
* :func:`calc_bpd`: the whole bound, sum_t L_t + L_T, per image in bits/dim, evaluating many
  timesteps in one model forward (equal to :meth:`GaussianDiffusion.calc_bpd_loop`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusion.gaussian import GaussianDiffusion

__all__ = [
    "BpdResult",
    "approx_standard_normal_cdf",
    "calc_bpd",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "normal_kl",
]

LOG2 = math.log(2.0)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: [N, ...] -> [N]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    Arguments broadcast; at least one must be a tensor.
    """
    tensor = next((x for x in (mean1, logvar1, mean2, logvar2) if torch.is_tensor(x)), None)
    if tensor is None:
        raise TypeError("normal_kl: at least one argument must be a tensor")
    logvar1, logvar2 = (
        x if torch.is_tensor(x) else torch.tensor(x, dtype=tensor.dtype, device=tensor.device)
        for x in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF through the tanh approximation (as in the reference decoder)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log p(x) under a Gaussian discretized to 256 bins of width 2/255 on [-1, 1] (L_0).

    ``x`` holds pixel values already scaled to [-1, 1] (uint8 k -> -1 + 2k/255). The first
    bin takes the whole left tail and the last bin the whole right tail, so the 256
    probabilities sum to 1. Probabilities are clamped at 1e-12 before the log.
    Returns log-likelihoods in nats with the shape of ``x``.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"x, means and log_scales must have one shape, got "
            f"{tuple(x.shape)}, {tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )


@dataclass(frozen=True)
class BpdResult:
    """Per-image terms of the variational bound, all in bits/dim.

    ``vb`` and the MSE columns are ordered by timestep, column t = L_t ([N, T]); note that
    :meth:`GaussianDiffusion.calc_bpd_loop` keeps the reference's reversed column order.
    """

    total_bpd: torch.Tensor  # [N] sum_t vb[:, t] + prior_bpd
    prior_bpd: torch.Tensor  # [N] L_T = KL(q(x_T | x_0) || N(0, I))
    vb: torch.Tensor  # [N, T]
    xstart_mse: torch.Tensor  # [N, T]
    mse: torch.Tensor  # [N, T] epsilon MSE implied by the predicted x_0

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, key)


NoiseFn = Callable[[int], torch.Tensor]


@torch.no_grad()
def calc_bpd(
    diffusion: GaussianDiffusion,
    model: Callable[..., torch.Tensor],
    x_start: torch.Tensor,
    *,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    noise_fn: NoiseFn | None = None,
    generator: torch.Generator | None = None,
    timesteps_per_batch: int = 16,
) -> BpdResult:
    """Full variational bound in bits/dim per image, ``timesteps_per_batch`` t per forward.

    Same computation as :meth:`GaussianDiffusion.calc_bpd_loop` (each t with fresh noise,
    drawn for t = T-1, ..., 0 in that order so a seeded run draws the very same noise), but
    the N images of several timesteps are stacked into one model batch of
    N * timesteps_per_batch: on the CPU and GPU alike, a few large forwards are much faster
    than T small ones. ``noise_fn(t)`` may supply the noise for timestep t explicitly.

    ``x_start``: [N, C, H, W] in [-1, 1]. Model kwargs with a batch dimension are repeated.
    """
    if timesteps_per_batch < 1:
        raise ValueError(f"timesteps_per_batch: must be >= 1, got {timesteps_per_batch}")
    model_kwargs = model_kwargs or {}
    n = x_start.shape[0]
    num_t = diffusion.num_timesteps
    vb = torch.empty(n, num_t, dtype=x_start.dtype, device=x_start.device)
    xstart_mse = torch.empty_like(vb)
    mse = torch.empty_like(vb)

    order = list(range(num_t))[::-1]
    for lo in range(0, num_t, timesteps_per_batch):
        chunk = order[lo : lo + timesteps_per_batch]
        k = len(chunk)
        noise = torch.cat([_draw(noise_fn, t, x_start, generator) for t in chunk])  # [k*N, ...]
        t_batch = torch.tensor(chunk, device=x_start.device).repeat_interleave(n)  # [k*N]
        x0 = x_start.repeat(k, *([1] * (x_start.ndim - 1)))  # [k*N, C, H, W]
        x_t = diffusion.q_sample(x0, t_batch, noise=noise)
        kwargs = {key: _repeat_batch(v, k, n) for key, v in model_kwargs.items()}
        out = diffusion.vb_terms_bpd(
            model, x0, x_t, t_batch, clip_denoised=clip_denoised, model_kwargs=kwargs
        )
        eps = diffusion.predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
        cols = torch.tensor(chunk, device=x_start.device)
        vb[:, cols] = out["output"].view(k, n).T  # [k*N] -> [N, k]
        xstart_mse[:, cols] = mean_flat((out["pred_xstart"] - x0) ** 2).view(k, n).T
        mse[:, cols] = mean_flat((eps - noise) ** 2).view(k, n).T

    prior = diffusion.prior_bpd(x_start)
    return BpdResult(
        total_bpd=vb.sum(dim=1) + prior, prior_bpd=prior, vb=vb, xstart_mse=xstart_mse, mse=mse
    )


def _draw(
    noise_fn: NoiseFn | None, t: int, like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    if noise_fn is not None:
        noise = noise_fn(t)
        if noise.shape != like.shape:
            raise ValueError(
                f"noise_fn({t}) returned shape {tuple(noise.shape)}, expected {tuple(like.shape)}"
            )
        return noise.to(like)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


def _repeat_batch(value: object, k: int, n: int) -> object:
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == n:
        return value.repeat(k, *([1] * (value.ndim - 1)))
    return value
