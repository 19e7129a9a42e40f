"""Sampling loops: ancestral (full or strided, Sec. 4) and DDIM (Song et al. 2020).

Strided sampling is ancestral sampling on a respaced process:
``sample(diffusion.respace("50"), model, shape)``. Every random draw can be injected: the
initial x_T as ``noise``, per-step noise through ``step_noise(i)``, or both drawn from a
``generator`` in a fixed order (x_T first, then one draw per step, t = T-1 ... 0), the
same order as the reference implementation, so seeded runs replay exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion.gaussian import GaussianDiffusion, Model

__all__ = [
    "SAMPLING_METHODS",
    "ddim_sample",
    "ddim_sample_loop",
    "image_grid",
    "p_sample",
    "p_sample_loop",
    "sample",
    "save_image_grid",
]

StepNoise = Callable[[int], torch.Tensor]
SAMPLING_METHODS = ("ancestral", "ddim")


def p_sample(
    diffusion: GaussianDiffusion,
    model: Model,
    x: torch.Tensor,
    t: torch.Tensor,
    *,
    noise: torch.Tensor,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t); no noise is added at t = 0.

    Returns (x_{t-1}, predicted x_0), both [N, C, H, W].
    """
    out = diffusion.p_mean_variance(
        model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
    )
    nonzero = (t != 0).to(out.mean.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # [N, 1, 1, 1]
    return out.mean + nonzero * torch.exp(0.5 * out.log_variance) * noise, out.pred_xstart


def ddim_sample(
    diffusion: GaussianDiffusion,
    model: Model,
    x: torch.Tensor,
    t: torch.Tensor,
    *,
    noise: torch.Tensor,
    eta: float = 0.0,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (Song et al. 2020, Eq. 12), eta = 0 deterministic, eta = 1 ~ DDPM.

    eps is recomputed from the (clipped) predicted x_0;
    sigma = eta * sqrt((1 - abar_prev)/(1 - abar)) * sqrt(1 - abar/abar_prev).
    """
    out = diffusion.p_mean_variance(
        model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
    )
    eps = diffusion.predict_eps_from_xstart(x, t, out.pred_xstart)
    abar = diffusion._extract(diffusion.alphas_cumprod, t, x)
    abar_prev = diffusion._extract(diffusion.alphas_cumprod_prev, t, x)
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
    mean_pred = out.pred_xstart * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
    nonzero = (t != 0).to(mean_pred.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # [N, 1, 1, 1]
    return mean_pred + nonzero * sigma * noise, out.pred_xstart


def _loop(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: Sequence[int],
    step: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    *,
    noise: torch.Tensor | None,
    step_noise: StepNoise | None,
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype,
    progress: bool,
    **step_kwargs,
) -> torch.Tensor:
    shape = tuple(shape)

    def draw() -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    x = draw() if noise is None else noise.to(device=device, dtype=dtype)
    if tuple(x.shape) != shape:
        raise ValueError(f"noise: shape {tuple(x.shape)} != requested shape {shape}")
    indices = list(range(diffusion.num_timesteps))[::-1]
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="sampling", leave=False)
    for i in indices:
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        z = draw() if step_noise is None else step_noise(i).to(device=device, dtype=dtype)
        with torch.no_grad():
            x, _ = step(diffusion, model, x, t, noise=z, **step_kwargs)
    return x


def p_sample_loop(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: Sequence[int],
    *,
    noise: torch.Tensor | None = None,
    step_noise: StepNoise | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling over every step of ``diffusion`` (respace it for strided sampling).

    Returns x_0 samples [N, C, H, W] (shape = ``shape``), in [-1, 1] when clipping.
    """
    return _loop(
        diffusion, model, shape, p_sample, noise=noise, step_noise=step_noise,
        generator=generator, device=device, dtype=dtype, progress=progress,
        clip_denoised=clip_denoised, model_kwargs=model_kwargs,
    )  # fmt: skip


def ddim_sample_loop(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: Sequence[int],
    *,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    step_noise: StepNoise | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM sampling over every step of ``diffusion`` (respace it, e.g. ``"ddim50"``)."""
    if eta < 0:
        raise ValueError(f"eta: must be >= 0, got {eta}")
    return _loop(
        diffusion, model, shape, ddim_sample, noise=noise, step_noise=step_noise,
        generator=generator, device=device, dtype=dtype, progress=progress,
        eta=eta, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
    )  # fmt: skip


def sample(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: Sequence[int],
    *,
    steps: str | int | None = None,
    method: str = "ancestral",
    eta: float = 0.0,
    **kwargs,
) -> torch.Tensor:
    """Sample with ``steps`` strided steps (a spacing string or a count; None = all T).

    ``method`` is "ancestral" or "ddim"; other keyword arguments go to the loop.
    """
    if method not in SAMPLING_METHODS:
        raise ValueError(f"method: got {method!r}; allowed values: {list(SAMPLING_METHODS)}")
    if steps is not None and str(steps) != str(diffusion.num_timesteps):
        diffusion = diffusion.respace(str(steps))
    if method == "ddim":
        return ddim_sample_loop(diffusion, model, shape, eta=eta, **kwargs)
    return p_sample_loop(diffusion, model, shape, **kwargs)


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1) -> np.ndarray:
    """Tile [N, C, H, W] images in [-1, 1] into one uint8 array [rows*H, cols*W, C]."""
    if images.ndim != 4:
        raise ValueError(f"images: expected [N, C, H, W], got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol_rows = math.ceil(n / nrow)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = np.zeros(
        (ncol_rows * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8
    )
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = pixels[k].permute(1, 2, 0).numpy()  # [C,H,W] -> [H,W,C]
    return grid


def save_image_grid(
    images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1
) -> Path:
    """Write a PNG grid of [N, C, H, W] images in [-1, 1]; ``scale`` enlarges small images."""
    grid = image_grid(images, nrow=nrow)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
