"""Gaussian diffusion: the reverse process p(x_{t-1} | x_t), one sampling step, the terms of
the variational bound and the training objectives, on top of the closed-form forward process
and posterior of :class:`diffusion.forward.ForwardProcess`.

Notation follows Nichol & Dhariwal (2021) and Ho et al. (2020): betas b_t, a_t = 1 - b_t,
abar_t = prod_{s<=t} a_s, all float64 numpy arrays indexed by t in [0, T). Tensors are
[N, C, H, W] images in [-1, 1] and [N] integer timesteps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from diffusion.forward import ForwardProcess
from diffusion.ops import (
    LOG2,
    NoiseFn,
    check_choice,
    discretized_gaussian_log_likelihood,
    draw_noise,
    math_dtype,
    mean_flat,
    normal_kl,
)
from diffusion.schedules import space_timesteps

__all__ = [
    "LEARNED_VAR_TYPES",
    "MEAN_TYPES",
    "OBJECTIVES",
    "VAR_TYPES",
    "BpdResult",
    "GaussianDiffusion",
    "Model",
    "PMeanVariance",
]

MEAN_TYPES = ("eps", "x0", "xprev")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
OBJECTIVES = ("simple", "hybrid", "vlb")
LEARNED_VAR_TYPES = ("learned", "learned_range")

Model = Callable[..., torch.Tensor]


class PMeanVariance(NamedTuple):
    """Output of :meth:`GaussianDiffusion.p_mean_variance`; also indexable by field name."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_xstart: torch.Tensor

    def __getitem__(self, key):  # type: ignore[override]
        return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)


@dataclass(frozen=True)
class BpdResult:
    """Per-image terms of the variational bound (Eq. 5), all in bits/dim.

    ``vb`` and the MSE columns are ordered by timestep, column t = L_t ([N, T]); indexable
    by field name (``result["total_bpd"]``).
    """

    total_bpd: torch.Tensor  # [N] sum_t vb[:, t] + prior_bpd
    prior_bpd: torch.Tensor  # [N] L_T = KL(q(x_T | x_0) || N(0, I))
    vb: torch.Tensor  # [N, T]
    xstart_mse: torch.Tensor  # [N, T]
    mse: torch.Tensor  # [N, T] epsilon MSE implied by the predicted x_0

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, key)


