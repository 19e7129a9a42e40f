"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall
Metric for Assessing Generative Models", Sec. 2).

Each feature set's manifold is the union of balls around its points, the radius of a point's
ball being the distance to its k-th nearest neighbour in the same set (itself excluded).
precision = share of fake points inside the real manifold (sample quality);
recall = share of real points inside the fake manifold (coverage). Nichol & Dhariwal 2021
(Sec. 6) use it to show diffusion models cover the data better than GANs.

Distances are computed in row x column blocks with the squared-distance expansion
||a||^2 - 2 a.b + ||b||^2 (clamped at 0) in float32, so memory is O(batch_size^2) and a
50K x 50K comparison never materialises an N x N matrix. The k-NN radii use a running top-k
over column blocks; the two membership tests share one pass over the real x fake blocks.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

__all__ = ["precision_recall"]

logger = logging.getLogger(__name__)


def _as_features(x: np.ndarray | torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name}: expected shape [N, D], got {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return t


def _sq_dists(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor):
    """Squared Euclidean distances [len(a), len(b)], clamped at 0 against round-off."""
    return (a_sq[:, None] - 2.0 * (a @ b.T) + b_sq[None, :]).clamp_(min=0.0)


def _knn_sq_radii(x: torch.Tensor, x_sq: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance of each row of x [N, D] to its k-th nearest neighbour in x, itself
    excluded: the (k+1)-th smallest distance counting the point itself (as the reference
    code does, so exact duplicates count as neighbours at distance 0)."""
    n = x.shape[0]
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for r0 in range(0, n, batch_size):
        rows, rows_sq = x[r0 : r0 + batch_size], x_sq[r0 : r0 + batch_size]
        best = torch.empty(rows.shape[0], 0, dtype=x.dtype, device=x.device)  # [b, <= k+1]
        for c0 in range(0, n, batch_size):
            d = _sq_dists(rows, rows_sq, x[c0 : c0 + batch_size], x_sq[c0 : c0 + batch_size])
            merged = torch.cat([best, d], dim=1)
            best = torch.topk(merged, min(k + 1, merged.shape[1]), dim=1, largest=False).values
        radii[r0 : r0 + batch_size] = best[:, k]  # topk sorts ascending for largest=False
    return radii


def precision_recall(
    real_features: np.ndarray | torch.Tensor,
    fake_features: np.ndarray | torch.Tensor,
    k: int = 3,
    *,
    batch_size: int = 5_000,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """Improved precision and recall of fake vs real features (Kynkaanniemi et al. 2019).

    real_features [N_r, D], fake_features [N_f, D]; k = neighbourhood size (the paper's 3);
    distances in blocks of at most ``batch_size`` x ``batch_size`` (float32: about 100 MB at
    5,000) on ``device``.
    A point lies inside a manifold when its distance to some ball centre is <= that ball's
    radius. Returns (precision, recall) as Python floats.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    k, batch_size, device = int(k), int(batch_size), torch.device(device)
    real = _as_features(real_features, "real_features", device)
    fake = _as_features(fake_features, "fake_features", device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real_features/fake_features: feature dimensions differ "
            f"({real.shape[1]} vs {fake.shape[1]})"
        )
    for name, feats in (("real_features", real), ("fake_features", fake)):
        if feats.shape[0] <= k:
            raise ValueError(f"{name}: need more than k={k} rows, got {feats.shape[0]}")

    with torch.no_grad():
        real_sq, fake_sq = (real * real).sum(1), (fake * fake).sum(1)
        real_radii = _knn_sq_radii(real, real_sq, k, batch_size)  # [N_r]
        fake_radii = _knn_sq_radii(fake, fake_sq, k, batch_size)  # [N_f]
        fake_in_real = torch.zeros(fake.shape[0], dtype=torch.bool, device=device)
        real_in_fake = torch.zeros(real.shape[0], dtype=torch.bool, device=device)
        for f0 in range(0, fake.shape[0], batch_size):
            fs = slice(f0, f0 + batch_size)
            for r0 in range(0, real.shape[0], batch_size):
                rs = slice(r0, r0 + batch_size)
                d = _sq_dists(fake[fs], fake_sq[fs], real[rs], real_sq[rs])  # [b_f, b_r]
                fake_in_real[fs] |= (d <= real_radii[None, rs]).any(dim=1)
                real_in_fake[rs] |= (d <= fake_radii[fs, None]).any(dim=0)
    precision = int(fake_in_real.sum().item()) / fake.shape[0]
    recall = int(real_in_fake.sum().item()) / real.shape[0]
    logger.debug(
        "precision %.4f recall %.4f (k=%d, %d real, %d fake)",
        precision,
        recall,
        k,
        real.shape[0],
        fake.shape[0],
    )
    return precision, recall
