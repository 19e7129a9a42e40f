"""Feature extractors for the Frechet distance and precision/recall, by name.

Two are registered:
- "inception": pytorch-fid's FID Inception v3, 2048-d pool3 features, the network every FID
  in the literature uses (Heusel et al. 2017); the metric is "fid".
- "digits": a small CNN trained here on the digits train split, penultimate-layer features.
  It is NOT Inception, so its Frechet distance is reported as "digits_fd" ("Frechet distance
  in digits-classifier feature space") and is not comparable with any published FID.
"""

from __future__ import annotations

from collections.abc import Callable

from diffusion.metrics.base import FeatureExtractor
from diffusion.metrics.digits_features import DigitsFeatureExtractor
from diffusion.metrics.inception import InceptionFeatureExtractor

__all__ = ["FEATURE_EXTRACTORS", "get_feature_extractor"]

FEATURE_EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {
    "inception": InceptionFeatureExtractor,
    "digits": DigitsFeatureExtractor,
}


def get_feature_extractor(name: str, **kwargs: object) -> FeatureExtractor:
    """Build a registered extractor: "inception" (kwargs of ``InceptionFeatureExtractor``) or
    "digits" (kwargs of ``DigitsFeatureExtractor``)."""
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(
            f"feature extractor: got {name!r}; allowed values: {list(FEATURE_EXTRACTORS)}"
        )
    return FEATURE_EXTRACTORS[name](**kwargs)
