"""One trial of the scaling grid: DDP training of one configuration on Ray Train (V2).

The driver (:func:`run_trial`) builds a ``TorchTrainer`` named after the trial, so running
the same trial again with the same storage resumes it from its newest checkpoint; Ray's
``FailureConfig(max_failures)`` restarts crashed workers from the newest checkpoint too.
The worker loop (:func:`train_loop_per_worker`) trains with the shared
:func:`diffusion.training.train_step`, logs to MLflow from rank 0 only (the run id travels
in the checkpoint, so a resumed trial continues the same run), evaluates at eval points
spread evenly in log-compute, and checkpoints everything an exact continuation needs:
model, EMA, optimizer, timestep-sampler state, every rank's RNG states, the data position,
step, images, FLOPs and the MLflow run id, each rank's files listed with checksums.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from diffusion.data import ShardLoader, prepare_dataset, to_model_range
from diffusion.data.storage import resolve
from diffusion.evaluation import evaluate_nll
from diffusion.flops import forward_flops_per_image, training_flops
from diffusion.metrics import (
    feature_statistics,
    frechet_distance,
    get_feature_extractor,
    precision_recall,
)
from diffusion.sampling import sample, save_image_grid
from diffusion.schedules import space_timesteps
from diffusion.timesteps import create_sampler
from diffusion.training import EMA, make_optimizer, train_step
from diffusion.unet import UNet
from orchestrator.checkpoint import (
    META,
    RNG_FILE,
    STATE_FILE,
    CheckpointError,
    verify_rank_manifests,
    write_rank_files,
)
from orchestrator.config import TrialConfig, parse_sampler
from orchestrator.evaluate import load_real_images

log = logging.getLogger(__name__)

__all__ = ["CheckpointState", "run_trial", "train_loop_per_worker"]


class CheckpointState:
    """The newest valid checkpoint of a run, downloaded locally (or nothing)."""

    def __init__(self, directory: Path | None, meta: dict | None) -> None:
        self.directory = directory
        self.meta = meta or {}

    @classmethod
    def find(cls, world_size: int, scratch: Path) -> CheckpointState:
        """Newest checkpoint that verifies; a corrupt newer one is skipped with a warning."""
        import pyarrow.fs as pafs
        import ray.train

        latest = ray.train.get_checkpoint()
        if latest is None:
            return cls(None, None)
        fs = latest.filesystem
        parent = latest.path.rstrip("/").rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(parent))
        candidates = sorted(
            (i.path for i in infos
             if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")),
            reverse=True,
        )  # fmt: skip
        if latest.path not in candidates:
            candidates.insert(0, latest.path)
        for path in candidates:
            local = scratch / Path(path).name
            try:
                ray.train.Checkpoint(path=path, filesystem=fs).to_directory(str(local))
                verify_rank_manifests(local, world_size)
                meta = json.loads((local / META).read_text())
            except (OSError, ValueError, CheckpointError) as exc:
                log.warning("skipping checkpoint %s: %s", path, exc)
                continue
            if path != latest.path:
                log.warning("restoring from %s instead of the newest %s", path, latest.path)
            return cls(local, meta)
        log.warning(
            "no valid checkpoint among %d candidates: starting from scratch", len(candidates)
        )
        return cls(None, None)


def unfinished_run_id(tracking_uri: str, experiment: str, trial: str) -> str | None:
    """The newest MLflow run of ``trial`` that did not finish, if any.

    Ray restarts a worker group from scratch when it fails before its first checkpoint is
    committed; that attempt's run (tagged ``trial``) is continued rather than orphaned.
    Steps it already logged are not logged again, and on the CPU they replay bit-exactly.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], f"tags.trial = '{trial}'", order_by=["attributes.start_time DESC"]
    )
    return next((r.info.run_id for r in runs if r.info.status != "FINISHED"), None)


