"""Sampling loops: ancestral (full or strided, Sec. 4) and DDIM (Song et al. 2020).

Strided sampling is ancestral sampling on a respaced process:
``sample(diffusion.respace("50"), model, shape)``. Every random draw can be injected: the
initial x_T as ``noise``, per-step noise through ``step_noise(i)``, or both drawn from a
``generator`` in a fixed order (x_T first, then one draw per step, t = T-1 ... 0), the
same order as the reference implementation, so seeded runs replay exactly.

``generators`` (one per sample, e.g. :func:`index_generators`) draws sample i's x_T and
every step's noise from its own generator, in that same order: a sample then does not
depend on which other samples share its batch, so a sample set split over any number of
workers (by sample index) is drawn exactly as in one piece.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from diffusion.gaussian import GaussianDiffusion, Model

__all__ = [
    "SAMPLING_METHODS",
    "ddim_sample",
    "ddim_sample_loop",
    "draw_per_index",
    "index_generators",
    "index_seed",
    "p_sample",
    "p_sample_loop",
    "sample",
]

StepNoise = Callable[[int], torch.Tensor]
SAMPLING_METHODS = ("ancestral", "ddim")


def index_seed(*entropy: int) -> int:
    """A 63-bit seed mixed from non-negative integers, e.g. (seed, eval step, sample index),
    with numpy's ``SeedSequence``: distinct tuples give unrelated streams."""
    if any(not isinstance(e, int) or e < 0 for e in entropy):
        raise ValueError(f"entropy: expected non-negative integers, got {entropy}")
    words = [len(entropy), *entropy]  # the length first: (a, b) and (a, b, 0) differ
    state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


def index_generators(
    entropy: Sequence[int], indices: Iterable[int], device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per index i, seeded with :func:`index_seed` (*entropy, i)."""
    return [torch.Generator(device=device).manual_seed(index_seed(*entropy, i)) for i in indices]


def draw_per_index(
    generators: Sequence[torch.Generator],
    shape: Sequence[int],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """[len(generators), *shape]: row i drawn from ``generators[i]``, placed on ``device``."""
    rows = [
        torch.randn(tuple(shape), generator=g, device=g.device, dtype=dtype) for g in generators
    ]
    return torch.stack(rows).to(device)


def p_sample(
    diffusion: GaussianDiffusion,
    model: Model,
    x: torch.Tensor,
    t: torch.Tensor,
    *,
    noise: torch.Tensor,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_t -> x_{t-1} (:meth:`GaussianDiffusion.p_sample`).

    Returns (x_{t-1}, predicted x_0), both [N, C, H, W].
    """
    out = diffusion.p_sample(
        model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs, noise=noise
    )
    return out["sample"], out["pred_xstart"]


def ddim_sample(
    diffusion: GaussianDiffusion,
    model: Model,
    x: torch.Tensor,
    t: torch.Tensor,
    *,
    noise: torch.Tensor,
    eta: float = 0.0,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (Song et al. 2020, Eq. 12; :meth:`GaussianDiffusion.ddim_sample`).

    Returns (x_{t-1}, predicted x_0), both [N, C, H, W].
    """
    out = diffusion.ddim_sample(
        model,
        x,
        t,
        clip_denoised=clip_denoised,
        model_kwargs=model_kwargs,
        eta=eta,
        noise=noise,
    )
    return out["sample"], out["pred_xstart"]


def _loop(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: Sequence[int],
    step: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    *,
    noise: torch.Tensor | None,
    step_noise: StepNoise | None,
    generator: torch.Generator | None,
    generators: Sequence[torch.Generator] | None,
    device: torch.device | str,
    dtype: torch.dtype,
    progress: bool,
    **step_kwargs,
) -> torch.Tensor:
    shape = tuple(shape)
    if generators is not None:
        if generator is not None:
            raise ValueError("generator and generators: give at most one")
        if len(generators) != shape[0]:
            raise ValueError(f"generators: {len(generators)} for a batch of {shape[0]}")

    def draw() -> torch.Tensor:
        if generators is not None:
            return draw_per_index(generators, shape[1:], device=device, dtype=dtype)
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    x = draw() if noise is None else noise.to(device=device, dtype=dtype)
    if tuple(x.shape) != shape:
        raise ValueError(f"noise: shape {tuple(x.shape)} != requested shape {shape}")
    indices = list(range(diffusion.num_timesteps))[::-1]
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="sampling", leave=False)
    for i in indices:
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        z = draw() if step_noise is None else step_noise(i).to(device=device, dtype=dtype)
        with torch.no_grad():
            x, _ = step(diffusion, model, x, t, noise=z, **step_kwargs)
    return x


def p_sample_loop(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: Sequence[int],
    *,
    noise: torch.Tensor | None = None,
    step_noise: StepNoise | None = None,
    generator: torch.Generator | None = None,
    generators: Sequence[torch.Generator] | None = None,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling over every step of ``diffusion`` (respace it for strided sampling).

    Noise: ``noise`` / ``step_noise`` when given, else from ``generator`` (one stream for the
    batch) or ``generators`` (one per sample), else torch's global RNG.

    Returns x_0 samples [N, C, H, W] (shape = ``shape``), in [-1, 1] when clipping.
    """
    return _loop(
        diffusion,
        model,
        shape,
        p_sample,
        noise=noise,
        step_noise=step_noise,
        generator=generator,
        generators=generators,
        device=device,
        dtype=dtype,
        progress=progress,
        clip_denoised=clip_denoised,
        model_kwargs=model_kwargs,
    )


def ddim_sample_loop(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: Sequence[int],
    *,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    step_noise: StepNoise | None = None,
    generator: torch.Generator | None = None,
    generators: Sequence[torch.Generator] | None = None,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM sampling over every step of ``diffusion`` (respace it, e.g. ``"ddim50"``)."""
    if eta < 0:
        raise ValueError(f"eta: must be >= 0, got {eta}")
    return _loop(
        diffusion,
        model,
        shape,
        ddim_sample,
        noise=noise,
        step_noise=step_noise,
        generator=generator,
        generators=generators,
        device=device,
        dtype=dtype,
        progress=progress,
        eta=eta,
        clip_denoised=clip_denoised,
        model_kwargs=model_kwargs,
    )


def sample(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: Sequence[int],
    *,
    steps: str | int | None = None,
    method: str = "ancestral",
    eta: float = 0.0,
    **kwargs,
) -> torch.Tensor:
    """Sample with ``steps`` strided steps (a spacing string or a count; None = all T).

    ``method`` is "ancestral" or "ddim"; other keyword arguments go to the loop.
    """
    if method not in SAMPLING_METHODS:
        raise ValueError(f"method: got {method!r}; allowed values: {list(SAMPLING_METHODS)}")
    if steps is not None and str(steps) != str(diffusion.num_timesteps):
        diffusion = diffusion.respace(str(steps))
    if method == "ddim":
        return ddim_sample_loop(diffusion, model, shape, eta=eta, **kwargs)
    return p_sample_loop(diffusion, model, shape, **kwargs)
