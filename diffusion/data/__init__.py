"""Datasets: the offline digits, and every dataset as Parquet shards (local or S3).

- ``digits``: scikit-learn's handwritten digits with a fixed train/test split (offline).
- ``storage``: URI (local path or ``s3://bucket/prefix``) -> pyarrow filesystem and path.
- ``shards``: the on-disk format (Parquet shards + a manifest written last) and its reader.
- ``registry``: every dataset (digits, cifar10, imagenet64, folder) with its preparer,
  splits, image shape and default feature extractor; ``digits`` is the built-in one.
- ``prepare``: ``prepare_dataset(name, out_uri, **options)`` for any registered dataset
  (readers in ``sources``, ``folder``).
- ``loader``: ``ShardLoader``, the deterministic, resumable, DDP-aware batch stream.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusion.data.digits import DIGITS_TEST_SIZE, load_digits_uint8
    from diffusion.data.loader import ShardLoader
    from diffusion.data.prepare import PREPARERS, PrepareResult, prepare_dataset
    from diffusion.data.registry import (
        DATASETS,
        DatasetSpec,
        builtin_dataset,
        default_features,
        get_dataset,
    )
    from diffusion.data.shards import (
        IncompleteDatasetError,
        Manifest,
        ShardChecksumError,
        ShardDataset,
        SplitInfo,
        open_dataset,
    )
    from diffusion.data.storage import resolve
    from diffusion.images import to_model_range

# Imported on first use: ``from diffusion.data import storage`` (the sweep store, configs)
# loads neither torch nor scikit-learn. Each name -> the module that defines it.
_WHERE = {
    **dict.fromkeys(("DIGITS_TEST_SIZE", "load_digits_uint8"), "diffusion.data.digits"),
    "ShardLoader": "diffusion.data.loader",
    **dict.fromkeys(("PREPARERS", "PrepareResult", "prepare_dataset"), "diffusion.data.prepare"),
    **dict.fromkeys(
        ("DATASETS", "DatasetSpec", "builtin_dataset", "default_features", "get_dataset"),
        "diffusion.data.registry",
    ),
    **dict.fromkeys(
        (
            "IncompleteDatasetError",
            "Manifest",
            "ShardChecksumError",
            "ShardDataset",
            "SplitInfo",
            "open_dataset",
        ),
        "diffusion.data.shards",
    ),
    "resolve": "diffusion.data.storage",
    "to_model_range": "diffusion.images",
}

__all__ = [
    "DATASETS",
    "DIGITS_TEST_SIZE",
    "PREPARERS",
    "DatasetSpec",
    "IncompleteDatasetError",
    "Manifest",
    "PrepareResult",
    "ShardChecksumError",
    "ShardDataset",
    "ShardLoader",
    "SplitInfo",
    "builtin_dataset",
    "default_features",
    "get_dataset",
    "load_digits_uint8",
    "open_dataset",
    "prepare_dataset",
    "resolve",
    "to_model_range",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
