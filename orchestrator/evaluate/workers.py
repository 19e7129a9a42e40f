"""``diffscale eval --workers N``: the checkpoint evaluation on N Ray Train workers (a
``TorchTrainer`` on a private local Ray cluster unless RAY_ADDRESS is set, as a trial runs),
each evaluating its share; rank 0 writes the outputs and its result comes back."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch

from orchestrator.evaluate.command import EvalOptions, evaluate_checkpoint

__all__ = ["evaluate_on_workers"]

RESULT_FILE = "result.json"  # rank 0's result, in the checkpoint it reports (Ray Train keeps
# only a checkpoint's metrics, so the document travels as a file)


def _worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(int(config["threads"]))
    options = EvalOptions(**config["options"])
    if config["use_gpu"]:
        options = dataclasses.replace(options, device=str(ray.train.torch.get_device()))
    result = evaluate_checkpoint(config["checkpoint"], options, config["out"])
    with tempfile.TemporaryDirectory(prefix="diffscale-eval-") as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            (Path(tmp) / RESULT_FILE).write_text(json.dumps(result))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"workers": result["workers"]}, checkpoint=checkpoint)


def evaluate_on_workers(
    checkpoint: str | Path,
    options: EvalOptions,
    out_dir: str | Path,
    *,
    workers: int,
    use_gpu: bool = False,
    cpus_per_worker: float | None = None,
) -> dict:
    """Evaluate ``checkpoint`` on ``workers`` Ray Train workers (one GPU each with
    ``use_gpu``); returns rank 0's result (the same numbers as one worker gives).

    ``cpus_per_worker`` (default: this machine's cores / workers on a local cluster, else 1)
    is each worker's Ray CPU resource and torch thread count. The output directory must be
    reachable from rank 0's node (on a local cluster: any local path).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if workers < 1:
        raise ValueError(f"--workers: must be >= 1, got {workers}")
    address = os.environ.get("RAY_ADDRESS")
    if cpus_per_worker is None:
        cpus_per_worker = 1.0 if address else max(1, (os.cpu_count() or 1) // workers)
    if not ray.is_initialized():
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=True)
    storage = Path(out_dir).resolve() / "ray"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "checkpoint": str(Path(checkpoint).resolve()),
            "options": dataclasses.asdict(options),
            "out": str(Path(out_dir).resolve()),
            "use_gpu": use_gpu,
            "threads": max(1, int(cpus_per_worker)),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(name="diffscale-eval", storage_path=str(storage)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise RuntimeError(f"evaluation on {workers} workers failed: {error}") from None
    if result.error is not None:
        raise RuntimeError(f"evaluation on {workers} workers failed: {result.error}")
    with result.checkpoint.as_directory() as directory:
        return json.loads((Path(directory) / RESULT_FILE).read_text())
