"""Frechet distance (Heusel et al. 2017): identities, agreement with the scipy.linalg.sqrtm
formula, exactness for rank-deficient covariances, statistics and their .npz cache."""

import itertools

import numpy as np
import pytest
import scipy.linalg

from diffusion.metrics import (
    feature_statistics,
    frechet_distance,
    load_statistics,
    save_statistics,
)


def sqrtm_reference(mu1, sigma1, mu2, sigma2):
    """The textbook formula with scipy's general matrix square root (full-rank inputs only)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def random_statistics(rng, d):
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T / d + 0.1 * np.eye(d)


def test_a_set_against_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(1000, 10)) * np.arange(1, 11)
    mu, sigma = feature_statistics(x)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_grows_monotonically_with_added_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 8))
    noise = rng.normal(size=x.shape)
    mu, sigma = feature_statistics(x)
    values = [
        frechet_distance(mu, sigma, *feature_statistics(x + s * noise)) for s in (0.1, 0.3, 1, 3)
    ]
    assert values[0] > 0
    assert all(a < b for a, b in itertools.pairwise(values)), values


@pytest.mark.parametrize("d", [2, 16, 64])
def test_agrees_with_sqrtm_formula_on_full_rank_statistics(d):
    rng = np.random.default_rng(d)
    stats1, stats2 = random_statistics(rng, d), random_statistics(rng, d)
    expected = sqrtm_reference(*stats1, *stats2)
    assert frechet_distance(*stats1, *stats2) == pytest.approx(expected, rel=1e-6)


def test_gaussians_with_commuting_covariances_match_the_closed_form():
    # diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    s1, s2 = np.array([1.0, 4.0, 0.0]), np.array([9.0, 1.0, 2.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 3.0])
    expected = 14.0 + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(
        expected, rel=1e-12
    )


def rank_deficient_case(seed, n1=20, n2=25, d=64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n1, d)) @ rng.normal(size=(d, d)) / 4
    y = rng.normal(size=(n2, d)) + 0.5
    return x, y


def nuclear_norm_reference(x, y):
    """With centred data A [n1, D], B [n2, D]: S1 = A^T A/(n1-1), S2 = B^T B/(n2-1) and the
    nonzero eigenvalues of S1 S2 are the squared singular values of A B^T/sqrt((n1-1)(n2-1)),
    so tr((S1 S2)^{1/2}) is a nuclear norm of a small matrix: an independent exact route."""
    a, b = x - x.mean(0), y - y.mean(0)
    tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(
        (len(x) - 1) * (len(y) - 1)
    )
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    diff = x.mean(0) - y.mean(0)
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_deficient_covariances_are_exact(seed):
    x, y = rank_deficient_case(seed)  # 20 and 25 samples in 64 dimensions
    sx, sy = feature_statistics(x), feature_statistics(y)
    value = frechet_distance(*sx, *sy)
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(nuclear_norm_reference(x, y), rel=1e-12)
    assert frechet_distance(*sy, *sx) == pytest.approx(value, rel=1e-9)
    # a rank-19 set against itself: exactly 0 up to round-off, relative to its scale
    assert frechet_distance(*sx, *sx) <= 1e-9 * np.trace(sx[1])


def test_rank_deficient_invariant_to_rotation_and_translation():
    x, y = rank_deficient_case(3)
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    shift = rng.normal(size=64)
    value = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    moved = frechet_distance(*feature_statistics(x @ q + shift), *feature_statistics(y @ q + shift))
    assert moved == pytest.approx(value, rel=1e-9)


def test_shape_and_value_errors():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="mu1"):
        frechet_distance(np.zeros((3, 1)), sigma, mu, sigma)
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(mu, sigma, mu, np.eye(4))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(mu, sigma, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="symmetric"):
        frechet_distance(mu, np.triu(np.ones((3, 3))), mu, sigma)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, sigma, np.array([0.0, np.nan, 0.0]), sigma)


def test_feature_statistics_match_numpy_and_validate():
    x = np.random.default_rng(5).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False, ddof=1))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        feature_statistics(np.zeros(5))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 3)))


def test_statistics_round_trip_through_npz(tmp_path):
    mu, sigma = random_statistics(np.random.default_rng(6), 5)
    path = save_statistics(
        tmp_path / "ref" / "digits_test.npz", mu, sigma, extractor="digits", n=297
    )
    with np.load(path) as raw:
        assert {"mu", "sigma"} <= set(raw.files)
    mu2, sigma2, meta = load_statistics(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert meta == {"extractor": "digits", "n": 297}
    with pytest.raises(ValueError, match="reserved"):
        save_statistics(tmp_path / "x.npz", mu, sigma, mu=1)
    with pytest.raises(ValueError, match=r"\.npz"):
        save_statistics(tmp_path / "x.npy", mu, sigma)
