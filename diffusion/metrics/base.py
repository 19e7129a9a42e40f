"""The interface every feature extractor of the Frechet distance and precision/recall
implements; the implementations and their registry live in their own modules
(:mod:`diffusion.metrics.registry`)."""

from __future__ import annotations

import abc

import numpy as np
import torch

from diffusion.images import images_to_unit_range

__all__ = ["FeatureExtractor"]


class FeatureExtractor(abc.ABC):
    """Maps images [N, C, H, W] (uint8, or float in [-1, 1]) to features np.ndarray float32
    [N, dim], batched under torch.no_grad on ``device``.

    Attributes: ``name`` (registry name), ``dim``, ``fd_metric`` (the name under which the
    Frechet distance in this feature space is reported), ``info`` (what identifies the
    network: weights file, version, accuracy; for logging with the metric).
    """

    name: str
    dim: int
    fd_metric: str

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 200) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.info: dict[str, object] = {"name": self.name, "dim": self.dim}

    @abc.abstractmethod
    def _check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ValueError if images of this shape [N, C, H, W] are not supported."""

    @abc.abstractmethod
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, dim] of a batch x [B, C, H, W] float32 in [0, 1] on self.device."""

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        x = images_to_unit_range(images)
        self._check_shape(tuple(x.shape))
        out = np.empty((x.shape[0], self.dim), dtype=np.float32)
        with torch.no_grad():
            for i in range(0, x.shape[0], self.batch_size):
                batch = x[i : i + self.batch_size].to(self.device)
                out[i : i + batch.shape[0]] = self._features(batch).float().cpu().numpy()
        return out