# --------------------------------------------------------------------------- worker loop
def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class _Window:
    """Per-example training stats between two log points, summed over ranks when logged.

    Layout of ``sums``: loss, mse, vb, count, then loss sum and count per quartile of t.
    """

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps
        self.sums = torch.zeros(12, dtype=torch.float64)

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        loss = terms["loss"].detach().double().cpu()
        quartile = (terms["t"].cpu() * 4 // self.num_timesteps).clamp(max=3)
        self.sums[0] += loss.sum()
        for i, key in ((1, "mse"), (2, "vb")):
            if key in terms:
                self.sums[i] += terms[key].detach().double().sum().cpu()
        self.sums[3] += loss.numel()
        for q in range(4):
            mask = quartile == q
            self.sums[4 + q] += loss[mask].sum()
            self.sums[8 + q] += mask.sum()

    def metrics(self, has_mse: bool, has_vb: bool) -> dict[str, float]:
        """Averages over the window and all ranks (collective: every rank calls it)."""
        sums = _all_reduce_sum(self.sums.clone())
        self.sums.zero_()
        n = max(sums[3].item(), 1.0)
        out = {"train/loss": sums[0].item() / n}
        if has_mse:
            out["train/mse"] = sums[1].item() / n
        if has_vb:
            out["train/vb"] = sums[2].item() / n
        for q in range(4):
            if sums[8 + q] > 0:
                out[f"train/loss_q{q}"] = (sums[4 + q] / sums[8 + q]).item()
        return out


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

    model_config = cfg.model_config()
    diffusion = cfg.diffusion.build()
    fwd_flops = forward_flops_per_image(model_config)
    global_batch = cfg.train.batch_size
    total_steps = cfg.budget.total_steps(global_batch, fwd_flops)
    eval_steps = set(cfg.eval.eval_steps(total_steps))

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = UNet(model_config).to(device)
    ema = EMA(model, cfg.train.ema_rate)
    optimizer = make_optimizer(model.parameters(), lr=cfg.train.lr,
                               weight_decay=cfg.train.weight_decay)  # fmt: skip
    sampler = create_sampler(cfg.train.timestep_sampler, diffusion.num_timesteps)
    loader = ShardLoader(
        loop_config["data_uri"], cfg.data.train_split, global_batch // world, rank=rank,
        world_size=world, seed=cfg.train.seed, flip=cfg.data.flip,
        endpoint_url=loop_config.get("data_endpoint"),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + rank)
    torch.manual_seed(cfg.train.seed * 7919 + rank)  # dropout: a different stream per rank
    step, images, run_id = 0, 0, None
    window_sums = None

    scratch = Path(tempfile.mkdtemp(prefix="diffscale-restore-"))
    restored = CheckpointState.find(world, scratch)
    if restored.directory is not None:
        state = torch.load(restored.directory / STATE_FILE, map_location=device,
                           weights_only=True)  # fmt: skip
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        loader.load_state_dict(state["loader"])
        rng = torch.load(restored.directory / RNG_FILE.format(rank=rank), weights_only=True)
        torch.set_rng_state(rng["torch"])
        generator.set_state(rng["generator"])
        window_sums = rng["window"]
        step, images = restored.meta["step"], restored.meta["images"]
        run_id = restored.meta.get("mlflow_run_id")
        log.info("rank %d resumed at step %d from %s", rank, step, restored.directory)

    model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, NCCL on GPU)
    tracker = None
    if rank == 0:
        from orchestrator.tracking import RunLogger

        if run_id is None:  # a restart before any checkpoint committed: reuse its run
            run_id = unfinished_run_id(cfg.tracking.resolve_uri(), cfg.tracking.experiment,
                                       cfg.name)  # fmt: skip
        tracker = RunLogger(
            cfg.tracking.resolve_uri(), cfg.tracking.experiment, run_id=run_id,
            run_name=cfg.name, tags={**loop_config.get("tags", {}), "trial": cfg.name},
            parent_run_id=loop_config.get("parent_run_id"),
        )  # fmt: skip
        if run_id is None:
            params = sum(p.numel() for p in getattr(model, "module", model).parameters())
            tracker.log_params({**cfg.flatten(), "model.params": params,
                                "model.flops_per_image": fwd_flops})  # fmt: skip
        run_id = tracker.run_id

    autocast = torch.bfloat16 if cfg.train.bf16 else None
    window = _Window(diffusion.num_timesteps)
    if window_sums is not None:  # a checkpoint between two log points keeps the partial window
        window.sums.copy_(window_sums)
    batches: Iterator = loader.batches()
    train_seconds, started, last_log = 0.0, time.perf_counter(), (time.perf_counter(), images)
    try:
        while step < total_steps:
            x, _ = next(batches)
            tick = time.perf_counter()
            model.train()
            try:
                terms = train_step(
                    model, diffusion, sampler, optimizer, x.to(device), generator=generator,
                    ema=ema, grad_clip=cfg.train.grad_clip, autocast_dtype=autocast,
                )  # fmt: skip
            except FloatingPointError as exc:
                raise RuntimeError(
                    f"trial {cfg.name}: non-finite loss at step {step + 1} ({exc}); the last "
                    f"good checkpoint is kept"
                ) from None
            train_seconds += time.perf_counter() - tick
            step += 1
            images += global_batch
            window.add(terms)
            metrics: dict[str, float] = {}
            if step % cfg.train.log_every == 0 or step == total_steps:
                metrics.update(window.metrics("mse" in terms, "vb" in terms))  # all ranks
                now = time.perf_counter()
                rate = (images - last_log[1]) / max(now - last_log[0], 1e-9)
                metrics["perf/images_per_s"] = rate
                metrics["perf/flops_per_s"] = 3 * fwd_flops * rate
                last_log = (now, images)
            at_eval = step in eval_steps
            at_ckpt = at_eval or step % cfg.train.checkpoint_every == 0 or step == total_steps
            if at_eval and rank == 0:
                # Evaluation must not move the training RNG (dropout), or a trial's result
                # would depend on what evaluation did, e.g. building a feature network.
                devices = [device] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    metrics.update(_evaluate(cfg, diffusion, ema.module, device, step, tracker,
                                             final=step == total_steps))  # fmt: skip
            if metrics or at_ckpt:
                metrics["compute/images"] = float(images)
                metrics["compute/flops"] = float(training_flops(fwd_flops, images))
                metrics["step"] = float(step)
                if step == total_steps:
                    elapsed = time.perf_counter() - started
                    metrics["perf/train_time_fraction"] = train_seconds / max(elapsed, 1e-9)
            if tracker is not None and metrics:
                tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)
            if at_ckpt:
                if tracker is not None and not tracker.flush(timeout=30):
                    # Points up to this checkpoint must be stored before it commits: a crash
                    # after it resumes past them. During an outage they stay buffered.
                    log.warning("MLflow unreachable at step %d: metrics stay buffered", step)
                _report_checkpoint(
                    cfg, rank, step, images, fwd_flops, run_id, model, ema, optimizer,
                    sampler, loader, generator, window, metrics,
                )  # fmt: skip
        if tracker is not None:
            tracker.close("FINISHED")
            tracker = None
    finally:
        if tracker is not None:
            tracker.close("FAILED")
        shutil.rmtree(scratch, ignore_errors=True)


