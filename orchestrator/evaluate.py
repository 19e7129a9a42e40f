"""Evaluation as the paper does it, for a trial's eval points and for ``diffscale eval``
alike: NLL in bits/dim (the full variational bound L_vlb = L_0 + ... + L_T, or an unbiased
estimate from a stratified subset of its terms), Frechet distance and improved
precision/recall from EMA samples drawn with strided sampling (Sec. 4), a sample grid, and
the sampling-steps study.

Both callers are built from the same steps, in the same order, with the same seeds:
:func:`measure_nll`, :func:`draw_samples`, :func:`feature_metrics`, :func:`sampling_study`
and :func:`save_grid`. :func:`evaluate_trial` is the worker loop's eval point (rank 0);
:func:`evaluate_checkpoint` measures a checkpoint directory. The feature extractor is the
dataset's default (:func:`diffusion.data.default_features`): a small offline classifier on
the built-in digits (reported as ``digits_fd``, never as FID), pytorch-fid's Inception
network on image datasets (reported as ``fid``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from diffusion.config import DiffusionConfig
from diffusion.data import builtin_dataset, default_features, open_dataset
from diffusion.gaussian import GaussianDiffusion
from diffusion.images import save_image_grid, to_model_range
from diffusion.likelihood import NLL_KINDS, NLLResult, evaluate_nll
from diffusion.metrics import (
    FeatureExtractor,
    feature_statistics,
    frechet_distance,
    get_feature_extractor,
    precision_recall,
)
from diffusion.sampling import SAMPLING_METHODS, sample
from diffusion.schedules import space_timesteps
from orchestrator.checkpoint import load_model_checkpoint
from orchestrator.config import TrialConfig, parse_sampler
from orchestrator.names import (
    EVAL_NLL,
    EVAL_NLL_FULL,
    EVAL_NLL_STDERR,
    EVAL_PRECISION,
    EVAL_RECALL,
    EVAL_RESULT_FILE,
    EVAL_SAMPLES_FILE,
    eval_metric,
    sampling_metric,
)

log = logging.getLogger(__name__)

__all__ = [
    "EvalOptions",
    "FeatureMetrics",
    "TrialEvaluation",
    "draw_samples",
    "evaluate_checkpoint",
    "evaluate_trial",
    "feature_metrics",
    "load_real_images",
    "measure_nll",
    "sampling_study",
    "save_grid",
]

TRIAL_NLL_BATCH = 64  # images per NLL batch at a trial's eval points
GRID_PIXELS = 128  # a sample grid's images are scaled up to about this many pixels
CLI_GRID_SAMPLES = 64  # samples in ``diffscale eval``'s grid


@dataclass(frozen=True)
class EvalOptions:
    """What ``diffscale eval`` measures and how."""

    data: str = "digits"  # a built-in dataset (offline) or a dataset URI (Parquet shards)
    split: str = "test"
    num_images: int = 256  # real images: for the NLL and the reference statistics
    nll: str = "subset"  # "full" (all T terms: the paper's number) or "subset" (estimate)
    nll_timesteps: int = 50  # terms per image for the subset estimate
    num_samples: int = 256  # EMA samples for FD and precision/recall
    sample_steps: str = "100"  # strided sampling (Sec. 4); "ddimN" with method ddim
    sample_method: str = "ancestral"
    features: str | None = None  # "digits" or "inception"; default by dataset
    k: int = 3  # k of improved precision/recall
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.nll not in NLL_KINDS:
            raise ValueError(f"nll: got {self.nll!r}; allowed values: {list(NLL_KINDS)}")
        if self.sample_method not in SAMPLING_METHODS:
            raise ValueError(
                f"sample_method: got {self.sample_method!r}; allowed: {list(SAMPLING_METHODS)}"
            )
        for name in ("num_images", "num_samples", "nll_timesteps", "batch_size", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_samples <= self.k or self.num_images <= self.k:
            raise ValueError(f"num_samples and num_images must exceed k={self.k}")

    @property
    def feature_name(self) -> str:
        return self.features or default_features(self.data)


# --------------------------------------------------------------------------- the steps
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
) -> NLLResult:
    """Bits/dim of ``real_x`` (model range), in batches of ``batch_size``: the full bound
    L_vlb = L_0 + ... + L_T (``kind="full"``, the paper's number) or its unbiased estimate
    from ``timesteps_per_image`` stratified terms per image (``kind="subset"``)."""
    return evaluate_nll(
        diffusion,
        model,
        real_x.split(batch_size),
        kind=kind,
        timesteps_per_image=timesteps_per_image,
        seed=seed,
        device=device,
    )


def draw_samples(
    diffusion: GaussianDiffusion,
    model: torch.nn.Module,
    count: int,
    image_shape: Sequence[int],
    *,
    steps: str,
    seed: int,
    method: str = "ancestral",
    batch_size: int | None = None,
    device: torch.device,
) -> torch.Tensor:
    """``count`` samples [count, *image_shape] on the CPU, drawn from one generator seeded
    with ``seed``, in batches of ``batch_size`` (None: one batch)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    if batch_size is None:
        shape = (count, *image_shape)
        return sample(
            diffusion, model, shape, steps=steps, method=method, generator=generator, device=device
        ).cpu()
    parts = []
    for lo in range(0, count, batch_size):
        shape = (min(batch_size, count - lo), *image_shape)
        parts.append(
            sample(
                diffusion,
                model,
                shape,
                steps=steps,
                method=method,
                generator=generator,
                device=device,
            ).cpu()
        )
    return torch.cat(parts)


@dataclass(frozen=True, kw_only=True)
class FeatureMetrics:
    """Frechet distance and improved precision/recall in one feature space."""

    fd: float
    precision: float
    recall: float
    real_stats: tuple[np.ndarray, np.ndarray]  # mean and covariance of the real features


def feature_metrics(
    extractor: FeatureExtractor,
    real_x: torch.Tensor,
    fake_x: torch.Tensor,
    *,
    k: int,
) -> FeatureMetrics:
    """FD between the real and fake feature Gaussians and k-NN precision/recall."""
    real_f = extractor(real_x)
    real_stats = feature_statistics(real_f)
    fake_f = extractor(fake_x)
    fd = frechet_distance(*real_stats, *feature_statistics(fake_f))
    precision, recall = precision_recall(real_f, fake_f, k=k)
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
) -> dict[str, float]:
    """FD of each sampler in ``samplers`` (``eval.sampling``: "100", "ddim50",
    "100@fixed_large") against the real images' feature statistics (Sec. 4, Fig. 8), as
    ``sampling/<fd>/<method>/<steps>`` (method ancestral, ddim or ancestral_<variance>).
    Each sampler draws ``num_samples`` samples seeded with ``seed + 7 * steps``."""
    out = {}
    for item in samplers:
        method, spacing, var = parse_sampler(item)
        config = dataclasses.replace(process, var_type=var) if var else process
        diffusion = config.build()
        steps = len(space_timesteps(diffusion.num_timesteps, spacing))
        fake = draw_samples(
            diffusion,
            model,
            num_samples,
            image_shape,
            steps=spacing,
            method=method,
            seed=seed + 7 * steps,
            device=device,
        )
        name = f"{method}_{var}" if var else method
        out[sampling_metric(extractor.fd_metric, name, steps)] = frechet_distance(
            *real_stats, *feature_statistics(extractor(fake))
        )
    return out


