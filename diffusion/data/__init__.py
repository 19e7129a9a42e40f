"""Datasets: the offline digits, and every dataset as Parquet shards (local or S3).

- ``digits``: scikit-learn's handwritten digits with a fixed train/test split (offline).
- ``storage``: URI (local path or ``s3://bucket/prefix``) -> pyarrow filesystem and path.
- ``shards``: the on-disk format (Parquet shards + a manifest written last) and its reader.
- ``prepare``: ``prepare_dataset(name, out_uri, **options)`` for digits, cifar10, imagenet64
  and folder sources (``sources``, ``folder``).
- ``loader``: ``ShardLoader``, the deterministic, resumable, DDP-aware batch stream.
"""

from diffusion.data.digits import DIGITS_TEST_SIZE, load_digits_uint8, to_model_range
from diffusion.data.loader import ShardLoader
from diffusion.data.prepare import PREPARERS, PrepareResult, prepare_dataset
from diffusion.data.shards import (
    IncompleteDatasetError,
    Manifest,
    ShardChecksumError,
    ShardDataset,
    SplitInfo,
    open_dataset,
)
from diffusion.data.storage import resolve

__all__ = [
    "DIGITS_TEST_SIZE",
    "PREPARERS",
    "IncompleteDatasetError",
    "Manifest",
    "PrepareResult",
    "ShardChecksumError",
    "ShardDataset",
    "ShardLoader",
    "SplitInfo",
    "load_digits_uint8",
    "open_dataset",
    "prepare_dataset",
    "resolve",
    "to_model_range",
]
