"""The Ray Train worker loop of a trial, top to bottom: setup, restore, the step, the log
window, the eval point, the checkpoint.

Every rank trains with the shared :func:`diffusion.training.train_step` under DDP; rank 0
logs to MLflow (the run id travels in the checkpoint, so a resumed trial continues the same
run), every rank evaluates its share at the eval points (spread evenly in log-compute;
rank 0 logs) and every rank checkpoints
its part of the :class:`~orchestrator.trial.state.TrialState`. On the CPU a trial restored
from a checkpoint continues bit for bit: the order of every random draw below matters.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffusion.data import ShardLoader
from diffusion.flops import forward_flops_per_image, training_flops
from diffusion.gaussian import GaussianDiffusion
from diffusion.timesteps import TimestepSampler, create_sampler
from diffusion.training import EMA, make_optimizer, train_step
from diffusion.unet import UNet
from orchestrator.config import TrialConfig
from orchestrator.cost import eval_point_flops
from orchestrator.evaluate import evaluate_trial, save_grid
from orchestrator.names import (
    CHECKPOINT_SCORE,
    COMPUTE_EVAL_FLOPS,
    COMPUTE_FLOPS,
    COMPUTE_IMAGES,
    MODEL_FLOPS_PARAM,
    MODEL_PARAMS_PARAM,
    PERF_FLOPS_PER_S,
    PERF_IMAGES_PER_S,
    PERF_TRAIN_TIME_FRACTION,
    REPORT_STEP,
    SAMPLES_ARTIFACT_DIR,
    TRIAL_TAG,
    checkpoint_dir_name,
    samples_grid_file,
)
from orchestrator.trial.restore import checkpoint_score, newest_valid_checkpoint, pinned_steps
from orchestrator.trial.state import RankRng, TrialState
from orchestrator.trial.window import LogWindow, NonFiniteWatch

if TYPE_CHECKING:
    from orchestrator.tracking import RunLogger

log = logging.getLogger(__name__)

__all__ = ["Worker", "build_worker", "train_loop_per_worker"]

FLUSH_TIMEOUT_S = 30.0
NODES_TAG = "nodes"  # MLflow tag: the Ray node id of every rank, in rank order
RESUMED_TAG = "resumed_at_step"  # MLflow tag: the checkpoint step the latest attempt began at


# --------------------------------------------------------------------------- setup
@dataclass(kw_only=True)
class Worker:
    """What one rank trains with, and where it stands."""

    cfg: TrialConfig
    rank: int
    device: torch.device
    diffusion: GaussianDiffusion
    model: torch.nn.Module  # DDP-wrapped once prepared
    ema: EMA
    optimizer: torch.optim.Optimizer
    sampler: TimestepSampler
    loader: ShardLoader
    generator: torch.Generator  # timesteps and noise of this rank, on its device
    window: LogWindow
    watch: NonFiniteWatch
    forward_flops: int
    total_steps: int
    eval_steps: set[int]
    step: int = 0
    images: int = 0
    run_id: str | None = None
    eval_flops: int = 0  # cumulative FLOPs of the eval points so far

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size

    def snapshot(self) -> TrialState:
        """The state a checkpoint keeps, as it is now."""
        return TrialState(
            rank=self.rank,
            world_size=self.loader.world_size,
            step=self.step,
            images=self.images,
            flops=training_flops(self.forward_flops, self.images),
            mlflow_run_id=self.run_id,
            eval_flops=self.eval_flops,
            config=self.cfg.to_dict(),
            model_config=self.cfg.model_config().to_dict(),
            diffusion_config=self.cfg.diffusion.to_dict(),
            model=getattr(self.model, "module", self.model).state_dict(),
            ema=self.ema.state_dict(),
            optimizer=self.optimizer.state_dict(),
            sampler=self.sampler.state_dict(),
            loader=self.loader.state_dict(),
            rng=RankRng(
                torch=torch.get_rng_state(),
                generator=self.generator.get_state(),
                window=self.window.state(),  # the partial log window (sums and spread)
                cuda=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            ),
        )

    def restore(self, state: TrialState) -> None:
        """Continue from ``state`` (before the model is wrapped for DDP)."""
        self.model.load_state_dict(state.model)
        self.ema.load_state_dict(state.ema)
        self.optimizer.load_state_dict(state.optimizer)
        self.sampler.load_state_dict(state.sampler)
        self.loader.load_state_dict(state.loader)
        torch.set_rng_state(state.rng.torch)
        if state.rng.cuda is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state.rng.cuda, self.device)
        self.generator.set_state(state.rng.generator)
        self.window.load_state(state.rng.window)  # a partial window survives the checkpoint
        self.step, self.images, self.run_id = state.step, state.images, state.mlflow_run_id
        self.eval_flops = state.eval_flops


def build_worker(
    cfg: TrialConfig,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    data_uri: str,
    data_endpoint: str | None,
) -> Worker:
    """Model, EMA, optimizer, sampler and data of one rank, seeded as every run seeds them."""
    model_config = cfg.model_config()
    diffusion = cfg.diffusion.build()
    forward_flops = forward_flops_per_image(model_config)
    global_batch = cfg.train.batch_size
    total_steps = cfg.budget.total_steps(global_batch, forward_flops)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = UNet(model_config).to(device)
    if cfg.train.channels_last:  # NHWC activations for the convolutions (EMA copies it)
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg.train.ema_rate)
    optimizer = make_optimizer(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    sampler = create_sampler(cfg.train.timestep_sampler, diffusion.num_timesteps)
    loader = ShardLoader(
        data_uri,
        cfg.data.train_split,
        global_batch // world_size,
        rank=rank,
        world_size=world_size,
        seed=cfg.train.seed,
        flip=cfg.data.flip,
        endpoint_url=data_endpoint,
        prefetch=1,  # the next batch is read while this one trains
        pin_memory=device.type == "cuda",
    )
    # On the CPU the same stream as every earlier version; on a GPU drawn there (no sync).
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + rank)
    torch.manual_seed(cfg.train.seed * 7919 + rank)  # dropout: a different stream per rank
    return Worker(
        cfg=cfg,
        rank=rank,
        device=device,
        diffusion=diffusion,
        model=model,
        ema=ema,
        optimizer=optimizer,
        sampler=sampler,
        loader=loader,
        generator=generator,
        window=LogWindow(diffusion.num_timesteps, device=device),
        watch=NonFiniteWatch(device),
        forward_flops=forward_flops,
        total_steps=total_steps,
        eval_steps=set(cfg.eval.eval_steps(total_steps)),
    )


def open_run(w: Worker, loop_config: dict) -> RunLogger:
    """Rank 0's MLflow run: the checkpoint's, else an unfinished one of this trial (a
    restart before any checkpoint committed), else a new one with the config as params."""
    from orchestrator.tracking import RunLogger, unfinished_run_id

    cfg = w.cfg
    uri = cfg.tracking.resolve_uri()
    run_id = w.run_id
    if run_id is None:  # a restart before any checkpoint committed: reuse its run
        run_id = unfinished_run_id(uri, cfg.tracking.experiment, cfg.name)
    tracker = RunLogger(
        uri,
        cfg.tracking.experiment,
        run_id=run_id,
        run_name=cfg.name,
        tags={**loop_config.get("tags", {}), TRIAL_TAG: cfg.name},
        parent_run_id=loop_config.get("parent_run_id"),
    )
    if run_id is None:
        params = sum(p.numel() for p in getattr(w.model, "module", w.model).parameters())
        tracker.log_params(
            {**cfg.flatten(), MODEL_PARAMS_PARAM: params, MODEL_FLOPS_PARAM: w.forward_flops}
        )
    w.run_id = tracker.run_id
    return tracker


# --------------------------------------------------------------------------- the step
def train_one_step(w: Worker, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One optimizer step on this rank's batch, its terms added to the log window and its
    objective to the non-finite watch: device work only, nothing here waits on the host
    (with the uniform sampler; Eq. 18's sampler keeps its history on the host)."""
    w.model.train()
    memory_format = torch.channels_last if w.cfg.train.channels_last else torch.preserve_format
    terms = train_step(
        w.model,
        w.diffusion,
        w.sampler,
        w.optimizer,
        x.to(w.device, non_blocking=True, memory_format=memory_format),
        generator=w.generator,
        ema=w.ema,
        grad_clip=w.cfg.train.grad_clip,
        autocast_dtype=torch.bfloat16 if w.cfg.train.bf16 else None,
        check_finite=False,  # read by stop_if_non_finite at log points and checkpoints
    )
    w.step += 1
    w.images += w.global_batch
    w.window.add(terms, grad_norm=_grad_norm(w.model, terms))
    w.watch.observe(w.step, terms["objective"])
    return terms


