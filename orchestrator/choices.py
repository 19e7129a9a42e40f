"""The ``diffscale`` command's argparse choices as plain tuples, so that building the parser
imports no torch, scipy or MLflow. Each mirrors a registry (a test keeps them equal):

- ``DATASET_NAMES``: ``diffusion.data.registry.DATASETS``;
- ``NLL_KINDS``: ``diffusion.likelihood.NLL_KINDS``;
- ``SAMPLING_METHODS``: ``diffusion.sampling.SAMPLING_METHODS``;
- ``FEATURE_EXTRACTOR_NAMES``: ``diffusion.metrics.registry.FEATURE_EXTRACTORS``;
- ``FIT_FORMS``: ``orchestrator.analysis.fit.FORMS``.
"""

from __future__ import annotations

__all__ = [
    "DATASET_NAMES",
    "FEATURE_EXTRACTOR_NAMES",
    "FIT_FORMS",
    "NLL_KINDS",
    "SAMPLING_METHODS",
]

DATASET_NAMES = ("digits", "cifar10", "imagenet64", "folder")
NLL_KINDS = ("full", "subset")
SAMPLING_METHODS = ("ancestral", "ddim")
FEATURE_EXTRACTOR_NAMES = ("digits", "inception")  # sorted, as `--features` lists them
FIT_FORMS = ("henighan", "power", "chinchilla")
