"""A trial's eval point: NLL, FD and precision/recall of EMA samples, the sampling study at
the end of training, and the samples of the grid; every rank calls it at the same steps and
computes its share (:mod:`orchestrator.evaluate.steps`), the metrics are the same on every
rank and rank 0 logs them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffusion.gaussian import GaussianDiffusion
from diffusion.images import to_model_range
from diffusion.metrics import get_feature_extractor
from diffusion.schedules import space_timesteps
from orchestrator.config import TrialConfig, parse_sampler
from orchestrator.cost import EVAL_CHUNK
from orchestrator.evaluate.shard import Shard
from orchestrator.evaluate.steps import (
    feature_metrics,
    load_real_images,
    measure_nll,
    real_features,
    sample_features,
    sampling_study,
)
from orchestrator.names import (
    EVAL_NLL,
    EVAL_NLL_FULL,
    EVAL_NLL_STDERR,
    EVAL_PRECISION,
    EVAL_RECALL,
    eval_metric,
)

__all__ = ["TRIAL_EVAL_BATCH", "TrialEvaluation", "evaluate_trial"]

TRIAL_EVAL_BATCH = EVAL_CHUNK  # images per NLL, sampling and feature chunk (the cost model's)


@dataclass(frozen=True, kw_only=True)
class TrialEvaluation:
    """An eval point's metrics (MLflow names; NaNs left out), its grid's samples and the
    work it did, over all ranks: model forwards (one image through the model: sampling
    steps and NLL terms) and images through the feature network."""

    metrics: dict[str, float]
    grid: torch.Tensor | None  # the first eval.grid_samples samples; None when 0
    model_forwards: int
    feature_images: int


def evaluate_trial(
    cfg: TrialConfig,
    diffusion: GaussianDiffusion,
    ema_model: torch.nn.Module,
    device: torch.device,
    *,
    step: int,
    final: bool,
    shard: Shard | None = None,
) -> TrialEvaluation:
    """A trial's eval point at ``step``, sharded over the ranks of the process group (a
    collective: every rank calls it). Samples are seeded with (train.seed, step, i), NLL
    image j with (train.seed, j)."""
    shard = shard or Shard.current()
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
        batch_size=TRIAL_EVAL_BATCH,
        seed=cfg.train.seed,
        device=device,
        shard=shard,
    )
    out = {EVAL_NLL: nll.bpd, EVAL_NLL_STDERR: nll.stderr}
    if kind == "full":
        out[EVAL_NLL_FULL] = nll.bpd
    forwards = nll.num_images * nll.terms_per_image
    feature_images = 0
    extractor = None
    if ev.fid_samples > 0:
        extractor = get_feature_extractor(ev.feature_name(cfg.data.dataset), device=device)
    count = max(ev.fid_samples, ev.grid_samples)
    fake = sample_features(
        diffusion,
        ema_model,
        count,
        real_x.shape[1:],
        steps=ev.sample_steps,
        entropy=(cfg.train.seed, step),
        batch_size=TRIAL_EVAL_BATCH,
        extractor=extractor,
        device=device,
        keep=ev.grid_samples,
        shard=shard,
    )
    forwards += count * len(space_timesteps(diffusion.num_timesteps, ev.sample_steps))
    if extractor is not None:
        real_f = real_features(extractor, real_x, batch_size=TRIAL_EVAL_BATCH, shard=shard)
        fm = feature_metrics(real_f, fake.features[: ev.fid_samples], k=ev.k, device=device)
        feature_images += len(real_f) + count
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
                batch_size=TRIAL_EVAL_BATCH,
                shard=shard,
            )
            out.update(study)
            for item in ev.sampling:
                spacing = parse_sampler(item)[1]
                steps = len(space_timesteps(diffusion.num_timesteps, spacing))
                forwards += ev.fid_samples * steps
            feature_images += ev.fid_samples * len(ev.sampling)
    metrics = {k: float(v) for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}
    grid = fake.kept if ev.grid_samples > 0 else None
    return TrialEvaluation(
        metrics=metrics, grid=grid, model_forwards=forwards, feature_images=feature_images
    )
