"""Frechet distance between Gaussians fitted to features: FID (Heusel et al. 2017) when the
features are Inception pool3 activations, "digits_fd" when they come from the offline digits
classifier (see ``diffusion.metrics.features``).

    d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})

The usual implementation (pytorch-fid, the TTUR code) takes ``scipy.linalg.sqrtm(S1 @ S2)``,
which is ill-conditioned for singular covariances (fewer samples than feature dimensions) and
returns complex junk that is then silently dropped. Only the trace of the root is needed:
the eigenvalues of S1 S2 equal those of the symmetric PSD matrix S1^{1/2} S2 S1^{1/2}, so

    tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(S1^{1/2} S2 S1^{1/2})),

with S1^{1/2} from a symmetric eigendecomposition. This is exact for any PSD inputs, singular
or not, and stays real.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

__all__ = ["feature_statistics", "frechet_distance", "load_statistics", "save_statistics"]

logger = logging.getLogger(__name__)

# Covariances whose asymmetry exceeds this (relative to their largest entry) are rejected:
# round-off from np.cov is orders of magnitude smaller; anything larger is a caller's bug.
_SYMMETRY_RTOL = 1e-6


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, ...]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or mu.shape[0] == 0:
        raise ValueError(f"mu{which}: expected a non-empty vector [D], got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(
            f"sigma{which}: expected shape ({d}, {d}) to match mu{which}, got {sigma.shape}"
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"mu{which}/sigma{which}: contain NaN or inf")
    scale = max(float(np.max(np.abs(sigma))), np.finfo(np.float64).tiny)
    asym = float(np.max(np.abs(sigma - sigma.T)))
    if asym > _SYMMETRY_RTOL * scale:
        raise ValueError(f"sigma{which}: not symmetric (max |S - S^T| = {asym:.3g})")
    return mu, 0.5 * (sigma + sigma.T)


def _psd_eigenvalues_clean(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with round-off removed: those below
    D * eps * max(w) (negative ones included) are set to 0. Without this, exact zeros that
    come out as +-1e-16 relative turn into 1e-8 relative errors after the square root. It is
    a pseudo-inverse's rcond; dropping a true eigenvalue below it moves the trace by at most
    sqrt(cutoff), the size of the round-off it removes."""
    cutoff = w.shape[0] * np.finfo(np.float64).eps * max(float(np.max(w, initial=0.0)), 0.0)
    return np.where(w > cutoff, w, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix, from its eigendecomposition."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(_psd_eigenvalues_clean(w))) @ v.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
    Nash Equilibrium" (FID), Eq. 6. mu [D], sigma [D, D] symmetric PSD; computed in float64.
    Exact for rank-deficient covariances (see the module docstring). Round-off can make the
    value a hair below 0 for identical statistics; it is clipped at 0.
    """
    mu1, sigma1 = _check_statistics(mu1, sigma1, "1")
    mu2, sigma2 = _check_statistics(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1/mu2: feature dimensions differ ({mu1.shape[0]} vs {mu2.shape[0]})")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1  # [D, D], similar to S1 S2, symmetric PSD
    eig = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    tr_covmean = float(np.sum(np.sqrt(_psd_eigenvalues_clean(eig))))
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (ddof=1, as in the FID literature) of features [N, D],
    both float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features: expected shape [N, D], got {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"features: need at least 2 rows for a covariance, got {x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features: contain NaN or inf")
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray, /, **meta: object) -> Path:
    """Cache reference statistics as .npz with arrays 'mu', 'sigma' and any ``meta`` entries
    (e.g. extractor name, number of images, dataset split). Written atomically."""
    mu, sigma = _check_statistics(mu, sigma, "")
    reserved = {"mu", "sigma"} & meta.keys()
    if reserved:
        raise ValueError(f"meta: keys {sorted(reserved)} are reserved for the statistics")
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"path: expected a .npz file name, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in meta.items()})
    tmp.replace(path)
    logger.info("saved feature statistics (D=%d) to %s", mu.shape[0], path)
    return path


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """Read statistics written by :func:`save_statistics`: (mu, sigma, meta)."""
    with np.load(Path(path), allow_pickle=False) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path}: expected arrays 'mu' and 'sigma', found {data.files}")
        mu, sigma = _check_statistics(data["mu"], data["sigma"], "")
        meta = {k: data[k].item() if data[k].ndim == 0 else data[k] for k in data.files}
    del meta["mu"], meta["sigma"]
    return mu, sigma, meta
