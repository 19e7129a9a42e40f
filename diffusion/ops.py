"""Leaf math of the diffusion library; imports nothing of the package.

* :func:`normal_kl`: KL between diagonal Gaussians, the L_{t-1} terms of the bound (Ho et al.
  2020 Eq. 5);
* :func:`discretized_gaussian_log_likelihood`: the decoder L_0 over 256 bins of width 2/255
  (Ho et al. 2020 Eq. 13);
* :func:`mean_flat`, :data:`LOG2`: per-example means, nats -> bits;
* :func:`extract`: coefficient gathering, arr[t] broadcast to an image batch;
* :func:`draw_noise`: the noise of one timestep, injected or drawn from a generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "LOG2",
    "NoiseFn",
    "approx_standard_normal_cdf",
    "check_choice",
    "discretized_gaussian_log_likelihood",
    "draw_noise",
    "extract",
    "math_dtype",
    "mean_flat",
    "normal_kl",
]

LOG2 = math.log(2.0)

NoiseFn = Callable[[int], torch.Tensor]  # timestep t -> noise shaped like the images


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


def math_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype coefficients are computed in next to ``like``: float64 for float64 images,
    float32 for anything narrower (bf16 images get float32 math)."""
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] reshaped to broadcast against ``like``: [N] -> [N, 1, 1, 1] for images.

    ``values`` is a [T] coefficient tensor already on ``like``'s device, in the dtype the
    caller wants (see :func:`math_dtype`); ``t`` holds N timestep indices.
    """
    gathered = values[t.long()]
    return gathered.reshape(gathered.shape + (1,) * (like.ndim - gathered.ndim))


def draw_noise(
    noise_fn: NoiseFn | None, t: int, like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """The noise for timestep ``t``, shaped, typed and placed like ``like``.

    ``noise_fn(t)`` supplies it when given (its shape is checked); otherwise it is a standard
    normal draw from ``generator`` (None: the global RNG).
    """
    if noise_fn is not None:
        noise = noise_fn(t)
        if noise.shape != like.shape:
            raise ValueError(
                f"noise_fn({t}) returned shape {tuple(noise.shape)}, expected {tuple(like.shape)}"
            )
        return noise.to(like)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """ValueError naming the argument and the allowed values unless ``value`` is one."""
    if value not in allowed:
        raise ValueError(f"{name}: got {value!r}; allowed values: {list(allowed)}")
