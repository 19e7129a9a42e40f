"""How an evaluation is split over the ranks of a process group, and gathered back.

Work is cut into fixed chunks of global indices, [0, b), [b, 2b), ... (b = the batch size),
that do not depend on the number of workers; rank r takes a contiguous run of them. Every
chunk is computed as the same batch whatever the number of workers and its noise is seeded
per index, so gathering the ranks' results in rank order gives, bit for bit on the CPU, what
one worker computes alone. Without a process group there is one rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Shard"]


@dataclass(frozen=True)
class Shard:
    """This rank's place in the evaluation: ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} of world_size {self.world_size}: out of range")

    @classmethod
    def current(cls) -> Shard:
        """The default torch.distributed process group's rank and size, else one rank."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def chunks(self, count: int, size: int) -> list[range]:
        """This rank's chunks of the indices [0, count), in chunks of ``size``: chunk c is
        [c * size, min(count, (c + 1) * size)); rank r takes chunks
        [r * n // world, (r + 1) * n // world) of the n chunks."""
        if size < 1:
            raise ValueError(f"size: must be >= 1, got {size}")
        n = math.ceil(count / size)
        lo, hi = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
        return [range(c * size, min(count, (c + 1) * size)) for c in range(lo, hi)]

    def gather(self, part: np.ndarray) -> np.ndarray:
        """Every rank's ``part`` concatenated in rank order (= index order), on every rank.

        A collective: every rank calls it at the same point (``all_gather_object``, gloo or
        NCCL). ``part`` may have no rows; its other dimensions must agree across ranks.
        """
        if self.world_size == 1:
            return part
        import torch.distributed as dist

        parts: list[np.ndarray | None] = [None] * self.world_size
        dist.all_gather_object(parts, part)
        return np.concatenate(parts)
