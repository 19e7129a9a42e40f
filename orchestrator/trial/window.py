"""What a trial accumulates between two log points, on the training device: the logging
window (per-example training statistics, averaged over the window and over every rank when a
log point is reached, and the spread of the objective estimate and of the gradient norm) and
the non-finite watch (the first step whose loss was not finite).

Both are tensors updated by device ops only, so a GPU step never waits on the host; they are
read (one transfer each) at log points, eval points and checkpoints.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from orchestrator.names import (
    TRAIN_GRAD_NORM,
    TRAIN_GRAD_NORM_VAR,
    TRAIN_LOSS,
    TRAIN_MSE,
    TRAIN_OBJECTIVE_VAR,
    TRAIN_QUARTILES,
    TRAIN_VB,
    train_loss_quartile,
)

__all__ = ["LogWindow", "NonFiniteWatch", "all_reduce_min", "all_reduce_sum"]

Q = TRAIN_QUARTILES
LOSS, MSE, VB, COUNT = 0, 1, 2, 3  # the first four slots of the sums
QUARTILE_SUMS = 4  # then the loss sum per quartile of t, then the count per quartile
QUARTILE_COUNTS = QUARTILE_SUMS + Q
# the slots of ``spread``: the objective terms' squared deviations from their step's batch
# mean and the degrees of freedom (sum of B - 1), then the gradient norm's sum, its sum of
# squares and the number of steps that gave one
OBJ_SQDEV, OBJ_DOF, GRAD_SUM, GRAD_SQ, GRAD_COUNT = range(5)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


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
    t. ``spread`` holds what the two variances below need (slots ``OBJ_SQDEV`` ...
    ``GRAD_COUNT``). A checkpoint between two log points keeps both (:meth:`state`, in the
    rank's RNG file), so a resumed trial logs the same window as an uninterrupted one.

    The two variances (what Eq. 18 is for: the importance sampler exists to lower the
    variance of the L_vlb estimate, Nichol & Dhariwal 2021, Sec. 3.3):

    * ``train/objective_var``: the per-example variance of the importance-weighted terms
      o_i = w_i * loss_i, w_i = 1 / (T p_{t_i}) (all ones for the uniform sampler), whose batch
      mean is the step's objective, an unbiased estimate of the uniform-t loss (for
      ``objective: vlb``, of L_vlb minus its prior term, in bits/dim). Each step contributes
      the squared deviations of its terms from *that step's own* batch mean, pooled over the
      window's steps and ranks: sum_steps sum_i (o_i - mean_step o)^2 / sum_steps (B - 1)
      (B: the rank's batch). Pooling within batches keeps the drift of the loss over the
      window out of it: it is the variance of one example's estimate at the current weights,
      and the variance of a step's estimate (the batch mean) is this divided by the global
      batch. It is the natural measure for Eq. 18 because the sampler changes exactly the
      distribution of o_i: p_t ~ sqrt(E[L_t^2]) minimises E[o^2] = sum_t L_t^2 / (T^2 p_t).
    * ``train/grad_norm_var``: the sample variance (n - 1) across the window's steps of the
      global gradient norm (before clipping; the same on every rank after DDP's all-reduce),
      with ``train/grad_norm`` its mean. Per-example gradients are not available without
      extra backward passes, so this one includes the drift of the norm over the window.
    """

    def __init__(self, num_timesteps: int, device: torch.device | str = "cpu") -> None:
        self.num_timesteps = num_timesteps
        self.sums = torch.zeros(QUARTILE_COUNTS + Q, dtype=torch.float64, device=device)
        self.spread = torch.zeros(GRAD_COUNT + 1, dtype=torch.float64, device=device)
        self._quartiles = torch.arange(Q, device=device)[:, None]  # [Q, 1]

    def add(self, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor | None = None) -> None:
        """Add one step's per-example ``loss`` (and ``mse``, ``vb`` when present) by ``t``, its
        importance ``weights`` (all ones when absent) and the step's ``grad_norm``.

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
        spread = torch.zeros_like(self.spread)
        weights = terms.get("weights")
        terms_o = loss if weights is None else loss * weights.detach().double().to(loss.device)
        spread[OBJ_SQDEV] = (terms_o - terms_o.mean()).square().sum()
        spread[OBJ_DOF] = loss.numel() - 1
        if grad_norm is not None:
            g = grad_norm.detach().double().to(self.sums.device)
            spread[GRAD_SUM], spread[GRAD_SQ], spread[GRAD_COUNT] = g, g * g, 1.0
        self.spread += spread

    def state(self) -> torch.Tensor:
        """The partial window as one CPU tensor (what a checkpoint keeps)."""
        return torch.cat([self.sums, self.spread]).detach().to("cpu", copy=True)

    def load_state(self, state: torch.Tensor) -> None:
        """Continue the partial window :meth:`state` saved. A checkpoint of an older version
        holds ``sums`` only: its spread starts empty."""
        n = self.sums.numel()
        if state.numel() not in (n, n + self.spread.numel()):
            raise ValueError(
                f"log window state has {state.numel()} values, expected {n} or "
                f"{n + self.spread.numel()}"
            )
        self.sums.copy_(state[:n])
        self.spread.copy_(state[n:] if state.numel() > n else torch.zeros_like(self.spread))

    def metrics(self, has_mse: bool, has_vb: bool) -> dict[str, float]:
        """Averages (and the variances of the class docstring) over the window and all ranks,
        then a new window (collective: every rank calls it; one device-to-host transfer)."""
        both = all_reduce_sum(torch.cat([self.sums, self.spread])).tolist()
        sums, spread = both[: self.sums.numel()], both[self.sums.numel() :]
        self.sums.zero_()
        self.spread.zero_()
        n = max(sums[COUNT], 1.0)
        out = {TRAIN_LOSS: sums[LOSS] / n}
        if has_mse:
            out[TRAIN_MSE] = sums[MSE] / n
        if has_vb:
            out[TRAIN_VB] = sums[VB] / n
        for q in range(Q):
            if sums[QUARTILE_COUNTS + q] > 0:
                out[train_loss_quartile(q)] = sums[QUARTILE_SUMS + q] / sums[QUARTILE_COUNTS + q]
        if spread[OBJ_DOF] > 0:
            out[TRAIN_OBJECTIVE_VAR] = spread[OBJ_SQDEV] / spread[OBJ_DOF]
        world = _world_size()  # every rank added the same (all-reduced) gradient norm
        steps, g_sum, g_sq = (spread[i] / world for i in (GRAD_COUNT, GRAD_SUM, GRAD_SQ))
        if steps >= 1:
            out[TRAIN_GRAD_NORM] = g_sum / steps
        if steps >= 2:
            out[TRAIN_GRAD_NORM_VAR] = max(0.0, (g_sq - g_sum * g_sum / steps) / (steps - 1))
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
