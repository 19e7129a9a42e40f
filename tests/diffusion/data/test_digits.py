"""diffusion.data.digits: the built-in offline dataset and its fixed split."""

import numpy as np
import pytest
import torch

from diffusion.data import DIGITS_TEST_SIZE, load_digits_uint8
from diffusion.images import to_model_range


def test_digits_split_is_fixed_disjoint_and_in_range():
    train, ytr = load_digits_uint8("train")
    test, yte = load_digits_uint8("test")
    assert train.shape == (1797 - DIGITS_TEST_SIZE, 1, 8, 8) and test.shape[0] == DIGITS_TEST_SIZE
    assert train.dtype == np.uint8 and train.max() == 255 and train.min() == 0
    assert set(np.unique(ytr)) == set(range(10)) and set(np.unique(yte)) == set(range(10))
    # disjoint: no test image appears in train (digits has very few exact duplicates)
    train_set = {im.tobytes() for im in train}
    assert sum(im.tobytes() in train_set for im in test) <= 2
    x = to_model_range(test)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    with pytest.raises(ValueError, match="split"):
        load_digits_uint8("val")
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(x)
