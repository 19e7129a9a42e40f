"""Improved precision/recall (Kynkaanniemi et al. 2019) on synthetic Gaussians, and the
blockwise computation against an unblocked brute force."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

from diffusion.metrics import precision_recall


def brute_force(real, fake, k):
    """The definition, with full float64 distance matrices."""

    def radii(x):  # k-th neighbour, itself excluded: index k of the sorted row (0 = itself)
        return np.sort(cdist(x, x), axis=1)[:, k]

    d = cdist(fake, real)  # [N_f, N_r]
    precision = np.mean((d <= radii(real)[None, :]).any(axis=1))
    recall = np.mean((d <= radii(fake)[:, None]).any(axis=0))
    return float(precision), float(recall)


def gaussian(n, d, seed, loc=0.0, scale=1.0):
    return np.random.default_rng(seed).normal(loc, scale, size=(n, d))


def test_identical_sets_have_full_precision_and_recall():
    x = gaussian(500, 16, 0)
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_same_distribution_has_high_precision_and_recall():
    precision, recall = precision_recall(gaussian(1000, 8, 1), gaussian(1000, 8, 2))
    assert precision > 0.85 and recall > 0.85


def test_disjoint_sets_have_zero_precision_and_recall():
    assert precision_recall(gaussian(300, 8, 3), gaussian(300, 8, 4, loc=50.0)) == (0.0, 0.0)


def test_fake_set_covering_a_small_part_of_real_has_low_recall():
    real = gaussian(2000, 2, 5)
    fake = gaussian(2000, 2, 6, scale=0.1)  # mode collapse onto the centre
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.95
    assert recall < 0.1
    # and the roles swap when the fake set is the broad one
    precision, recall = precision_recall(fake, real, k=3)
    assert precision < 0.1 and recall > 0.95


@pytest.mark.parametrize("batch_size", [3, 7, 50, 10_000])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_blockwise_equals_brute_force(batch_size, k):
    real, fake = gaussian(137, 5, 7), gaussian(91, 5, 8, loc=0.3, scale=1.3)
    result = precision_recall(real, fake, k=k, batch_size=batch_size)
    assert result == brute_force(real, fake, k)
    assert all(isinstance(v, float) for v in result)


@settings(max_examples=25, deadline=None)
@given(
    n_real=st.integers(4, 60),
    n_fake=st.integers(4, 60),
    d=st.integers(1, 6),
    k=st.integers(1, 3),
    batch_size=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_blockwise_equals_brute_force_property(n_real, n_fake, d, k, batch_size, seed):
    real, fake = gaussian(n_real, d, seed), gaussian(n_fake, d, seed + 1, loc=0.5)
    assert precision_recall(real, fake, k=k, batch_size=batch_size) == brute_force(real, fake, k)


def test_accepts_torch_tensors():
    real, fake = gaussian(60, 3, 9), gaussian(40, 3, 10)
    expected = precision_recall(real, fake)
    assert precision_recall(torch.from_numpy(real), torch.from_numpy(fake).float()) == expected


def test_input_errors():
    x = gaussian(10, 3, 11)
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(x, gaussian(10, 4, 12))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        precision_recall(x[0], x)
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(x, x[:3])
    with pytest.raises(ValueError, match="k:"):
        precision_recall(x, x, k=0)
    with pytest.raises(ValueError, match="batch_size"):
        precision_recall(x, x, batch_size=0)
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(x, np.full((10, 3), np.nan))
