"""Pixel ranges and image grids, one place for data, sampling and metrics.

Three ranges meet here: uint8 pixels k in 0..255 (datasets, PNGs), the model range [-1, 1]
where k sits at the bin centre -1 + 2k/255 of the discretized decoder (Ho et al. 2020
Eq. 13), and the unit range [0, 1] that feature networks expect.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "image_grid",
    "images_to_unit_range",
    "save_image_grid",
    "to_model_range",
    "to_uint8",
]

# Samples come out of the sampler clipped to [-1, 1]; allow float round-off, reject anything
# else (e.g. floats in [0, 255]) rather than silently rescale it.
UNIT_RANGE_TOLERANCE = 1e-3


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels k -> float32 -1 + 2k/255, the bin centres of the discretized decoder."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise ValueError(f"images: expected uint8 pixels, got {x.dtype}")
    return x.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> the nearest uint8 pixels round((x + 1) * 127.5), on the CPU.

    Values outside [-1, 1] are clipped first; inverts :func:`to_model_range` exactly.
    """
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def images_to_unit_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels k -> k/255, float images in [-1, 1] -> (x + 1)/2; float32 [N, C, H, W]."""
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"images: expected shape [N, C, H, W], got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"images: expected uint8 or floating point, got {x.dtype}")
    x = x.float()
    tol = UNIT_RANGE_TOLERANCE
    if x.numel() and (x.min() < -1 - tol or x.max() > 1 + tol):
        raise ValueError(
            f"images: float images must lie in [-1, 1], got [{x.min():.4g}, {x.max():.4g}]"
        )
    return (x.clamp(-1.0, 1.0) + 1.0) / 2.0


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1) -> np.ndarray:
    """Tile [N, C, H, W] images in [-1, 1] into one uint8 array [rows*H, cols*W, C]."""
    if images.ndim != 4:
        raise ValueError(f"images: expected [N, C, H, W], got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol_rows = math.ceil(n / nrow)
    pixels = to_uint8(images)
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
