"""The paper's sample-quality metrics: Frechet distance (FID, Heusel et al. 2017) and improved
precision/recall (Kynkaanniemi et al. 2019), over pluggable feature extractors ("inception":
pytorch-fid's FID Inception; "digits": an offline digits classifier, reported as "digits_fd").
"""

from diffusion.metrics.base import FeatureExtractor
from diffusion.metrics.frechet import (
    feature_statistics,
    frechet_distance,
    load_statistics,
    save_statistics,
)
from diffusion.metrics.precision_recall import precision_recall
from diffusion.metrics.registry import FEATURE_EXTRACTORS, get_feature_extractor

__all__ = [
    "FEATURE_EXTRACTORS",
    "FeatureExtractor",
    "feature_statistics",
    "frechet_distance",
    "get_feature_extractor",
    "load_statistics",
    "precision_recall",
    "save_statistics",
]
