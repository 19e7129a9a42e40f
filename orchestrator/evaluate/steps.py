"""The steps every evaluation is built from, each sharded over the ranks (:class:`Shard`):
the real images, NLL in bits/dim (the full variational bound L_vlb = L_0 + ... + L_T, or an
unbiased estimate from a stratified subset of its terms), EMA samples drawn with strided
sampling (Sec. 4) and their features, Frechet distance and improved precision/recall, the
sampling-steps study and the sample grid.

Every rank computes its chunks of the NLL images and of the samples; per-image bits/dim and
features are gathered and the statistics computed once over all of them (the same on every
rank). The noise of sample i is drawn from a generator seeded with (seed, ..., i) and that of
NLL image j from one seeded with (seed, j), so the numbers do not depend on the number of
workers (bit-identical on the CPU). Each step is a collective: every rank calls it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffusion.config import DiffusionConfig
from diffusion.data import builtin_dataset, open_dataset
from diffusion.gaussian import GaussianDiffusion
from diffusion.images import save_image_grid
from diffusion.likelihood import NLLResult, nll_per_image, summarize_nll
from diffusion.metrics import (
    FeatureExtractor,
    feature_statistics,
    frechet_distance,
    precision_recall,
)
from diffusion.sampling import index_generators, sample
from diffusion.schedules import space_timesteps
from orchestrator.config import parse_sampler
from orchestrator.evaluate.shard import Shard
from orchestrator.names import sampling_metric

__all__ = [
    "FeatureMetrics",
    "SampleSet",
    "draw_samples",
    "feature_metrics",
    "load_real_images",
    "measure_nll",
    "real_features",
    "sample_features",
    "sampling_study",
    "save_grid",
]

GRID_PIXELS = 128  # a sample grid's images are scaled up to about this many pixels
STUDY_DOMAIN = 1  # seeds of the sampling study: (seed, STUDY_DOMAIN, steps, i)


def load_real_images(
    data: str, split: str, limit: int, endpoint_url: str | None = None
) -> np.ndarray:
    """The first ``limit`` images of a split as uint8 [N, C, H, W].

    ``data`` names a built-in dataset (offline) or is the URI of a prepared dataset (Parquet
    shards); only as many shards as needed are read.
    """
    if (spec := builtin_dataset(data)) is not None:
        return spec.load_split(split)[:limit]
    dataset = open_dataset(data, endpoint_url=endpoint_url)
    if split not in dataset.splits:
        raise ValueError(f"split: {data} has no split {split!r}; it has {sorted(dataset.splits)}")
    parts, have = [], 0
    for images, _labels in dataset.iter_shards(split):
        parts.append(images[: limit - have])
        have += len(parts[-1])
        if have >= limit:
            break
    return np.concatenate(parts)


def measure_nll(
    diffusion: GaussianDiffusion,
    model: torch.nn.Module,
    real_x: torch.Tensor,
    *,
    kind: str,
    timesteps_per_image: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    shard: Shard | None = None,
    count: Callable[[int, int], None] | None = None,
) -> NLLResult:
    """Bits/dim of ``real_x`` (model range): the full bound L_vlb = L_0 + ... + L_T
    (``kind="full"``, the paper's number) or its unbiased estimate from
    ``timesteps_per_image`` stratified terms per image (``kind="subset"``), with its standard
    error over images. This rank evaluates its chunks of ``batch_size`` images, image j with
    noise seeded by (seed, j); the per-image values are gathered. ``count(done, total)``
    follows this rank's images as they are done (a progress bar)."""
    shard = shard or Shard.current()
    chunks = shard.chunks(len(real_x), batch_size)
    total, done = sum(len(c) for c in chunks), [0]

    def advance(n: int) -> None:
        done[0] += n
        if count is not None:
            count(done[0], total)

    values = nll_per_image(
        diffusion,
        model,
        [real_x[c.start : c.stop] for c in chunks],
        kind=kind,
        timesteps_per_image=timesteps_per_image,
        seed=seed,
        image_seeds=[j for c in chunks for j in c],
        device=device,
        progress=advance,
    )
    return summarize_nll(
        shard.gather(values),
        kind=kind,
        num_timesteps=diffusion.num_timesteps,
        timesteps_per_image=timesteps_per_image,
    )


def draw_samples(
    diffusion: GaussianDiffusion,
    model: torch.nn.Module,
    indices: range,
    image_shape: Sequence[int],
    *,
    steps: str,
    entropy: Sequence[int],
    method: str = "ancestral",
    device: torch.device,
) -> torch.Tensor:
    """Samples ``indices`` [len(indices), *image_shape] on the CPU, as one batch: sample i's
    x_T and step noise from a generator seeded with (*entropy, i)."""
    generators = index_generators(tuple(entropy), indices, device=device)
    shape = (len(indices), *image_shape)
    x = sample(
        diffusion, model, shape, steps=steps, method=method, generators=generators, device=device
    )
    return x.cpu()


@dataclass(frozen=True, kw_only=True)
class SampleSet:
    """Features of every sample (gathered, index order) and the first ``keep`` samples."""

    features: np.ndarray | None  # [count, dim]; None without an extractor
    kept: torch.Tensor  # [min(keep, count), C, H, W], model range


def sample_features(
    diffusion: GaussianDiffusion,
    model: torch.nn.Module,
    count: int,
    image_shape: Sequence[int],
    *,
    steps: str,
    entropy: Sequence[int],
    batch_size: int,
    extractor: FeatureExtractor | None,
    device: torch.device,
    method: str = "ancestral",
    keep: int = 0,
    shard: Shard | None = None,
) -> SampleSet:
    """Draw ``count`` samples (this rank: its chunks of ``batch_size``), extract their
    features and gather them, with the first ``keep`` samples (for a grid)."""
    shard = shard or Shard.current()
    feats, kept = [], []
    for chunk in shard.chunks(count, batch_size):
        x = draw_samples(
            diffusion,
            model,
            chunk,
            image_shape,
            steps=steps,
            entropy=entropy,
            method=method,
            device=device,
        )
        if extractor is not None:
            feats.append(extractor(x))
        kept.append(x[: max(0, keep - chunk.start)].numpy())
    features = None
    if extractor is not None:
        features = shard.gather(np.concatenate([np.zeros((0, extractor.dim), np.float32), *feats]))
    empty = np.zeros((0, *image_shape), np.float32)
    return SampleSet(
        features=features, kept=torch.from_numpy(shard.gather(np.concatenate([empty, *kept])))
    )


def real_features(
    extractor: FeatureExtractor,
    real_x: torch.Tensor,
    *,
    batch_size: int,
    shard: Shard | None = None,
) -> np.ndarray:
    """Features [N, dim] of the real images, this rank's chunks extracted, then gathered."""
    shard = shard or Shard.current()
    parts = [extractor(real_x[c.start : c.stop]) for c in shard.chunks(len(real_x), batch_size)]
    return shard.gather(np.concatenate([np.zeros((0, extractor.dim), np.float32), *parts]))


@dataclass(frozen=True, kw_only=True)
class FeatureMetrics:
    """Frechet distance and improved precision/recall in one feature space."""

    fd: float
    precision: float
    recall: float
    real_stats: tuple[np.ndarray, np.ndarray]  # mean and covariance of the real features


def feature_metrics(
    real_f: np.ndarray,
    fake_f: np.ndarray,
    *,
    k: int,
    device: str | torch.device = "cpu",
) -> FeatureMetrics:
    """FD between the real and fake feature Gaussians (Heusel et al. 2017) and k-NN
    precision/recall (Kynkaanniemi et al. 2019), from all the gathered features. The k-NN
    distances (the costly part: N_real x N_fake of them) run on ``device``, the evaluation's
    own GPU when it has one."""
    real_stats = feature_statistics(real_f)
    fd = frechet_distance(*real_stats, *feature_statistics(fake_f))
    precision, recall = precision_recall(real_f, fake_f, k=k, device=device)
    return FeatureMetrics(fd=fd, precision=precision, recall=recall, real_stats=real_stats)


def sampling_study(
    process: DiffusionConfig,
    model: torch.nn.Module,
    *,
    samplers: Sequence[str],
    num_samples: int,
    seed: int,
    image_shape: Sequence[int],
    extractor: FeatureExtractor,
    real_stats: tuple[np.ndarray, np.ndarray],
    device: torch.device,
    batch_size: int = 64,
    shard: Shard | None = None,
) -> dict[str, float]:
    """FD of each sampler in ``samplers`` (``eval.sampling``: "100", "ddim50",
    "100@fixed_large") against the real images' feature statistics (Sec. 4, Fig. 8), as
    ``sampling/<fd>/<method>/<steps>`` (method ancestral, ddim or ancestral_<variance>).
    Each sampler draws ``num_samples`` samples, sample i seeded with (seed, 1, steps, i):
    samplers with the same number of steps share their noise (common random numbers)."""
    out = {}
    for item in samplers:
        method, spacing, var = parse_sampler(item)
        config = dataclasses.replace(process, var_type=var) if var else process
        diffusion = config.build()
        steps = len(space_timesteps(diffusion.num_timesteps, spacing))
        fake = sample_features(
            diffusion,
            model,
            num_samples,
            image_shape,
            steps=spacing,
            method=method,
            entropy=(seed, STUDY_DOMAIN, steps),
            batch_size=batch_size,
            extractor=extractor,
            device=device,
            shard=shard,
        )
        name = f"{method}_{var}" if var else method
        out[sampling_metric(extractor.fd_metric, name, steps)] = frechet_distance(
            *real_stats, *feature_statistics(fake.features)
        )
    return out


def save_grid(samples: torch.Tensor, path: str | Path) -> Path:
    """A PNG grid of ``samples`` (model range), scaled up to about 128 pixels an image."""
    return save_image_grid(samples, path, scale=max(1, GRID_PIXELS // samples.shape[-1]))
