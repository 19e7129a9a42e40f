"""``DiffusionConfig``: the typed, serialisable description of a diffusion process."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from diffusion.gaussian import LEARNED_VAR_TYPES, GaussianDiffusion
from diffusion.ops import check_choice
from diffusion.schedules import BETA_SCHEDULES, get_beta_schedule

__all__ = ["DiffusionConfig"]


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    """Everything that defines a diffusion process; ``build()`` makes it.

    Defaults are the paper's improved setting: cosine schedule, T = 4000, eps prediction,
    learned-range variances (Eq. 15), L_hybrid (Eq. 16), timesteps rescaled to [0, 1000).
    """

    schedule: str = "cosine"
    num_timesteps: int = 4000
    mean_type: str = "eps"
    var_type: str = "learned_range"
    objective: str = "hybrid"
    hybrid_lambda: float = 1e-3
    rescale_timesteps: bool = True

    def __post_init__(self) -> None:
        check_choice("schedule", self.schedule, tuple(BETA_SCHEDULES))
        if not isinstance(self.num_timesteps, int) or self.num_timesteps < 1:
            raise ValueError(f"num_timesteps: must be a positive int, got {self.num_timesteps!r}")
        self.build()  # validates every combination now, with the process's own messages

    def build(self) -> GaussianDiffusion:
        return GaussianDiffusion(
            get_beta_schedule(self.schedule, self.num_timesteps),
            mean_type=self.mean_type,
            var_type=self.var_type,
            objective=self.objective,
            hybrid_lambda=self.hybrid_lambda,
            rescale_timesteps=self.rescale_timesteps,
        )

    @property
    def learns_sigma(self) -> bool:
        return self.var_type in LEARNED_VAR_TYPES

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionConfig:
        """Inverse of ``to_dict``; unknown keys raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"diffusion: unknown keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)
