"""scikit-learn's handwritten digits (1,797 real 8x8 images, shipped inside the package):
the offline default dataset, so demos and tests need no network.

Pixels are 0..16 in the source; they are mapped to uint8 by round(v * 255 / 16). The split
is fixed: a permutation of all images by numpy's default_rng(0); the first 297 images of it
are the test split and the other 1,500 the train split.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["DIGITS_TEST_SIZE", "SPLITS", "load_digits_uint8"]

DIGITS_TEST_SIZE = 297
SPLITS = ("train", "test")


@lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [N, 1, 8, 8]
    order = np.random.default_rng(0).permutation(len(images))
    return images[order], bunch.target[order].astype(np.int64)


def load_digits_uint8(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 1, 8, 8] uint8 and labels [N] int64 of the fixed ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}; allowed values: {list(SPLITS)}")
    images, labels = _all_digits()
    part = slice(0, DIGITS_TEST_SIZE) if split == "test" else slice(DIGITS_TEST_SIZE, None)
    return images[part].copy(), labels[part].copy()
