"""One optimisation step of a diffusion model and the EMA of its weights.

Shared by the benchmark, the demo and the Ray Train worker loop, so all three train the
same way: t ~ sampler, loss = mean(weight_t * loss_t) (Eq. 18 weights; all ones for the
uniform sampler), AdamW, optional gradient clipping, EMA update.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext

import torch
from torch import nn

from diffusion.gaussian import GaussianDiffusion
from diffusion.timesteps import TimestepSampler

__all__ = ["EMA", "make_optimizer", "train_step"]


class EMA:
    """Exponential moving average of a model's parameters (Polyak averaging, rate 0.9999 in
    the paper): ema <- rate * ema + (1 - rate) * theta after every step.

    ``module`` is a full copy of the model (eval mode) that sampling and evaluation use.
    """

    def __init__(self, model: nn.Module, rate: float = 0.9999) -> None:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"ema rate: must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.module = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in _unwrap(model).parameters()]
        torch._foreach_mul_(ema_params, self.rate)
        torch._foreach_add_(ema_params, params, alpha=1.0 - self.rate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


def make_optimizer(
    params, lr: float = 1e-4, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW (the paper trains with Adam, lr 1e-4) using the fused single-kernel update.

    The fused kernel (CPU and CUDA) computes the same update as the default multi-tensor
    one and, on the 2-core CPU, takes ~7 ms instead of ~30 ms per step for a 10M model.
    """
    params = list(params)
    devices = {p.device.type for p in params if isinstance(p, torch.Tensor)}
    fused = devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused)


def train_step(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    sampler: TimestepSampler,
    optimizer: torch.optim.Optimizer,
    x_start: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    ema: EMA | None = None,
    grad_clip: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    model_kwargs: dict | None = None,
) -> dict[str, torch.Tensor]:
    """One step on a batch ``x_start`` [B, C, H, W] in [-1, 1].

    t and the noise are drawn on the CPU from ``generator`` (so runs replay exactly on any
    device) and moved to the batch's device. ``autocast_dtype`` (e.g. torch.bfloat16) runs
    the model under autocast; the diffusion math stays in float32. Returns detached
    per-example tensors: "t", "loss", "mse", "vb" (when the objective has them), the
    weighted scalar "objective" and, with clipping, "grad_norm".
    """
    device = x_start.device
    t, weights = sampler.sample(x_start.shape[0], device=device, generator=generator)
    noise = torch.randn(x_start.shape, generator=generator, dtype=x_start.dtype).to(device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else nullcontext()
    )
    with autocast:
        terms = diffusion.training_losses(model, x_start, t, noise=noise, model_kwargs=model_kwargs)
    sampler.update(t, terms["loss"].detach())
    objective = (terms["loss"] * weights).mean()
    if not math.isfinite(objective.item()):
        raise FloatingPointError(f"training loss is {objective.item()}")

    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    out = {k: v.detach() for k, v in terms.items()}
    if grad_clip is not None:
        out["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).detach()
    optimizer.step()
    if ema is not None:
        ema.update(model)
    out["t"] = t
    out["objective"] = objective.detach()
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return getattr(model, "module", model)