def _report_checkpoint(cfg, rank, step, images, fwd_flops, run_id, model, ema, optimizer,
                       sampler, loader, generator, window, metrics) -> None:  # fmt: skip
    import ray.train

    with tempfile.TemporaryDirectory(prefix="diffscale-ckpt-") as tmp:
        directory = Path(tmp)
        files: dict[str, Any] = {
            RNG_FILE.format(rank=rank): {"torch": torch.get_rng_state(),
                                         "generator": generator.get_state(),
                                         "window": window.sums.clone()},
        }  # fmt: skip
        if rank == 0:
            files[STATE_FILE] = {
                "model": getattr(model, "module", model).state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "sampler": sampler.state_dict(),
                "loader": loader.state_dict(),
            }
            files[META] = {
                "step": step, "images": images, "flops": training_flops(fwd_flops, images),
                "mlflow_run_id": run_id, "config": cfg.to_dict(), "world_size": loader.world_size,
                "model": cfg.model_config().to_dict(), "diffusion": cfg.diffusion.to_dict(),
            }  # fmt: skip
        write_rank_files(directory, rank, files)
        checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({k: float(v) for k, v in metrics.items()}, checkpoint=checkpoint)


def _evaluate(cfg: TrialConfig, diffusion, ema_model, device, step, tracker, final) -> dict:
    """Rank 0 at an eval point: NLL, FD and precision/recall from EMA samples, a grid."""
    ev = cfg.eval
    real = load_real_images(cfg.data.dataset, cfg.data.eval_split, ev.nll_images,
                            endpoint_url=cfg.data.endpoint_url)  # fmt: skip
    real_x = to_model_range(real)
    kind = "full" if final and ev.full_nll_at_end else "subset"
    nll = evaluate_nll(diffusion, ema_model, real_x.split(64), kind=kind,
                       timesteps_per_image=ev.nll_timesteps, seed=cfg.train.seed,
                       device=device)  # fmt: skip
    out = {"eval/nll_bpd": nll.bpd, "eval/nll_stderr": nll.stderr}
    if kind == "full":
        out["eval/nll_bpd_full"] = nll.bpd
    c, size = real.shape[1], real.shape[2]
    g = torch.Generator(device=device).manual_seed(cfg.train.seed + step)
    count = max(ev.fid_samples, ev.grid_samples)
    fake = sample(diffusion, ema_model, (count, c, size, size), steps=ev.sample_steps,
                  generator=g, device=device).cpu()  # fmt: skip
    if ev.fid_samples > 0:
        extractor = get_feature_extractor(ev.feature_name(cfg.data.dataset), device=device)
        real_f = extractor(real_x)
        real_stats = feature_statistics(real_f)
        fake_f = extractor(fake[: ev.fid_samples])
        out[f"eval/{extractor.fd_metric}"] = frechet_distance(
            *real_stats, *feature_statistics(fake_f)
        )
        out["eval/precision"], out["eval/recall"] = precision_recall(real_f, fake_f, k=ev.k)
        if final and ev.sampling:  # the config requires fid_samples > 0 for a sampling study
            out.update(_sampling_study(cfg, ema_model, device, real_x.shape[1:], extractor,
                                       real_stats))  # fmt: skip
    if tracker is not None and ev.grid_samples > 0:
        with tempfile.TemporaryDirectory() as tmp:
            path = save_image_grid(fake[: ev.grid_samples], Path(tmp) / f"samples_{step:08d}.png",
                                   scale=max(1, 128 // size))  # fmt: skip
            tracker.log_artifact(str(path), "samples")
    return {k: float(v) for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


def _sampling_study(cfg: TrialConfig, ema_model, device, image_shape, extractor,
                    real_stats) -> dict:  # fmt: skip
    """FD of each ``eval.sampling`` sampler at the end of training (Sec. 4, Fig. 8) against
    the real images' feature statistics, logged as ``sampling/<fd>/<method>/<steps>``
    (method ancestral, ddim or ancestral_<variance>)."""
    out = {}
    n = cfg.eval.fid_samples
    for item in cfg.eval.sampling:
        method, spacing, var = parse_sampler(item)
        process = dataclasses.replace(cfg.diffusion, var_type=var) if var else cfg.diffusion
        diffusion = process.build()
        steps = len(space_timesteps(diffusion.num_timesteps, spacing))
        g = torch.Generator(device=device).manual_seed(cfg.train.seed + 7 * steps)
        fake = sample(diffusion, ema_model, (n, *image_shape), steps=spacing, method=method,
                      generator=g, device=device).cpu()  # fmt: skip
        name = f"{method}_{var}" if var else method
        out[f"sampling/{extractor.fd_metric}/{name}/{steps}"] = frechet_distance(
            *real_stats, *feature_statistics(extractor(fake))
        )
    return out


# --------------------------------------------------------------------------- driver
def prepare_trial_data(cfg: TrialConfig) -> tuple[str, str | None]:
    """(URI, S3 endpoint) of the training data; the built-in digits are prepared once as
    shards under the trial storage, so every worker reads them the same way."""
    if cfg.data.dataset != "digits":
        return cfg.data.dataset, cfg.data.endpoint_url
    uri = cfg.storage.path.rstrip("/") + "/datasets/digits"
    prepare_dataset("digits", uri, endpoint_url=cfg.storage.endpoint_url)
    return uri, cfg.storage.endpoint_url


def run_trial(
    cfg: TrialConfig,
    *,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    callbacks: list | None = None,
):
    """Train one trial on Ray (a private local cluster unless RAY_ADDRESS is set).

    Running it again with the same name and storage continues from the newest checkpoint
    and the same MLflow run. ``tags`` and ``parent_run_id`` go to a new MLflow run (a sweep's
    child run); ``callbacks`` are Ray Train callbacks (a sweep passes Tune's report
    callback). Returns Ray's ``Result``; a trial that fails after its retries raises
    ``ray.train.TrainingFailedError`` (with the worker's error).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    # Workers run in their own directories: pin relative paths and the tracking URI here.
    cfg = cfg.with_overrides(
        [f"tracking.uri={cfg.tracking.resolve_uri()}", f"storage.path={cfg.storage.resolve_path()}"]
    )
    data_uri, data_endpoint = prepare_trial_data(cfg)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 log_to_driver=True)  # fmt: skip
    storage, storage_fs = cfg.storage.path, None
    if storage.startswith("s3://"):  # explicit filesystem: honours the endpoint override
        storage_fs, storage = resolve(storage, endpoint_url=cfg.storage.endpoint_url)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"trial": cfg.to_dict(), "data_uri": data_uri,
                           "data_endpoint": data_endpoint, "tags": dict(tags or {}),
                           "parent_run_id": parent_run_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.resources.num_workers, use_gpu=cfg.resources.use_gpu,
            resources_per_worker={"CPU": cfg.resources.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=list(callbacks or []),
        ),
    )  # fmt: skip
    return trainer.fit()