def _grad_norm(model: torch.nn.Module, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The step's global gradient norm before clipping (a device scalar, no host sync):
    clipping's own, else computed from the gradients the step left (DDP averaged them)."""
    if "grad_norm" in terms:
        return terms["grad_norm"]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads)


def stop_if_non_finite(w: Worker) -> None:
    """Raise if any rank's loss was non-finite since the start (collective: every rank calls
    it at the same steps). Called before every log, eval point and checkpoint, so nothing
    after the first bad step is logged or saved and the last good checkpoint is kept."""
    bad = w.watch.first_bad()
    if bad is not None:
        step, value = bad
        raise RuntimeError(
            f"trial {w.cfg.name}: non-finite loss at step {step} (training loss is {value}); "
            f"the last good checkpoint is kept"
        )


# --------------------------------------------------------------------------- the log window
@dataclass
class Clock:
    """Wall-clock accounting: time in train steps, and throughput between log points.

    On a GPU a step returns once its work is queued; the queue drains when the log point
    reads the window, which is timed as training too, so the sum stays right.
    """

    train_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    last_log: tuple[float, int] = (0.0, 0)  # (time, images) of the last log point

    def throughput(self, images: int, forward_flops: int) -> dict[str, float]:
        now = time.perf_counter()
        rate = (images - self.last_log[1]) / max(now - self.last_log[0], 1e-9)
        self.last_log = (now, images)
        return {PERF_IMAGES_PER_S: rate, PERF_FLOPS_PER_S: 3 * forward_flops * rate}

    def train_time_fraction(self) -> float:
        return self.train_seconds / max(time.perf_counter() - self.started, 1e-9)


