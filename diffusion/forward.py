"""The closed-form side of Gaussian diffusion: q(x_t | x_0) and the posterior
q(x_{t-1} | x_t, x_0) of Ho et al. (2020) Eq. 9-12, and the conversions between x_0, eps and
x_{t-1} they imply. Nothing here calls a model; :class:`diffusion.gaussian.GaussianDiffusion`
adds the reverse process on top.

Notation: betas b_t, a_t = 1 - b_t, abar_t = prod_{s<=t} a_s, all float64 numpy arrays
indexed by t in [0, T). Coefficients are gathered in the dtype of the images they multiply
(float64 images give a float64 computation end to end; anything narrower computes in float32).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from diffusion.ops import extract, math_dtype

__all__ = ["ForwardProcess"]


class ForwardProcess:
    """Every float64 coefficient array of the schedule ``betas`` ([T], each in (0, 1])."""

    def __init__(self, betas: np.ndarray | Iterable[float]) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas: must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas: every beta must lie in (0, 1]")
        self.num_timesteps = int(betas.shape[0])

        # Forward process (Eq. 9).
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # Posterior q(x_{t-1} | x_t, x_0), Eq. 10-12. beta~_0 = 0, so its log is "clipped"
        # to beta~_1 (only ever used at t = 0 through the decoder).
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
            if self.num_timesteps > 1
            else self.betas  # a one-step process has no beta~_1: fall back to b_0
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)
        )
        self.log_betas = np.log(betas)
        # fixed_large: b_t as the variance, with beta~_1 at t = 0 for a sensible decoder.
        self.fixed_large_variance = (
            np.append(self.posterior_variance[1], betas[1:]) if self.num_timesteps > 1 else betas
        )
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self._recip_coef1 = 1.0 / self.posterior_mean_coef1
        self._coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1
        # id(array) -> (array, tensor) per (device, dtype): no host-to-device copy per step.
        self._tensor_cache: dict[tuple, tuple[np.ndarray, torch.Tensor]] = {}

    def cached_tensor(
        self, arr: np.ndarray, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """``arr`` as a tensor, cached per (array, device, dtype): one host-to-device copy."""
        key = (id(arr), device, dtype)
        cached = self._tensor_cache.get(key)
        if cached is None or cached[0] is not arr:
            cached = (arr, torch.as_tensor(arr).to(device=device, dtype=dtype))
            self._tensor_cache[key] = cached
        return cached[1]

    def extract(self, arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """arr[t] broadcastable to ``like`` in its math dtype (:func:`diffusion.ops.extract`)."""
        return extract(self.cached_tensor(arr, like.device, math_dtype(like)), t, like)

    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log variance of q(x_t | x_0) (Eq. 9)."""
        mean = self.extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self.extract(self.one_minus_alphas_cumprod, t, x_start)
        log_variance = self.extract(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Eq. 9)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise: shape {tuple(noise.shape)} != x_start {tuple(x_start.shape)}")
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (Eq. 10-12)."""
        mean = (
            self.extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self.extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self.extract(self.posterior_variance, t, x_t)
        log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (Eq. 9 solved for x_0)."""
        return (
            self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_xstart_from_xprev(
        self, x_t: torch.Tensor, t: torch.Tensor, xprev: torch.Tensor
    ) -> torch.Tensor:
        """x_0 from the posterior mean (Eq. 11 solved for x_0)."""
        return (
            self.extract(self._recip_coef1, t, x_t) * xprev
            - self.extract(self._coef2_over_coef1, t, x_t) * x_t
        )

    def predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
    ) -> torch.Tensor:
        """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1/abar_t - 1)."""
        return (
            self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart
        ) / self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)