def save_grid(samples: torch.Tensor, path: str | Path) -> Path:
    """A PNG grid of ``samples`` (model range), scaled up to about 128 pixels an image."""
    return save_image_grid(samples, path, scale=max(1, GRID_PIXELS // samples.shape[-1]))


# --------------------------------------------------------------------------- the callers
@dataclass(frozen=True, kw_only=True)
class TrialEvaluation:
    """An eval point's metrics (MLflow names; NaNs left out) and its grid's samples."""

    metrics: dict[str, float]
    grid: torch.Tensor | None  # the first eval.grid_samples samples; None when 0


def evaluate_trial(
    cfg: TrialConfig,
    diffusion: GaussianDiffusion,
    ema_model: torch.nn.Module,
    device: torch.device,
    *,
    step: int,
    final: bool,
) -> TrialEvaluation:
    """A trial's eval point (rank 0): NLL, FD and precision/recall from EMA samples, the
    sampling study at the end of training, and the samples of the grid."""
    ev = cfg.eval
    real = load_real_images(
        cfg.data.dataset, cfg.data.eval_split, ev.nll_images, endpoint_url=cfg.data.endpoint_url
    )
    real_x = to_model_range(real)
    kind = "full" if final and ev.full_nll_at_end else "subset"
    nll = measure_nll(
        diffusion,
        ema_model,
        real_x,
        kind=kind,
        timesteps_per_image=ev.nll_timesteps,
        batch_size=TRIAL_NLL_BATCH,
        seed=cfg.train.seed,
        device=device,
    )
    out = {EVAL_NLL: nll.bpd, EVAL_NLL_STDERR: nll.stderr}
    if kind == "full":
        out[EVAL_NLL_FULL] = nll.bpd
    c, size = real.shape[1], real.shape[2]
    fake = draw_samples(
        diffusion,
        ema_model,
        max(ev.fid_samples, ev.grid_samples),
        (c, size, size),
        steps=ev.sample_steps,
        seed=cfg.train.seed + step,
        device=device,
    )
    if ev.fid_samples > 0:
        extractor = get_feature_extractor(ev.feature_name(cfg.data.dataset), device=device)
        fm = feature_metrics(extractor, real_x, fake[: ev.fid_samples], k=ev.k)
        out[eval_metric(extractor.fd_metric)] = fm.fd
        out[EVAL_PRECISION], out[EVAL_RECALL] = fm.precision, fm.recall
        if final and ev.sampling:  # the config requires fid_samples > 0 for a sampling study
            study = sampling_study(
                cfg.diffusion,
                ema_model,
                samplers=ev.sampling,
                num_samples=ev.fid_samples,
                seed=cfg.train.seed,
                image_shape=real_x.shape[1:],
                extractor=extractor,
                real_stats=fm.real_stats,
                device=device,
            )
            out.update(study)
    metrics = {k: float(v) for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}
    grid = fake[: ev.grid_samples] if ev.grid_samples > 0 else None
    return TrialEvaluation(metrics=metrics, grid=grid)


def evaluate_checkpoint(
    checkpoint: str | Path,
    options: EvalOptions,
    out_dir: str | Path,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure a checkpoint; writes ``eval.json`` and ``samples.png`` to ``out_dir``."""
    say = progress or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(options.device)
    ckpt = load_model_checkpoint(checkpoint, device=device)
    model, diffusion = ckpt.ema_model, ckpt.diffusion
    c, size = ckpt.model_config.in_channels, ckpt.model_config.image_size
    started = time.perf_counter()

    real = load_real_images(options.data, options.split, options.num_images)
    if real.shape[1:] != (c, size, size):
        raise ValueError(
            f"data: {options.data!r} ({options.split}) holds images of shape "
            f"{tuple(real.shape[1:])}, the checkpoint's model takes {(c, size, size)}"
        )
    real_x = to_model_range(real)
    say(f"NLL ({options.nll}) on {len(real_x)} {options.split} images")
    nll = measure_nll(
        diffusion,
        model,
        real_x,
        kind=options.nll,
        timesteps_per_image=options.nll_timesteps,
        batch_size=options.batch_size,
        seed=options.seed,
        device=device,
    )

    say(f"{options.num_samples} samples, {options.sample_steps} {options.sample_method} steps")
    fake_x = draw_samples(
        diffusion,
        model,
        options.num_samples,
        (c, size, size),
        steps=options.sample_steps,
        method=options.sample_method,
        seed=options.seed,
        batch_size=options.batch_size,
        device=device,
    )
    grid = save_grid(fake_x[:CLI_GRID_SAMPLES], out / EVAL_SAMPLES_FILE)

    say(f"features: {options.feature_name}")
    extractor = get_feature_extractor(options.feature_name, device=device)
    fm = feature_metrics(extractor, real_x, fake_x, k=options.k)

    result = {
        "checkpoint": str(checkpoint),
        "step": ckpt.meta.get("step"),
        "nll_bpd": nll.bpd,
        "nll_stderr": nll.stderr,
        "nll_kind": nll.describe(),
        extractor.fd_metric: fm.fd,
        "precision": fm.precision,
        "recall": fm.recall,
        "features": extractor.name,
        "features_info": extractor.info,
        "samples_png": str(grid),
        "seconds": time.perf_counter() - started,
        "options": asdict(options),
    }
    (out / EVAL_RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    log.info("evaluated %s: %s", checkpoint, result)
    return result