# --------------------------------------------------------------------------- the eval point
def eval_point(w: Worker, tracker: RunLogger | None) -> dict[str, float]:
    """Every rank's share of the evaluation of the EMA model (a collective: all ranks call
    it at the same steps; the metrics come back the same on each), the cumulative evaluation
    FLOPs (checkpointed), and rank 0's sample grid as an artifact.

    Evaluation must not move the training RNG (dropout), or a trial's result would depend on
    what evaluation did, e.g. building a feature network.
    """
    final = w.step == w.total_steps
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        result = evaluate_trial(
            w.cfg, w.diffusion, w.ema.module, w.device, step=w.step, final=final
        )
        if tracker is not None and result.grid is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = save_grid(result.grid, Path(tmp) / samples_grid_file(w.step))
                tracker.log_artifact(str(path), SAMPLES_ARTIFACT_DIR)
    w.eval_flops += eval_point_flops(w.cfg, w.forward_flops, final=final)
    return {**result.metrics, COMPUTE_EVAL_FLOPS: float(w.eval_flops)}


# --------------------------------------------------------------------------- the checkpoint
def report_checkpoint(state: TrialState, metrics: dict[str, float], *, pinned: bool) -> None:
    """Save this rank's part of ``state`` and report it with ``metrics`` (a barrier: every
    rank reports at the same steps) as ``checkpoint_step<step>``; a ``pinned`` one (a grid
    cell's step) is never deleted (:mod:`orchestrator.trial.restore`)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="diffscale-ckpt-") as tmp:
        state.save(tmp)
        checkpoint = ray.train.Checkpoint.from_directory(tmp)
        reported = {k: float(v) for k, v in metrics.items()}
        reported[CHECKPOINT_SCORE] = checkpoint_score(state.step, pinned)
        ray.train.report(
            reported, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(state.step)
        )


# --------------------------------------------------------------------------- the loop
def worker_nodes(world: int) -> str:
    """The Ray node id of every rank, comma-separated in rank order (a collective when
    ``world`` > 1: every rank calls it once, after DDP is set up)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not dist.is_initialized():
        return node
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    return ",".join(str(n) for n in nodes)


