"""What a trial's evaluation costs in FLOPs, and what a trial costs in GPU-hours.

An eval point (``orchestrator.evaluate.evaluate_trial``) is counted from its parts, each a
number of items (images or samples) split over the ranks in chunks of :data:`EVAL_CHUNK`
and a cost per item (the pieces come from :mod:`diffusion.flops`, forward FLOPs counted as
the paper counts them, Nichol & Dhariwal 2021, Sec. 6):

- ``nll``: ``eval.nll_images`` images x ``eval.nll_timesteps`` model forwards each (the
  stratified estimate), or x T at the final point with ``eval.full_nll_at_end`` (every term
  L_0 ... L_{T-1}, one forward each; the prior term L_T is closed-form: no forward);
- ``sampling``: ``max(fid_samples, grid_samples)`` samples x one forward per step of
  ``eval.sample_steps`` after respacing;
- ``real features`` / ``sample features`` (when ``fid_samples > 0``): the feature network
  (FID Inception at 299 x 299, or the digits classifier) once per real image (the
  ``nll_images`` held-out images, once per eval point) and once per drawn sample;
- ``precision/recall`` (when ``fid_samples > 0``): its distance matrices over the real and
  the ``fid_samples`` fake features, one item computed whole on every rank (not sharded);
- ``study <sampler>`` (the final point, each ``eval.sampling`` entry): ``fid_samples``
  samples x that sampler's steps, plus their features (the real statistics are reused).

GPU-hours, counting idle ranks honestly: a trial on W workers holds W GPUs for its whole
wall time. Its wall time is the training time, ``steps x ceil(batch / W) x 3 x forward /
F`` (each rank trains its share of the batch at F = ``cost.device_tflops`` sustained FLOP/s),
plus, for each part of each eval point, the time of the slowest rank: the one with the most
items of the part's chunks, ``items_slowest x cost_per_item / F`` (a part run on one rank
only would be all of its items: W GPUs charged for it). GPU-hours = W x wall time / 3600;
perfectly balanced, that is all FLOPs / F, whatever W.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from diffusion.flops import (
    feature_dim,
    feature_flops_per_image,
    precision_recall_flops,
    sampling_forwards,
    training_flops,
)
from orchestrator.config import CostConfig, TrialConfig, parse_sampler

__all__ = [
    "EVAL_CHUNK",
    "EvalPart",
    "TrialCost",
    "eval_point_flops",
    "eval_point_parts",
    "slowest_share",
    "trial_cost",
    "trial_eval_flops",
]

EVAL_CHUNK = 64  # items per chunk of the sharded evaluation (orchestrator.evaluate's chunks)


def slowest_share(count: int, workers: int, chunk: int = EVAL_CHUNK) -> int:
    """Items of the rank with the most: ``count`` items in chunks of ``chunk``, rank r taking
    chunks [r * n // W, (r + 1) * n // W) of the n chunks (``Shard.chunks``)."""
    if workers < 1 or chunk < 1 or count < 0:
        raise ValueError(f"slowest_share: got count={count}, workers={workers}, chunk={chunk}")
    n = math.ceil(count / chunk)
    bounds = [min(count, (r * n // workers) * chunk) for r in range(workers + 1)]
    return max(hi - lo for lo, hi in itertools.pairwise(bounds))


@dataclass(frozen=True)
class EvalPart:
    """One part of an eval point: ``items`` images or samples, ``flops_per_item`` each."""

    name: str  # "nll", "sampling", "real features", ..., "study <sampler>"
    items: int
    flops_per_item: int

    @property
    def flops(self) -> int:
        return self.items * self.flops_per_item

    def occupied_flops(self, workers: int) -> int:
        """FLOPs the W GPUs could have done while the slowest rank does its share."""
        return workers * slowest_share(self.items, workers) * self.flops_per_item


def eval_point_parts(cfg: TrialConfig, forward_flops: int, *, final: bool) -> tuple[EvalPart, ...]:
    """The parts of one eval point of ``cfg`` (see the module docstring); ``forward_flops``:
    the model's forward FLOPs per image; ``final``: the last point (full NLL, study)."""
    ev, num_t = cfg.eval, cfg.diffusion.num_timesteps
    terms = num_t if final and ev.full_nll_at_end else ev.nll_timesteps
    drawn = max(ev.fid_samples, ev.grid_samples)
    steps = sampling_forwards(num_t, ev.sample_steps)
    parts = [
        EvalPart("nll", ev.nll_images, terms * forward_flops),
        EvalPart("sampling", drawn, steps * forward_flops),
    ]
    if ev.fid_samples > 0:
        features = ev.feature_name(cfg.data.dataset)
        feature = feature_flops_per_image(features)
        knn = precision_recall_flops(ev.nll_images, ev.fid_samples, feature_dim(features))
        parts += [
            EvalPart("real features", ev.nll_images, feature),
            EvalPart("sample features", drawn, feature),
            EvalPart("precision/recall", 1, knn),
        ]
        if final:
            for item in ev.sampling:
                study_steps = sampling_forwards(num_t, parse_sampler(item)[1])
                parts.append(
                    EvalPart(f"study {item}", ev.fid_samples, study_steps * forward_flops + feature)
                )
    return tuple(p for p in parts if p.items > 0)


def eval_point_flops(cfg: TrialConfig, forward_flops: int, *, final: bool) -> int:
    """FLOPs of one eval point of ``cfg`` (``forward_flops``: the model's forward FLOPs per
    image; ``final``: the last eval point, with the full NLL and the sampling study)."""
    return sum(p.flops for p in eval_point_parts(cfg, forward_flops, final=final))


def _total_steps(cfg: TrialConfig, forward_flops: int) -> int:
    return cfg.budget.total_steps(cfg.train.batch_size, forward_flops)


def trial_eval_flops(cfg: TrialConfig, forward_flops: int) -> int:
    """FLOPs of every eval point of a trial: ``cfg.eval.eval_steps`` of its total steps (the
    log-spaced points, ``eval.at_steps`` and the end, which is the final point)."""
    points = len(cfg.eval.eval_steps(_total_steps(cfg, forward_flops)))
    return (points - 1) * eval_point_flops(cfg, forward_flops, final=False) + eval_point_flops(
        cfg, forward_flops, final=True
    )


@dataclass(frozen=True, kw_only=True)
class TrialCost:
    """A trial's compute and what it occupies (see the module docstring)."""

    train_flops: int
    eval_flops: int
    workers: int
    gpu_hours: float  # workers x wall time at cost.device_tflops (a CPU trial: if on GPUs)
    usd: float | None  # gpu_hours x cost.usd_per_gpu_hour, when a price is given


def trial_cost(cfg: TrialConfig, forward_flops: int, cost: CostConfig) -> TrialCost:
    """Training and evaluation FLOPs of a trial, and the GPU-hours of its W workers at
    ``cost.device_tflops`` sustained TFLOP/s each (idle ranks counted: module docstring)."""
    workers, batch = cfg.resources.num_workers, cfg.train.batch_size
    steps = _total_steps(cfg, forward_flops)
    occupied = workers * training_flops(forward_flops, steps * math.ceil(batch / workers))
    points = len(cfg.eval.eval_steps(steps))
    for final, count in ((False, points - 1), (True, 1)):
        parts = eval_point_parts(cfg, forward_flops, final=final)
        occupied += count * sum(p.occupied_flops(workers) for p in parts)
    gpu_hours = occupied / (cost.device_tflops * 1e12) / 3600.0
    price = cost.usd_per_gpu_hour
    return TrialCost(
        train_flops=training_flops(forward_flops, steps * batch),
        eval_flops=trial_eval_flops(cfg, forward_flops),
        workers=workers,
        gpu_hours=gpu_hours,
        usd=None if price is None else gpu_hours * price,
    )
