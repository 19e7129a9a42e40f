"""Timestep samplers for the training loss (Nichol & Dhariwal 2021, Sec. 3.3, Eq. 18).

A sampler draws t ~ p_t and returns the importance weight 1 / (T p_t) of each draw, so
``(weights * losses).mean()`` is an unbiased estimate of the uniform-t loss whatever p is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "SAMPLERS",
    "LossSecondMomentResampler",
    "TimestepSampler",
    "UniformSampler",
    "create_named_schedule_sampler",
    "create_sampler",
]


class TimestepSampler(ABC):
    """Distribution over the T timesteps of a diffusion process, for the training loss."""

    def __init__(self, num_timesteps: int | object) -> None:
        # A diffusion process is accepted too (anything with ``num_timesteps``).
        num_timesteps = getattr(num_timesteps, "num_timesteps", num_timesteps)
        if int(num_timesteps) < 1:
            raise ValueError(f"num_timesteps: must be >= 1, got {num_timesteps}")
        self.num_timesteps = int(num_timesteps)

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised float64 weights [T] of the sampling distribution (all positive)."""

    def probabilities(self) -> np.ndarray:
        """p_t, float64 [T], summing to 1."""
        w = self.weights()
        return w / np.sum(w)

    def sample(
        self,
        batch_size: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` timesteps: (t [B] int64, weights [B] float32 = 1 / (T p_t)).

        ``generator`` (a CPU torch.Generator) makes the draws reproducible per rank.
        """
        p = self.probabilities()
        probs = torch.from_numpy(p)
        t = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * probs[t])
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:  # noqa: B027
        """Feed back this rank's per-example losses (a no-op for fixed distributions)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


class UniformSampler(TimestepSampler):
    """p_t = 1/T: every weight is 1."""

    def weights(self) -> np.ndarray:
        return np.ones(self.num_timesteps, dtype=np.float64)


class LossSecondMomentResampler(TimestepSampler):
    """Importance sampling of L_vlb, Eq. 18: p_t proportional to sqrt(E[L_t^2]).

    Keeps the last ``history_per_term`` losses of each t; samples uniformly until every t
    holds that many; then mixes a ``uniform_prob`` share of the uniform distribution into
    p_t so no timestep is starved. Under DDP, :meth:`update` gathers every rank's
    (t, loss) pairs so all ranks keep the same history and draw from the same p_t.
    """

    def __init__(
        self, num_timesteps: int | object, history_per_term: int = 10, uniform_prob: float = 0.001
    ) -> None:
        super().__init__(num_timesteps)
        if history_per_term < 1:
            raise ValueError(f"history_per_term: must be >= 1, got {history_per_term}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob: must be in [0, 1], got {uniform_prob}")
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self.loss_history = np.zeros((self.num_timesteps, self.history_per_term), np.float64)
        self.loss_counts = np.zeros(self.num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        """True once every timestep holds a full history."""
        return bool((self.loss_counts == self.history_per_term).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self.loss_history**2, axis=-1))
        w /= np.sum(w)
        w *= 1 - self.uniform_prob
        w += self.uniform_prob / len(w)
        return w

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record losses from this rank; under torch.distributed, from all ranks (rank order)."""
        ts, ls = _all_gather_pairs(t, losses)
        self.update_with_all_losses(ts, ls)

    update_with_local_losses = update  # the reference implementation's name

    def update_with_all_losses(self, ts: list[int], losses: list[float]) -> None:
        """Record unweighted per-example losses; each t keeps its newest ``history`` values."""
        for t, loss in zip(ts, losses, strict=True):
            if self.loss_counts[t] == self.history_per_term:
                self.loss_history[t, :-1] = self.loss_history[t, 1:]  # drop the oldest
                self.loss_history[t, -1] = loss
            else:
                self.loss_history[t, self.loss_counts[t]] = loss
                self.loss_counts[t] += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "loss_history": torch.from_numpy(self.loss_history.copy()),
            "loss_counts": torch.from_numpy(self.loss_counts.copy()),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        history = np.asarray(state["loss_history"], dtype=np.float64)
        counts = np.asarray(state["loss_counts"], dtype=np.int64)
        if history.shape != self.loss_history.shape or counts.shape != self.loss_counts.shape:
            raise ValueError(
                f"sampler state has history {history.shape} / counts {counts.shape}, expected "
                f"{self.loss_history.shape} / {self.loss_counts.shape} (a different T or history?)"
            )
        self.loss_history = history.copy()
        self.loss_counts = counts.copy()


def _all_gather_pairs(t: torch.Tensor, losses: torch.Tensor) -> tuple[list[int], list[float]]:
    """(t, loss) pairs of every rank, concatenated in rank order; local when not distributed.

    Ranks may hold different batch sizes: sizes are gathered first and batches padded.
    """
    t = t.detach().reshape(-1)
    losses = losses.detach().reshape(-1).to(torch.float64)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t.tolist(), losses.tolist()
    world = dist.get_world_size()
    size = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    max_size = int(max(s.item() for s in sizes))
    t_pad = torch.zeros(max_size, dtype=torch.int64, device=t.device)
    l_pad = torch.zeros(max_size, dtype=torch.float64, device=t.device)
    t_pad[: t.numel()] = t.to(torch.int64)
    l_pad[: losses.numel()] = losses
    t_all = [torch.zeros_like(t_pad) for _ in range(world)]
    l_all = [torch.zeros_like(l_pad) for _ in range(world)]
    dist.all_gather(t_all, t_pad)
    dist.all_gather(l_all, l_pad)
    ts: list[int] = []
    ls: list[float] = []
    for s, tb, lb in zip(sizes, t_all, l_all, strict=True):
        n = int(s.item())
        ts.extend(tb[:n].tolist())
        ls.extend(lb[:n].tolist())
    return ts, ls


SAMPLERS: dict[str, Callable[[int], TimestepSampler]] = {
    "uniform": UniformSampler,
    "loss-second-moment": LossSecondMomentResampler,
}


def create_sampler(name: str, num_timesteps: int | object) -> TimestepSampler:
    """A sampler from the registry: "uniform" or "loss-second-moment" (Eq. 18)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown timestep sampler {name!r}; allowed: {sorted(SAMPLERS)}")
    return SAMPLERS[name](num_timesteps)


create_named_schedule_sampler = create_sampler  # the reference implementation's name