def train_loop_per_worker(loop_config: dict) -> None:
    """The Ray Train worker; ``loop_config`` = {"trial": TrialConfig.to_dict(), "data_uri",
    "data_endpoint"} and optionally the MLflow run's "tags" and "parent_run_id"."""
    import ray.train
    import ray.train.torch

    cfg = TrialConfig.from_dict(loop_config["trial"], source="trial config")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    device = ray.train.torch.get_device()
    w = build_worker(
        cfg,
        rank=rank,
        world_size=world,
        device=device,
        data_uri=loop_config["data_uri"],
        data_endpoint=loop_config.get("data_endpoint"),
    )

    scratch = Path(tempfile.mkdtemp(prefix="diffscale-restore-"))
    restored = newest_valid_checkpoint(world, scratch)
    if restored is not None:
        w.restore(TrialState.load(restored, rank=rank, map_location=device, verify=False))
        log.info("rank %d resumed at step %d from %s", rank, w.step, restored)

    w.model = ray.train.torch.prepare_model(w.model)  # DDP (gloo on CPU, NCCL on GPU)
    where = {NODES_TAG: worker_nodes(world)}  # which machines ran it (after a node loss too)
    if restored is not None:
        where[RESUMED_TAG] = str(w.step)
    tags = {**loop_config.get("tags", {}), **where}
    tracker = open_run(w, {**loop_config, "tags": tags}) if rank == 0 else None
    batches: Iterator = w.loader.batches()
    clock = Clock()
    clock.last_log = (clock.started, w.images)
    try:
        while w.step < w.total_steps:
            x, _ = next(batches)
            tick = time.perf_counter()
            terms = train_one_step(w, x)
            last = w.step == w.total_steps
            at_log = w.step % cfg.train.log_every == 0 or last
            at_eval = w.step in w.eval_steps
            at_ckpt = at_eval or w.step % cfg.train.checkpoint_every == 0 or last
            metrics: dict[str, Any] = {}
            if at_log or at_ckpt:  # the only host reads of the step's results (all ranks)
                stop_if_non_finite(w)
            if at_log:
                metrics.update(w.window.metrics("mse" in terms, "vb" in terms))  # all ranks
            clock.train_seconds += time.perf_counter() - tick  # a GPU's queue drains at reads
            if at_log:
                metrics.update(clock.throughput(w.images, w.forward_flops))
            if at_eval:  # every rank: the evaluation is sharded
                metrics.update(eval_point(w, tracker))
            if metrics or at_ckpt:
                metrics[COMPUTE_IMAGES] = float(w.images)
                metrics[COMPUTE_FLOPS] = float(training_flops(w.forward_flops, w.images))
                metrics[REPORT_STEP] = float(w.step)
                if last:
                    metrics[PERF_TRAIN_TIME_FRACTION] = clock.train_time_fraction()
            if tracker is not None and metrics:
                logged = {k: v for k, v in metrics.items() if k != REPORT_STEP}
                tracker.log_metrics(logged, step=w.step)
            if at_ckpt:
                if tracker is not None and not tracker.flush(timeout=FLUSH_TIMEOUT_S):
                    # Points up to this checkpoint must be stored before it commits: a crash
                    # after it resumes past them. During an outage they stay buffered.
                    log.warning("MLflow unreachable at step %d: metrics stay buffered", w.step)
                pinned = w.step in pinned_steps(cfg.eval.at_steps, w.total_steps)
                report_checkpoint(w.snapshot(), metrics, pinned=pinned)
        if tracker is not None:
            tracker.close("FINISHED")
            tracker = None
    finally:
        if tracker is not None:
            tracker.close("FAILED")
        shutil.rmtree(scratch, ignore_errors=True)
