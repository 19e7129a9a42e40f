"""The checkpointed state of a trial as one typed object.

A trial checkpoint holds everything an exact continuation needs (DESIGN.md, "Checkpoint"):
model, EMA, optimizer, timestep-sampler state, the data-loader position, step, images, FLOPs,
the MLflow run id and the resolved config, written by rank 0 (``trainer_state.pt`` and
``meta.json``), and every rank's RNG states and partial log window (``rng_rank{r}.pt``).
Each rank lists its files with checksums in its own manifest; Ray merges the ranks' files
into one checkpoint directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.checkpoint import verify_rank_manifests, write_rank_files
from orchestrator.names import CHECKPOINT_META, CHECKPOINT_RNG, CHECKPOINT_STATE

__all__ = ["RankRng", "TrialState"]


@dataclass(frozen=True, kw_only=True)
class RankRng:
    """One rank's random state: torch's global RNG (dropout on the CPU), the training
    generator (timesteps and noise), the log window's partial sums, and on a GPU the CUDA
    default generator (dropout there)."""

    torch: torch.Tensor
    generator: torch.Tensor
    window: torch.Tensor
    cuda: torch.Tensor | None = None  # the CUDA default generator (dropout on a GPU)

    def to_dict(self) -> dict[str, torch.Tensor]:
        out = {"torch": self.torch, "generator": self.generator, "window": self.window}
        return out if self.cuda is None else {**out, "cuda": self.cuda}


@dataclass(frozen=True, kw_only=True)
class TrialState:
    """What one rank saves at a checkpoint and reads back on restore.

    ``rng`` is this rank's; the rest is the same on every rank and written by rank 0 only.
    """

    rank: int
    world_size: int
    step: int
    images: int
    flops: int
    mlflow_run_id: str | None
    config: dict[str, Any]  # the resolved TrialConfig.to_dict()
    model_config: dict[str, Any]  # UNetConfig.to_dict(), for diffscale eval
    diffusion_config: dict[str, Any]  # DiffusionConfig.to_dict(), for diffscale eval
    model: dict[str, Any]  # the state dicts
    ema: dict[str, Any]
    optimizer: dict[str, Any]
    sampler: dict[str, Any]
    loader: dict[str, Any]
    rng: RankRng
    eval_flops: int = 0  # cumulative FLOPs of the eval points (0 in older checkpoints)

    def meta(self) -> dict[str, Any]:
        """The JSON part (``meta.json``)."""
        return {
            "step": self.step,
            "images": self.images,
            "flops": self.flops,
            "eval_flops": self.eval_flops,
            "mlflow_run_id": self.mlflow_run_id,
            "config": self.config,
            "world_size": self.world_size,
            "model": self.model_config,
            "diffusion": self.diffusion_config,
        }

    def save(self, directory: str | Path) -> None:
        """Write this rank's files and manifest into ``directory``."""
        files: dict[str, Any] = {CHECKPOINT_RNG.format(rank=self.rank): self.rng.to_dict()}
        if self.rank == 0:
            files[CHECKPOINT_STATE] = {
                "model": self.model,
                "ema": self.ema,
                "optimizer": self.optimizer,
                "sampler": self.sampler,
                "loader": self.loader,
            }
            files[CHECKPOINT_META] = self.meta()
        write_rank_files(Path(directory), self.rank, files)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        rank: int,
        map_location: torch.device | str = "cpu",
        verify: bool = True,
    ) -> TrialState:
        """Rank ``rank``'s view of a checkpoint: rank 0's state and meta, its own RNG file.

        ``verify`` checks every rank's manifest first (CheckpointError on a missing or
        altered file); restore skips it for a directory it has just verified. The state
        goes to ``map_location``; the RNG states stay on the CPU.
        """
        directory = Path(directory)
        meta = json.loads((directory / CHECKPOINT_META).read_text())
        if verify:
            verify_rank_manifests(directory, int(meta["world_size"]))
        state = torch.load(
            directory / CHECKPOINT_STATE, map_location=map_location, weights_only=True
        )
        rng = torch.load(directory / CHECKPOINT_RNG.format(rank=rank), weights_only=True)
        return cls(
            rank=rank,
            world_size=meta["world_size"],
            step=meta["step"],
            images=meta["images"],
            flops=meta["flops"],
            eval_flops=int(meta.get("eval_flops", 0)),
            mlflow_run_id=meta.get("mlflow_run_id"),
            config=meta["config"],
            model_config=meta["model"],
            diffusion_config=meta["diffusion"],
            model=state["model"],
            ema=state["ema"],
            optimizer=state["optimizer"],
            sampler=state["sampler"],
            loader=state["loader"],
            rng=RankRng(
                torch=rng["torch"],
                generator=rng["generator"],
                window=rng["window"],
                cuda=rng.get("cuda"),
            ),
        )
