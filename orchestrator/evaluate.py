"""Evaluate a checkpoint as the paper does: NLL in bits/dim, FID and improved
precision/recall from EMA samples drawn with strided sampling, and a sample grid.

On the offline digits data the features come from a small digits classifier (reported
as ``digits_fd``, never as FID); on image datasets from pytorch-fid's Inception network
(reported as ``fid``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from diffusion.data import load_digits_uint8, open_dataset, to_model_range
from diffusion.evaluation import evaluate_nll
from diffusion.metrics import (
    feature_statistics,
    frechet_distance,
    get_feature_extractor,
    precision_recall,
)
from diffusion.sampling import SAMPLING_METHODS, sample, save_image_grid
from orchestrator.checkpoint import load_model_checkpoint

log = logging.getLogger(__name__)

__all__ = ["EvalOptions", "evaluate_checkpoint", "load_real_images"]


@dataclass(frozen=True)
class EvalOptions:
    """What ``diffscale eval`` measures and how."""

    data: str = "digits"  # "digits" (offline) or a dataset URI (Parquet shards)
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
        if self.nll not in ("full", "subset"):
            raise ValueError(f"nll: got {self.nll!r}; allowed values: ['full', 'subset']")
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
        return self.features or ("digits" if self.data == "digits" else "inception")


def load_real_images(
    data: str, split: str, limit: int, endpoint_url: str | None = None
) -> np.ndarray:
    """The first ``limit`` images of a split as uint8 [N, C, H, W].

    ``data`` is "digits" (offline) or the URI of a prepared dataset (Parquet shards); only
    as many shards as needed are read.
    """
    if data == "digits":
        return load_digits_uint8(split)[0][:limit]
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
    nll = evaluate_nll(
        diffusion, model, real_x.split(options.batch_size), kind=options.nll,
        timesteps_per_image=options.nll_timesteps, seed=options.seed, device=device,
    )  # fmt: skip

    say(f"{options.num_samples} samples, {options.sample_steps} {options.sample_method} steps")
    generator = torch.Generator(device=device).manual_seed(options.seed)
    fakes = []
    for lo in range(0, options.num_samples, options.batch_size):
        n = min(options.batch_size, options.num_samples - lo)
        fakes.append(sample(
            diffusion, model, (n, c, size, size), steps=options.sample_steps,
            method=options.sample_method, generator=generator, device=device,
        ).cpu())  # fmt: skip
    fake_x = torch.cat(fakes)
    grid = save_image_grid(fake_x[:64], out / "samples.png", scale=max(1, 128 // size))

    say(f"features: {options.feature_name}")
    extractor = get_feature_extractor(options.feature_name, device=device)
    real_f = extractor(real_x)
    fake_f = extractor(fake_x)
    fd = frechet_distance(*feature_statistics(real_f), *feature_statistics(fake_f))
    precision, recall = precision_recall(real_f, fake_f, k=options.k)

    result = {
        "checkpoint": str(checkpoint),
        "step": ckpt.meta.get("step"),
        "nll_bpd": nll.bpd,
        "nll_stderr": nll.stderr,
        "nll_kind": nll.describe(),
        extractor.fd_metric: fd,
        "precision": precision,
        "recall": recall,
        "features": extractor.name,
        "features_info": extractor.info,
        "samples_png": str(grid),
        "seconds": time.perf_counter() - started,
        "options": asdict(options),
    }
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("evaluated %s: %s", checkpoint, result)
    return result
