"""Feature extractors for the Frechet distance and precision/recall, behind one interface.

Two are registered:
- "inception": pytorch-fid's FID Inception v3, 2048-d pool3 features, the network every FID
  in the literature uses (Heusel et al. 2017); the metric is "fid".
- "digits": a small CNN trained here on the digits train split, penultimate-layer features.
  It is NOT Inception, so its Frechet distance is reported as "digits_fd" ("Frechet distance
  in digits-classifier feature space") and is not comparable with any published FID.
"""

from __future__ import annotations

import abc
import logging

import numpy as np
import torch

__all__ = [
    "FEATURE_EXTRACTORS",
    "FeatureExtractor",
    "get_feature_extractor",
    "images_to_unit_range",
]

logger = logging.getLogger(__name__)

FEATURE_EXTRACTORS = ("inception", "digits")

# Samples come out of the sampler clipped to [-1, 1]; allow float round-off, reject anything
# else (e.g. floats in [0, 255]) rather than silently rescale it.
_RANGE_TOL = 1e-3


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
    if x.numel() and (x.min() < -1 - _RANGE_TOL or x.max() > 1 + _RANGE_TOL):
        raise ValueError(
            f"images: float images must lie in [-1, 1], got [{x.min():.4g}, {x.max():.4g}]"
        )
    return (x.clamp(-1.0, 1.0) + 1.0) / 2.0


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


def get_feature_extractor(name: str, **kwargs: object) -> FeatureExtractor:
    """Build a registered extractor: "inception" (kwargs of ``InceptionFeatureExtractor``) or
    "digits" (kwargs of ``DigitsFeatureExtractor``)."""
    if name == "inception":
        from diffusion.metrics.inception import InceptionFeatureExtractor

        return InceptionFeatureExtractor(**kwargs)
    if name == "digits":
        from diffusion.metrics.digits_features import DigitsFeatureExtractor

        return DigitsFeatureExtractor(**kwargs)
    raise ValueError(f"feature extractor: got {name!r}; allowed values: {list(FEATURE_EXTRACTORS)}")
