"""The logging window: per-example training statistics between two log points, averaged over
the window and over every rank when a log point is reached."""

from __future__ import annotations

import torch
import torch.distributed as dist

from orchestrator.names import (
    TRAIN_LOSS,
    TRAIN_MSE,
    TRAIN_QUARTILES,
    TRAIN_VB,
    train_loss_quartile,
)

__all__ = ["LogWindow", "all_reduce_sum"]

Q = TRAIN_QUARTILES
LOSS, MSE, VB, COUNT = 0, 1, 2, 3  # the first four slots of the sums
QUARTILE_SUMS = 4  # then the loss sum per quartile of t, then the count per quartile
QUARTILE_COUNTS = QUARTILE_SUMS + Q


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks in place (unchanged without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class LogWindow:
    """Sums of the training terms since the last log point (float64).

    Layout of ``sums``: loss, mse, vb, count, then the loss sum and the count per quartile of
    t. A checkpoint between two log points keeps them (the rank's RNG file holds ``sums``).
    """

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps
        self.sums = torch.zeros(QUARTILE_COUNTS + Q, dtype=torch.float64)

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """Add one step's per-example ``loss`` (and ``mse``, ``vb`` when present) by ``t``."""
        loss = terms["loss"].detach().double().cpu()
        quartile = (terms["t"].cpu() * Q // self.num_timesteps).clamp(max=Q - 1)
        self.sums[LOSS] += loss.sum()
        for i, key in ((MSE, "mse"), (VB, "vb")):
            if key in terms:
                self.sums[i] += terms[key].detach().double().sum().cpu()
        self.sums[COUNT] += loss.numel()
        for q in range(Q):
            mask = quartile == q
            self.sums[QUARTILE_SUMS + q] += loss[mask].sum()
            self.sums[QUARTILE_COUNTS + q] += mask.sum()

    def metrics(self, has_mse: bool, has_vb: bool) -> dict[str, float]:
        """Averages over the window and all ranks, then a new window (collective: every rank
        calls it)."""
        sums = all_reduce_sum(self.sums.clone())
        self.sums.zero_()
        n = max(sums[COUNT].item(), 1.0)
        out = {TRAIN_LOSS: sums[LOSS].item() / n}
        if has_mse:
            out[TRAIN_MSE] = sums[MSE].item() / n
        if has_vb:
            out[TRAIN_VB] = sums[VB].item() / n
        for q in range(Q):
            if sums[QUARTILE_COUNTS + q] > 0:
                out[train_loss_quartile(q)] = (
                    sums[QUARTILE_SUMS + q] / sums[QUARTILE_COUNTS + q]
                ).item()
        return out
