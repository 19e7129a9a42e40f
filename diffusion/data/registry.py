"""The dataset registry: each dataset declares here, in one place, its preparer (the source
factory that reads its official format), its splits, its image shape, the feature extractor
its Frechet distance uses by default, and whether it is built in.

A built-in dataset ("digits", shipped with scikit-learn) can be named bare as a trial's
dataset: it needs no source and is prepared on demand. Any other dataset is named by the URI
of its prepared shards (``prepare_dataset``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from diffusion.data.folder import folder_source
from diffusion.data.sources import Source, cifar10_source, digits_source, imagenet64_source

__all__ = ["DATASETS", "DatasetSpec", "builtin_dataset", "default_features", "get_dataset"]

DEFAULT_FEATURES = "inception"  # the feature network of every published FID


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: how it is prepared, what it holds and how its samples are judged."""

    name: str
    source: Callable[..., Source]  # the preparer's source factory
    splits: tuple[str, ...] | None  # None: whatever the source provides (folder)
    image_shape: tuple[int, int, int] | None  # (C, H, W); None: chosen at preparation
    features: str  # default feature extractor for the Frechet distance
    builtin: bool = False  # usable by name as data.dataset, no source needed

    def load_split(self, split: str) -> np.ndarray:
        """Images uint8 [N, C, H, W] of ``split`` of a built-in dataset, read offline."""
        if not self.builtin:
            raise ValueError(
                f"dataset: {self.name!r} is not built in; prepare it with prepare_dataset "
                "and read the shards at its URI"
            )
        if split not in (self.splits or ()):
            raise ValueError(f"split: got {split!r}; allowed values: {list(self.splits or ())}")
        batches = self.source().splits[split]()
        return np.concatenate([images for images, _ in batches])


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="digits",
            source=digits_source,
            splits=("train", "test"),
            image_shape=(1, 8, 8),
            features="digits",
            builtin=True,
        ),
        DatasetSpec(
            name="cifar10",
            source=cifar10_source,
            splits=("train", "test"),
            image_shape=(3, 32, 32),
            features=DEFAULT_FEATURES,
        ),
        DatasetSpec(
            name="imagenet64",
            source=imagenet64_source,
            splits=("train", "val"),
            image_shape=(3, 64, 64),
            features=DEFAULT_FEATURES,
        ),
        DatasetSpec(
            name="folder",
            source=folder_source,
            splits=None,
            image_shape=None,
            features=DEFAULT_FEATURES,
        ),
    )
}


def get_dataset(name: str) -> DatasetSpec:
    """The registered dataset ``name``; ValueError naming the allowed values otherwise."""
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown name {name!r}; allowed values: {sorted(DATASETS)}")
    return DATASETS[name]


def builtin_dataset(name_or_uri: str) -> DatasetSpec | None:
    """The spec when ``name_or_uri`` names a built-in dataset; None when it is a URI."""
    spec = DATASETS.get(name_or_uri)
    return spec if spec is not None and spec.builtin else None


def default_features(name_or_uri: str) -> str:
    """The default feature extractor: a built-in dataset's own, else "inception"."""
    spec = builtin_dataset(name_or_uri)
    return spec.features if spec is not None else DEFAULT_FEATURES
