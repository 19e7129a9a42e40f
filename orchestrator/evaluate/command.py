"""``diffscale eval``: measure a checkpoint's EMA model the way the paper does, on one
process or as one rank of many (the same steps as a trial's eval point, sharded)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from diffusion.data import default_features
from diffusion.images import to_model_range
from diffusion.likelihood import NLL_KINDS
from diffusion.metrics import get_feature_extractor
from diffusion.sampling import SAMPLING_METHODS
from orchestrator.checkpoint import load_model_checkpoint
from orchestrator.config import parse_sampler
from orchestrator.evaluate.shard import Shard
from orchestrator.evaluate.steps import (
    feature_metrics,
    load_real_images,
    measure_nll,
    real_features,
    sample_features,
    sampling_study,
    save_grid,
)
from orchestrator.names import EVAL_RESULT_FILE, EVAL_SAMPLES_FILE

log = logging.getLogger(__name__)

__all__ = ["CLI_GRID_SAMPLES", "EvalOptions", "evaluate_checkpoint", "torch_threads"]

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
    batch_size: int = 64  # images per chunk: the unit of work shared out to the workers
    seed: int = 0
    device: str = "cpu"
    sampling: tuple[str, ...] = ()  # the sampling-steps study: "100", "ddim50", "100@fixed_large"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampling", tuple(self.sampling))
        for item in self.sampling:
            try:
                parse_sampler(item)
            except ValueError as error:
                raise ValueError(f"sampling: {error}") from None
        if self.nll not in NLL_KINDS:
            raise ValueError(f"nll: got {self.nll!r}; allowed values: {list(NLL_KINDS)}")
        if self.sample_method not in SAMPLING_METHODS:
            raise ValueError(
                f"sample_method: got {self.sample_method!r}; allowed: {list(SAMPLING_METHODS)}"
            )
        for name in ("num_images", "num_samples", "nll_timesteps", "batch_size", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")
        if self.num_samples <= self.k or self.num_images <= self.k:
            raise ValueError(f"num_samples and num_images must exceed k={self.k}")

    @property
    def feature_name(self) -> str:
        return self.features or default_features(self.data)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside (None: unchanged). CPU kernels
    may round differently at another thread count, so bit-identical results across worker
    counts need the same threads per worker."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate_checkpoint(
    checkpoint: str | Path,
    options: EvalOptions,
    out_dir: str | Path,
    progress: Callable[[str], None] | None = None,
    shard: Shard | None = None,
    count: Callable[[int, int], None] | None = None,
) -> dict:
    """Measure a checkpoint; rank 0 writes ``eval.json`` and ``samples.png`` to ``out_dir``.

    Sharded over the process group's ranks when there is one (a collective: every rank
    calls it); the result is the same on every rank. ``seconds`` is the evaluation's own
    wall time (after loading the checkpoint), ``workers`` the number of ranks. ``progress``
    gets each stage's name as it starts, ``count(done, total)`` the NLL's images as they are
    done (the slow part with ``--nll full``), both on rank 0 only.
    """
    shard = shard or Shard.current()
    say = progress if progress is not None and shard.rank == 0 else (lambda _msg: None)
    out = Path(out_dir)
    device = torch.device(options.device)
    ckpt = load_model_checkpoint(checkpoint, device=device)
    model, diffusion = ckpt.ema_model, ckpt.diffusion
    c, size = ckpt.model_config.in_channels, ckpt.model_config.image_size
    if ckpt.diffusion_config.learns_sigma and any(parse_sampler(i)[2] for i in options.sampling):
        raise ValueError(
            f"sampling: '@fixed_...' needs a fixed variance; the checkpoint's model has "
            f"var_type {ckpt.diffusion_config.var_type!r}"
        )
    started = time.perf_counter()

    real = load_real_images(options.data, options.split, options.num_images)
    if real.shape[1:] != (c, size, size):
        raise ValueError(
            f"data: {options.data!r} ({options.split}) holds images of shape "
            f"{tuple(real.shape[1:])}, the checkpoint's model takes {(c, size, size)}"
        )
    real_x = to_model_range(real)
    say(f"NLL ({options.nll}) on {len(real_x)} {options.split} images, {shard.world_size} workers")
    nll = measure_nll(
        diffusion,
        model,
        real_x,
        kind=options.nll,
        timesteps_per_image=options.nll_timesteps,
        batch_size=options.batch_size,
        seed=options.seed,
        device=device,
        shard=shard,
        count=count if shard.rank == 0 else None,
    )

    say(f"{options.num_samples} samples, {options.sample_steps} {options.sample_method} steps")
    extractor = get_feature_extractor(options.feature_name, device=device)
    fake = sample_features(
        diffusion,
        model,
        options.num_samples,
        (c, size, size),
        steps=options.sample_steps,
        method=options.sample_method,
        entropy=(options.seed,),
        batch_size=options.batch_size,
        extractor=extractor,
        device=device,
        keep=CLI_GRID_SAMPLES,
        shard=shard,
    )
    say(f"features: {options.feature_name}")
    real_f = real_features(extractor, real_x, batch_size=options.batch_size, shard=shard)
    fm = feature_metrics(real_f, fake.features, k=options.k, device=device)
    study = {}
    if options.sampling:
        say(f"sampling study: {', '.join(options.sampling)}")
        study = sampling_study(
            ckpt.diffusion_config,
            model,
            samplers=options.sampling,
            num_samples=options.num_samples,
            seed=options.seed,
            image_shape=(c, size, size),
            extractor=extractor,
            real_stats=fm.real_stats,
            device=device,
            batch_size=options.batch_size,
            shard=shard,
        )
    seconds = time.perf_counter() - started

    grid = out / EVAL_SAMPLES_FILE
    result = {
        "checkpoint": str(checkpoint),
        "step": ckpt.meta.get("step"),
        "nll_bpd": nll.bpd,
        "nll_stderr": nll.stderr,
        "nll_kind": nll.describe(),
        extractor.fd_metric: fm.fd,
        "precision": fm.precision,
        "recall": fm.recall,
        "sampling": study,
        "features": extractor.name,
        "features_info": extractor.info,
        "samples_png": str(grid),
        "seconds": seconds,
        "workers": shard.world_size,
        "options": asdict(options),
    }
    if shard.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_grid(fake.kept, grid)
        (out / EVAL_RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        log.info("evaluated %s: %s", checkpoint, result)
    return result