class GaussianDiffusion(ForwardProcess):
    """The diffusion process of Ho et al. (2020) with the changes of Nichol & Dhariwal (2021).

    Args:
        betas: float64 [T] noise schedule (see :mod:`diffusion.schedules`).
        mean_type: what the model predicts for the mean: "eps" (noise), "x0" or "xprev".
        var_type: "fixed_small" (beta~_t), "fixed_large" (b_t), "learned" (log variance
            directly) or "learned_range" (Eq. 15 interpolation between log b_t and log beta~_t).
        objective: "simple" (L_simple), "hybrid" (L_simple + lambda * L_vlb, Eq. 16; the vb
            term sees the mean frozen so it trains only the variance) or "vlb" (L_vlb alone).
        hybrid_lambda: lambda of Eq. 16 (0.001 in the paper).
        rescale_timesteps: feed the model t * 1000 / T (original T) instead of t.
        timestep_map: original timesteps of a respaced process (see :meth:`respace`).
        original_num_steps: T of the process this one was respaced from.
    """

    def __init__(
        self,
        betas: np.ndarray | Iterable[float],
        *,
        mean_type: str = "eps",
        var_type: str = "learned_range",
        objective: str = "hybrid",
        hybrid_lambda: float = 1e-3,
        rescale_timesteps: bool = False,
        timestep_map: Iterable[int] | None = None,
        original_num_steps: int | None = None,
    ) -> None:
        check_choice("mean_type", mean_type, MEAN_TYPES)
        check_choice("var_type", var_type, VAR_TYPES)
        check_choice("objective", objective, OBJECTIVES)
        learned = var_type in LEARNED_VAR_TYPES
        if objective == "hybrid" and not learned:
            raise ValueError(
                f"objective: 'hybrid' trains the variance through its vb term and needs "
                f"var_type in {LEARNED_VAR_TYPES}, got var_type={var_type!r}"
            )
        if objective == "simple" and learned:
            raise ValueError(
                f"objective: 'simple' gives a learned variance no training signal; with "
                f"var_type={var_type!r} use objective 'hybrid' or 'vlb', or a fixed var_type "
                f"{('fixed_small', 'fixed_large')}"
            )
        if not hybrid_lambda > 0:
            raise ValueError(f"hybrid_lambda: must be > 0, got {hybrid_lambda}")

        super().__init__(betas)
        self.mean_type = mean_type
        self.var_type = var_type
        self.objective = objective
        self.hybrid_lambda = float(hybrid_lambda)
        self.rescale_timesteps = bool(rescale_timesteps)
        self.timestep_map = (
            np.arange(self.num_timesteps)
            if timestep_map is None
            else np.asarray(list(timestep_map), dtype=np.int64)
        )
        if self.timestep_map.shape != (self.num_timesteps,):
            raise ValueError("timestep_map: needs one original timestep per beta")
        self.original_num_steps = int(original_num_steps or self.num_timesteps)

    # ------------------------------------------------------------------ configuration
    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(T={self.num_timesteps}, mean_type={self.mean_type!r}, "
            f"var_type={self.var_type!r}, objective={self.objective!r}, "
            f"original_T={self.original_num_steps})"
        )

    @property
    def learns_sigma(self) -> bool:
        """True when the model outputs 2C channels (mean and variance)."""
        return self.var_type in LEARNED_VAR_TYPES

    def respace(self, timesteps: str | Iterable[int]) -> GaussianDiffusion:
        """A process on a subsequence S of this one's timesteps (Sec. 4, strided sampling).

        b_{S_i} = 1 - abar_{S_i} / abar_{S_{i-1}} (abar before the first kept step = 1), so
        abar on S is unchanged. The model of the new process still receives the original
        timesteps S_i. ``timesteps`` is a spacing string for :func:`space_timesteps` or the
        kept timesteps themselves.
        """
        if isinstance(timesteps, str):
            keep = space_timesteps(self.num_timesteps, timesteps)
        else:
            keep = sorted({int(t) for t in timesteps})
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps: must be a non-empty subset of [0, {self.num_timesteps})")
        last = 1.0
        new_betas = []
        for i in keep:
            new_betas.append(1.0 - self.alphas_cumprod[i] / last)
            last = self.alphas_cumprod[i]
        return GaussianDiffusion(
            np.array(new_betas, dtype=np.float64),
            mean_type=self.mean_type,
            var_type=self.var_type,
            objective=self.objective,
            hybrid_lambda=self.hybrid_lambda,
            rescale_timesteps=self.rescale_timesteps,
            timestep_map=self.timestep_map[keep],
            original_num_steps=self.original_num_steps,
        )

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps the model sees for process indices ``t``: original steps, maybe rescaled."""
        mapped = self.cached_tensor(self.timestep_map, t.device, torch.int64)[t]
        if self.rescale_timesteps:
            return mapped.float() * (1000.0 / self.original_num_steps)
        return mapped

    def _call_model(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None
    ) -> torch.Tensor:
        return model(x, self.model_timesteps(t), **(model_kwargs or {}))

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
        model_output: torch.Tensor | None = None,
    ) -> PMeanVariance:
        """p(x_{t-1} | x_t): mean, variance, log variance and the predicted x_0.

        The model output (computed here unless ``model_output`` is given) has C channels, or
        2C when the variance is learned: [mean part, variance part]. With "learned_range" the
        variance part v in [-1, 1] gives log Sigma = f log b_t + (1 - f) log beta~_t,
        f = (v + 1)/2 (Eq. 15). ``clip_denoised`` clips the predicted x_0 to [-1, 1].
        """
        if model_output is None:
            model_output = self._call_model(model, x, t, model_kwargs)
        model_output = model_output.to(math_dtype(x))
        c = x.shape[1]
        expected = 2 * c if self.learns_sigma else c
        if model_output.shape[1] != expected:
            raise ValueError(
                f"model output has {model_output.shape[1]} channels; var_type="
                f"{self.var_type!r} needs {expected} for {c} input channels"
            )
        if self.var_type == "learned":
            model_output, var_values = torch.split(model_output, c, dim=1)
            model_log_variance = var_values
            model_variance = torch.exp(model_log_variance)
        elif self.var_type == "learned_range":
            model_output, var_values = torch.split(model_output, c, dim=1)
            min_log = self.extract(self.posterior_log_variance_clipped, t, x)
            max_log = self.extract(self.log_betas, t, x)
            frac = (var_values + 1) / 2  # v in [-1, 1] -> [0, 1], Eq. 15
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if self.var_type == "fixed_large":
                variance = self.fixed_large_variance
                log_variance = self.fixed_large_log_variance
            else:
                variance = self.posterior_variance
                log_variance = self.posterior_log_variance_clipped
            model_variance = self.extract(variance, t, x).expand_as(x)
            model_log_variance = self.extract(log_variance, t, x).expand_as(x)

        def process_xstart(x0: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.mean_type == "xprev":
            pred_xstart = process_xstart(self.predict_xstart_from_xprev(x, t, model_output))
            model_mean = model_output
        else:
            if self.mean_type == "x0":
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self.predict_xstart_from_eps(x, t, model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return PMeanVariance(model_mean, model_variance, model_log_variance, pred_xstart)

    # ------------------------------------------------------------------ sampling steps
    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t); no noise is added at t = 0.

        Returns {"sample": x_{t-1}, "pred_xstart": x_0 prediction}, both [N, C, H, W].
        """
        noise = torch.randn_like(x) if noise is None else noise
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )
        nonzero = (t != 0).to(out.mean.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # [N, 1, 1, 1]
        sample = out.mean + nonzero * torch.exp(0.5 * out.log_variance) * noise
        return {"sample": sample, "pred_xstart": out.pred_xstart}

    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step (Song et al. 2020, Eq. 12), eta = 0 deterministic, eta = 1 ~ DDPM.

        eps is recomputed from the (clipped) predicted x_0;
        sigma = eta * sqrt((1 - abar_prev)/(1 - abar)) * sqrt(1 - abar/abar_prev).
        """
        noise = torch.randn_like(x) if noise is None else noise
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )
        eps = self.predict_eps_from_xstart(x, t, out.pred_xstart)
        abar = self.extract(self.alphas_cumprod, t, x)
        abar_prev = self.extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = out.pred_xstart * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        nonzero = (t != 0).to(mean.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # [N, 1, 1, 1]
        return {"sample": mean + nonzero * sigma * noise, "pred_xstart": out.pred_xstart}

    # ------------------------------------------------------------------ bound and losses
    def vb_terms_bpd(
        self,
        model: Model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
        model_output: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One term of the bound per example, in bits/dim: L_{t-1} (a KL) for t > 0 and the
        decoder NLL L_0 for t = 0. Returns {"output": [N], "pred_xstart": [N, C, H, W]}."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(
            model,
            x_t,
            t,
            clip_denoised=clip_denoised,
            model_kwargs=model_kwargs,
            model_output=model_output,
        )
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / LOG2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out.mean, log_scales=0.5 * out.log_variance
        )
        decoder_nll = mean_flat(decoder_nll) / LOG2
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out.pred_xstart}

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-example training loss for one sampled t per example.

        * "simple": loss = mse = ||target - model||^2 averaged over dims (L_simple);
        * "hybrid": loss = mse + lambda * T * L_t (Eq. 16; with uniform t, T * L_t estimates
          L_vlb). The vb term sees the mean channels detached, so it only trains Sigma;
        * "vlb": loss = T * L_t (an unbiased estimate of L_vlb under uniform t).

        Returns {"loss", "mse", "vb"} each [N]; "mse"/"vb" are absent when the objective has
        no such term ("vlb" has no "mse", "simple" no "vb").
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: dict[str, torch.Tensor] = {}
        if self.objective == "vlb":
            vb = self.vb_terms_bpd(model, x_start, x_t, t, False, model_kwargs)["output"]
            terms["vb"] = vb
            terms["loss"] = vb * self.num_timesteps
            return terms

        model_output = self._call_model(model, x_t, t, model_kwargs)
        if self.learns_sigma:
            c = x_t.shape[1]
            mean_out, var_out = torch.split(model_output, c, dim=1)
            # Stop-gradient on the mean: the vb term trains only the variance (Sec. 3.1).
            frozen = torch.cat([mean_out.detach(), var_out], dim=1)
            vb = self.vb_terms_bpd(
                model, x_start, x_t, t, clip_denoised=False, model_output=frozen
            )["output"]
            # lambda * T (= T / 1000 for lambda = 0.001, computed the reference's way).
            terms["vb"] = vb * (self.num_timesteps / (1.0 / self.hybrid_lambda))
            model_output = mean_out
        if self.mean_type == "xprev":
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        elif self.mean_type == "x0":
            target = x_start
        else:
            target = noise
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per example in bits/dim; [N]."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / LOG2

    @torch.no_grad()
    def calc_bpd_loop(
        self,
        model: Model,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
        noise_fn: NoiseFn | None = None,
        generator: torch.Generator | None = None,
    ) -> BpdResult:
        """The full bound (Eq. 5) in bits/dim, one timestep per forward: the reference loop.

        For t = T-1, ..., 0 draws fresh noise (``noise_fn(t)`` if given), samples x_t and
        evaluates L_t. Columns of the result are ordered by timestep (column t = L_t). The
        fast equivalent is :func:`diffusion.likelihood.calc_bpd`.
        """
        vb, xstart_mse, mse = [], [], []
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x_start.shape[0],), i, device=x_start.device)
            noise = draw_noise(noise_fn, i, x_start, generator)
            x_t = self.q_sample(x_start, t, noise=noise)
            out = self.vb_terms_bpd(model, x_start, x_t, t, clip_denoised, model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        prior = self.prior_bpd(x_start)
        return BpdResult(
            # Summed in drawing order (t = T-1 first), as the reference does.
            total_bpd=torch.stack(vb, dim=1).sum(dim=1) + prior,
            prior_bpd=prior,
            vb=torch.stack(vb[::-1], dim=1),
            xstart_mse=torch.stack(xstart_mse[::-1], dim=1),
            mse=torch.stack(mse[::-1], dim=1),
        )
