"""Noise schedules and timestep respacing (Nichol & Dhariwal 2021, Sec. 3.2 and Sec. 4).

Everything here is float64 numpy: the schedules are small (T <= a few thousand) and the
products of (1 - beta) that follow lose precision quickly in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = [
    "BETA_SCHEDULES",
    "betas_for_alpha_bar",
    "cosine_alpha_bar",
    "cosine_betas",
    "get_beta_schedule",
    "linear_betas",
    "space_timesteps",
]

COSINE_S = 0.008  # Eq. 17 offset: keeps beta_t from being tiny near t = 0
MAX_BETA = 0.999  # Eq. 17 clipping: avoids a singularity at t = T


def linear_betas(num_timesteps: int) -> np.ndarray:
    """Linear schedule of Ho et al. (2020): 1e-4 .. 0.02 for T = 1000, scaled by 1000/T.

    The scaling keeps the total noise (and so abar_T) roughly independent of T. Below
    T = 21 the last beta would reach 1 or more, which is not a diffusion: rejected.
    """
    _check_num_timesteps(num_timesteps)
    if num_timesteps < 21:
        raise ValueError(
            f"num_timesteps: the linear schedule needs T >= 21 (its last beta is 20/T), "
            f"got {num_timesteps}; use 'cosine' for short processes"
        )
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_alpha_bar(t: float) -> float:
    """Eq. 17 (Nichol & Dhariwal 2021): f(t)/f(0) up to normalisation, t in [0, 1]."""
    return math.cos((t + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = MAX_BETA
) -> np.ndarray:
    """Betas that reproduce a continuous abar(t), t in [0, 1]: b_i = 1 - abar((i+1)/T)/abar(i/T).

    Each beta is clipped to at most ``max_beta`` (Eq. 17 and the text after it).
    """
    _check_num_timesteps(num_timesteps)
    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


def cosine_betas(num_timesteps: int) -> np.ndarray:
    """Cosine schedule, Eq. 17 (s = 0.008, betas clipped at 0.999)."""
    return betas_for_alpha_bar(num_timesteps, cosine_alpha_bar)


BETA_SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
}


def get_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas of the named schedule as a float64 array of shape [T]."""
    if name not in BETA_SCHEDULES:
        raise ValueError(
            f"schedule: unknown beta schedule {name!r}; allowed: {sorted(BETA_SCHEDULES)}"
        )
    return BETA_SCHEDULES[name](num_timesteps)


def space_timesteps(num_timesteps: int, spacing: str | list[int] | tuple[int, ...]) -> list[int]:
    """Timesteps of the original process kept by a strided sampler (Sec. 4), sorted.

    ``spacing`` takes the reference's three forms:

    * ``"50"``: 50 steps spread evenly over [0, T);
    * ``"10,15,20"`` (or a list of ints): T is cut into equal sections (the remainder goes
      one step each to the first sections) and each section gets its own evenly spaced count;
      inside a section the indices sit at an accumulated float stride rounded with Python's
      ``round`` (half to even), so ``(10, "5")`` gives ``[0, 2, 4, 7, 9]``;
    * ``"ddimN"``: the smallest integer stride ``k`` with ``len(range(0, T, k)) == N``
      (the DDIM paper's uniform skip); an error when no stride gives exactly N steps.
    """
    _check_num_timesteps(num_timesteps)
    if isinstance(spacing, str):
        spacing = spacing.strip()
        if spacing.startswith("ddim"):
            count = _parse_count(spacing[len("ddim") :], spacing)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == count:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(
                f"spacing: cannot create exactly {count} steps with an integer stride "
                f"over {num_timesteps} timesteps ({spacing!r})"
            )
        section_counts = [_parse_count(part, spacing) for part in spacing.split(",")]
    else:
        section_counts = [int(c) for c in spacing]
    if not section_counts:
        raise ValueError("spacing: needs at least one section count")

    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start = 0
    steps: list[int] = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count < 0 or size < count:
            raise ValueError(
                f"spacing: cannot take {count} steps from a section of {size} timesteps "
                f"(section {i} of {spacing!r}, T={num_timesteps})"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))


def _parse_count(text: str, spacing: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"spacing: cannot parse {spacing!r}; allowed forms: '50', '10,15,20', 'ddim25'"
        ) from None


def _check_num_timesteps(num_timesteps: int) -> None:
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps: must be a positive integer, got {num_timesteps!r}")
