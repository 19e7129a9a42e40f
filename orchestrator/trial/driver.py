"""The driver of one trial: a Ray Train ``TorchTrainer`` named after the trial.

Running the same trial again with the same storage resumes it from its newest checkpoint;
Ray's ``FailureConfig(max_failures)`` restarts crashed workers from the newest checkpoint
too. Every worker gets the driver's S3 endpoint, tracking URI and credentials by reference
through ``RunConfig(worker_runtime_env=...)`` (:mod:`orchestrator.trial.env`: what travels,
and why a secret never does). Checkpoint folders are named by step
(``checkpoint_step00000077``); the one at each grid cell's step is kept whatever
``train.keep_checkpoints`` says (see :mod:`orchestrator.trial.restore`). The workers run
:func:`orchestrator.trial.loop.train_loop_per_worker`.
"""

from __future__ import annotations

import os

from diffusion.data import builtin_dataset, prepare_dataset
from diffusion.data.storage import resolve
from diffusion.flops import forward_flops_per_image
from orchestrator.config import TrialConfig
from orchestrator.names import CHECKPOINT_SCORE, DATASETS_DIR
from orchestrator.trial.env import worker_env
from orchestrator.trial.loop import train_loop_per_worker
from orchestrator.trial.restore import checkpoints_to_keep

__all__ = ["prepare_trial_data", "run_trial"]


def prepare_trial_data(cfg: TrialConfig) -> tuple[str, str | None]:
    """(URI, S3 endpoint) of the training data; a built-in dataset is prepared once as
    shards under the trial storage, so every worker reads it the same way."""
    spec = builtin_dataset(cfg.data.dataset)
    if spec is None:
        return cfg.data.dataset, cfg.data.endpoint_url
    uri = f"{cfg.storage.path.rstrip('/')}/{DATASETS_DIR}/{spec.name}"
    prepare_dataset(spec.name, uri, endpoint_url=cfg.storage.endpoint_url)
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
    total_steps = cfg.budget.total_steps(
        cfg.train.batch_size, forward_flops_per_image(cfg.model_config())
    )
    env = worker_env(os.environ, cfg.tracking.uri)
    if not ray.is_initialized():
        joins = bool(os.environ.get("RAY_ADDRESS"))  # a cluster: its nodes need the env too
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or "local",
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"env_vars": env} if joins and env else None,
        )
    storage, storage_fs = cfg.storage.path, None
    if storage.startswith("s3://"):  # explicit filesystem: honours the endpoint override
        storage_fs, storage = resolve(storage, endpoint_url=cfg.storage.endpoint_url)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "trial": cfg.to_dict(),
            "data_uri": data_uri,
            "data_endpoint": data_endpoint,
            "tags": dict(tags or {}),
            "parent_run_id": parent_run_id,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.resources.num_workers,
            use_gpu=cfg.resources.use_gpu,
            resources_per_worker={"CPU": cfg.resources.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=checkpoints_to_keep(
                    cfg.eval.at_steps, total_steps, cfg.train.keep_checkpoints
                ),
                checkpoint_score_attribute=CHECKPOINT_SCORE,
                checkpoint_score_order="max",
            ),
            callbacks=list(callbacks or []),
            worker_runtime_env={"env_vars": env},
        ),
    )
    return trainer.fit()
