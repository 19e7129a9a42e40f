"""What a trial accumulates between two log points, on the training device: the logging
window (per-example training statistics, averaged over the window and over every rank when a
log point is reached) and the non-finite watch (the first step whose loss was not finite).

Both are tensors updated by device ops only, so a GPU step never waits on the host; they are
read (one transfer each) at log points, eval points and checkpoints.
"""

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

__all__ = ["LogWindow", "NonFiniteWatch", "all_reduce_min", "all_reduce_sum"]

Q = TRAIN_QUARTILES
LOSS, MSE, VB, COUNT = 0, 1, 2, 3  # the first four slots of the sums
QUARTILE_SUMS = 4  # then the loss sum per quartile of t, then the count per quartile
QUARTILE_COUNTS = QUARTILE_SUMS + Q


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks in place (unchanged without a process group)."""
    if _distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_min(values: torch.Tensor) -> torch.Tensor:
    """The minimum of ``values`` over the ranks, in place (unchanged without a group)."""
    if _distributed():
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values


class LogWindow:
    """Sums of the training terms since the last log point (float64, on ``device``).

    Layout of ``sums``: loss, mse, vb, count, then the loss sum and the count per quartile of
    t. A checkpoint between two log points keeps them (the rank's RNG file holds ``sums``).
    """

    def __init__(self, num_timesteps: int, device: torch.device | str = "cpu") -> None:
        self.num_timesteps = num_timesteps
        self.sums = torch.zeros(QUARTILE_COUNTS + Q, dtype=torch.float64, device=device)
        self._quartiles = torch.arange(Q, device=device)[:, None]  # [Q, 1]

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """Add one step's per-example ``loss`` (and ``mse``, ``vb`` when present) by ``t``.

        Device ops only (no boolean indexing, which would wait for the host): the quartile
        sums are masked row sums of a [Q, B] one-hot.
        """
        loss = terms["loss"].detach().double().to(self.sums.device)  # [B]
        t = terms["t"].to(self.sums.device)
        quartile = (t * Q // self.num_timesteps).clamp(max=Q - 1)  # [B]
        onehot = quartile[None, :] == self._quartiles  # [Q, B]
        zero = torch.zeros((), dtype=torch.float64, device=loss.device)
        step = torch.zeros_like(self.sums)
        step[LOSS] = loss.sum()
        for i, key in ((MSE, "mse"), (VB, "vb")):
            if key in terms:
                step[i] = terms[key].detach().double().sum().to(self.sums.device)
        step[COUNT] = loss.numel()
        step[QUARTILE_SUMS:QUARTILE_COUNTS] = torch.where(onehot, loss[None, :], zero).sum(1)
        step[QUARTILE_COUNTS:] = onehot.sum(1)
        self.sums += step

    def metrics(self, has_mse: bool, has_vb: bool) -> dict[str, float]:
        """Averages over the window and all ranks, then a new window (collective: every rank
        calls it; one device-to-host transfer)."""
        sums = all_reduce_sum(self.sums.clone()).tolist()
        self.sums.zero_()
        n = max(sums[COUNT], 1.0)
        out = {TRAIN_LOSS: sums[LOSS] / n}
        if has_mse:
            out[TRAIN_MSE] = sums[MSE] / n
        if has_vb:
            out[TRAIN_VB] = sums[VB] / n
        for q in range(Q):
            if sums[QUARTILE_COUNTS + q] > 0:
                out[train_loss_quartile(q)] = sums[QUARTILE_SUMS + q] / sums[QUARTILE_COUNTS + q]
        return out


class NonFiniteWatch:
    """The first step whose training objective was not finite, kept on ``device``.

    ``observe`` is a device op per step; ``first_bad`` (collective: the minimum over every
    rank, so all ranks stop at the same step) reads it. Nothing is checkpointed: a trial
    reads the watch before every checkpoint, so a checkpoint is only ever written while the
    watch is clean.
    """

    CLEAN = 2**62  # larger than any step

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.step = torch.full((), self.CLEAN, dtype=torch.int64, device=device)
        self.value = torch.zeros((), dtype=torch.float64, device=device)  # its objective

    def observe(self, step: int, objective: torch.Tensor) -> None:
        """Record ``step`` if ``objective`` (a scalar tensor) is not finite and no earlier
        step was."""
        first = ~torch.isfinite(objective.detach()) & (self.step == self.CLEAN)
        self.step = torch.where(first, step, self.step)
        self.value = torch.where(first, objective.detach().double(), self.value)

    def first_bad(self) -> tuple[int, float] | None:
        """(step, objective) of the first non-finite step on any rank, or None (collective:
        every rank calls it at the same steps)."""
        step = int(all_reduce_min(self.step.clone()).item())
        if step == self.CLEAN:
            return None
        mine = int(self.step.item()) == step  # the rank that saw it knows the value
        return step, float(self.value.item()) if mine else float("nan")
