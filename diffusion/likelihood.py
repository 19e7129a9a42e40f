"""Every bits/dim path of the variational bound (Ho et al. 2020 Eq. 5, Nichol & Dhariwal
2021 Sec. 2 and 3), with one per-image result type, :class:`BpdResult`, whose columns are
ordered by timestep (column t = L_t):

* :func:`calc_bpd`: the whole bound, sum_t L_t + L_T, per image, evaluating many timesteps in
  one model forward (equal to the plain loop :meth:`GaussianDiffusion.calc_bpd_loop`);
* :func:`estimate_bpd`: an unbiased per-image estimate from K stratified timesteps;
* :func:`evaluate_nll`: bits/dim over a dataset, as the paper reports it, and its standard
  error, as an :class:`NLLResult`.

Negative log-likelihood over a dataset:

* ``kind="full"``: every image's complete variational bound, all T terms plus the prior
  (Nichol & Dhariwal 2021, Sec. 2.2 and Table 1; :func:`calc_bpd`);
* ``kind="subset"``: for each image, K timesteps drawn by stratified sampling (one uniform
  draw in each of K strata of [0, T)); with stratum sizes n_k the estimate
  prior + sum_k n_k L_{t_k} is unbiased for the full bound. The strata grow
  geometrically with t (the first ones are single timesteps): L_t falls by orders of
  magnitude over the first few steps (L_0 is the decoder), so small t are taken exactly
  and only the flat tail is sampled, which cuts the variance several-fold compared with
  equal strata. The standard error is the spread of the per-image estimates over
  sqrt(N), so it covers both the choice of images and of timesteps.

Results always carry their kind, T and the number of terms per image.

Seeding: one generator for a whole run (``seed``), or one per image (``image_seeds``: the
noise and timesteps of image j's terms come from a generator seeded with (seed, j), see
:func:`diffusion.sampling.index_generators`), so an image's value does not depend on which
images share its batch and a dataset split over workers by image index gives the same
per-image values (:func:`nll_per_image`, then :func:`summarize_nll` over all of them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from diffusion.gaussian import BpdResult, GaussianDiffusion, Model
from diffusion.ops import NoiseFn, draw_noise, mean_flat
from diffusion.sampling import draw_per_index, index_generators

__all__ = [
    "NLL_KINDS",
    "BpdResult",
    "NLLResult",
    "calc_bpd",
    "estimate_bpd",
    "evaluate_nll",
    "nll_per_image",
    "stratified_timesteps",
    "summarize_nll",
]

NLL_KINDS = ("full", "subset")


@torch.no_grad()
def calc_bpd(
    diffusion: GaussianDiffusion,
    model: Model,
    x_start: torch.Tensor,
    *,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    noise_fn: NoiseFn | None = None,
    generator: torch.Generator | None = None,
    timesteps_per_batch: int = 16,
) -> BpdResult:
    """Full variational bound in bits/dim per image, ``timesteps_per_batch`` t per forward.

    Same computation as :meth:`GaussianDiffusion.calc_bpd_loop` (each t with fresh noise,
    drawn for t = T-1, ..., 0 in that order so a seeded run draws the very same noise), but
    the N images of several timesteps are stacked into one model batch of
    N * timesteps_per_batch: on the CPU and GPU alike, a few large forwards are much faster
    than T small ones. ``noise_fn(t)`` may supply the noise for timestep t explicitly.

    ``x_start``: [N, C, H, W] in [-1, 1]. Model kwargs with a batch dimension are repeated.
    """
    if timesteps_per_batch < 1:
        raise ValueError(f"timesteps_per_batch: must be >= 1, got {timesteps_per_batch}")
    model_kwargs = model_kwargs or {}
    n = x_start.shape[0]
    num_t = diffusion.num_timesteps
    vb = torch.empty(n, num_t, dtype=x_start.dtype, device=x_start.device)
    xstart_mse = torch.empty_like(vb)
    mse = torch.empty_like(vb)

    order = list(range(num_t))[::-1]
    for lo in range(0, num_t, timesteps_per_batch):
        chunk = order[lo : lo + timesteps_per_batch]
        k = len(chunk)
        noise = torch.cat(
            [draw_noise(noise_fn, t, x_start, generator) for t in chunk]
        )  # [k*N, ...]
        t_batch = torch.tensor(chunk, device=x_start.device).repeat_interleave(n)  # [k*N]
        x0 = x_start.repeat(k, *([1] * (x_start.ndim - 1)))  # [k*N, C, H, W]
        x_t = diffusion.q_sample(x0, t_batch, noise=noise)
        kwargs = {key: _repeat_batch(v, k, n) for key, v in model_kwargs.items()}
        out = diffusion.vb_terms_bpd(
            model, x0, x_t, t_batch, clip_denoised=clip_denoised, model_kwargs=kwargs
        )
        eps = diffusion.predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
        cols = torch.tensor(chunk, device=x_start.device)
        vb[:, cols] = out["output"].view(k, n).T  # [k*N] -> [N, k]
        xstart_mse[:, cols] = mean_flat((out["pred_xstart"] - x0) ** 2).view(k, n).T
        mse[:, cols] = mean_flat((eps - noise) ** 2).view(k, n).T

    prior = diffusion.prior_bpd(x_start)
    return BpdResult(
        total_bpd=vb.sum(dim=1) + prior, prior_bpd=prior, vb=vb, xstart_mse=xstart_mse, mse=mse
    )


def _repeat_batch(value: object, k: int, n: int) -> object:
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == n:
        return value.repeat(k, *([1] * (value.ndim - 1)))
    return value


@dataclass(frozen=True)
class NLLResult:
    """Mean bits/dim over ``num_images`` images and its standard error."""

    bpd: float
    stderr: float
    kind: str  # "full" (all T terms) or "subset" (an unbiased estimate)
    num_images: int
    num_timesteps: int  # T of the process
    terms_per_image: int  # T for "full", K for "subset"

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.kind == "full":
            return f"full bound, T={self.num_timesteps}, {self.num_images} images"
        return (
            f"unbiased estimate from {self.terms_per_image} of T={self.num_timesteps} "
            f"terms per image, {self.num_images} images"
        )


def stratified_timesteps(
    num_timesteps: int,
    k: int,
    n: int,
    generator: torch.Generator | None = None,
    *,
    generators: Sequence[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One uniform timestep in each of ``k`` strata of [0, T), for ``n`` images.

    Returns (t [n, k] int64, stratum sizes [k] float64). Stratum edges are
    floor((T+1)^(i/k)) - 1, made strictly increasing: single timesteps first, then
    geometrically wider strata; k = T gives every timestep once. The uniform draws come
    from ``generator``, or row j from ``generators[j]`` (one per image).
    """
    if not 1 <= k <= num_timesteps:
        raise ValueError(f"timesteps_per_image: must be in [1, T={num_timesteps}], got {k}")
    edges = [math.floor((num_timesteps + 1) ** (i / k)) - 1 for i in range(k + 1)]
    edges[0], edges[k] = 0, num_timesteps
    for i in range(1, k + 1):  # strictly increasing from the left ...
        edges[i] = max(edges[i], edges[i - 1] + 1)
    for i in range(k - 1, 0, -1):  # ... and leaving room for the strata on the right
        edges[i] = min(edges[i], edges[i + 1] - 1)
    edges = torch.tensor(edges, dtype=torch.int64)
    sizes = edges[1:] - edges[:-1]  # [k], all >= 1 since k <= T
    if generators is None:
        u = torch.rand(n, k, generator=generator, dtype=torch.float64)
    else:
        u = torch.stack([torch.rand(k, generator=g, dtype=torch.float64) for g in generators])
    t = edges[:-1] + (u * sizes).floor().to(torch.int64).clamp(max=sizes - 1)  # [n, k]
    return t, sizes.to(torch.float64)


@torch.no_grad()
def estimate_bpd(
    diffusion: GaussianDiffusion,
    model: Model,
    x_start: torch.Tensor,
    *,
    timesteps_per_image: int,
    generator: torch.Generator | None = None,
    generators: Sequence[torch.Generator] | None = None,
    clip_denoised: bool = True,
    max_batch: int = 512,
) -> torch.Tensor:
    """Unbiased per-image estimates [N] of the full bound in bits/dim (stratified t).

    The N * K (image, timestep) pairs are evaluated ``max_batch`` at a time; noise and
    timesteps come from ``generator`` (CPU), so a seeded estimate is reproducible, or from
    ``generators`` (CPU, one per image: its K timesteps, then its K noise draws).
    """
    n, k = x_start.shape[0], timesteps_per_image
    if generators is not None and len(generators) != n:
        raise ValueError(f"generators: {len(generators)} for {n} images")
    t, sizes = stratified_timesteps(
        diffusion.num_timesteps, k, n, generator=generator, generators=generators
    )
    t = t.reshape(-1).to(x_start.device)  # [N*K], image-major
    weights = sizes.repeat(n).to(x_start.device)  # [N*K]
    images = x_start.repeat_interleave(k, dim=0)  # [N*K, C, H, W]
    if generators is None:
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    else:
        noise = draw_per_index(
            generators, (k, *x_start.shape[1:]), device="cpu", dtype=images.dtype
        )
    noise = noise.reshape(images.shape).to(images.device)
    terms = torch.empty(images.shape[0], dtype=torch.float64, device=x_start.device)
    for lo in range(0, images.shape[0], max_batch):
        sl = slice(lo, lo + max_batch)
        x_t = diffusion.q_sample(images[sl], t[sl], noise=noise[sl])
        out = diffusion.vb_terms_bpd(model, images[sl], x_t, t[sl], clip_denoised=clip_denoised)
        terms[sl] = out["output"].to(torch.float64)
    per_image = (terms * weights).view(n, timesteps_per_image).sum(dim=1)  # [N]
    return per_image + diffusion.prior_bpd(x_start).to(torch.float64)


def nll_per_image(
    diffusion: GaussianDiffusion,
    model: Model,
    batches: Iterable[torch.Tensor],
    *,
    kind: str = "full",
    timesteps_per_image: int = 50,
    seed: int = 0,
    image_seeds: Sequence[int] | None = None,
    clip_denoised: bool = True,
    device: torch.device | str = "cpu",
    timesteps_per_batch: int = 16,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Bits/dim [N] float64 of every image in ``batches`` ([B, C, H, W] in [-1, 1]).

    Noise from one generator seeded with ``seed``, or, with ``image_seeds`` (the global
    index j of each image, in order), image j's from its own generator seeded with
    (seed, j). ``progress(n)`` is called after each batch.
    """
    if kind not in NLL_KINDS:
        raise ValueError(f"kind: got {kind!r}; allowed values: {list(NLL_KINDS)}")
    generator = torch.Generator().manual_seed(seed)
    values: list[np.ndarray] = []
    done = 0
    for batch in batches:
        x = batch.to(device)
        gens = None
        if image_seeds is not None:
            index = image_seeds[done : done + x.shape[0]]
            if len(index) != x.shape[0]:
                raise ValueError(f"image_seeds: {len(image_seeds)} for more images")
            gens = index_generators((seed,), index)
        if kind == "full":
            noise_fn = _noise_from(generator, x) if gens is None else _noise_per_image(gens, x)
            per_image = calc_bpd(
                diffusion,
                model,
                x,
                clip_denoised=clip_denoised,
                noise_fn=noise_fn,
                timesteps_per_batch=timesteps_per_batch,
            ).total_bpd
        else:
            per_image = estimate_bpd(
                diffusion,
                model,
                x,
                timesteps_per_image=timesteps_per_image,
                generator=generator if gens is None else None,
                generators=gens,
                clip_denoised=clip_denoised,
            )
        values.append(per_image.double().cpu().numpy())
        done += x.shape[0]
        if progress is not None:
            progress(x.shape[0])
    return np.concatenate(values) if values else np.zeros(0)


def summarize_nll(
    values: np.ndarray, *, kind: str, num_timesteps: int, timesteps_per_image: int
) -> NLLResult:
    """Mean bits/dim of per-image ``values`` and its standard error std / sqrt(N)."""
    if values.size == 0:
        raise ValueError("batches: no images to evaluate")
    n = values.size
    stderr = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return NLLResult(
        bpd=float(values.mean()),
        stderr=stderr,
        kind=kind,
        num_images=n,
        num_timesteps=num_timesteps,
        terms_per_image=num_timesteps if kind == "full" else timesteps_per_image,
    )


def evaluate_nll(
    diffusion: GaussianDiffusion,
    model: Model,
    batches: Iterable[torch.Tensor],
    *,
    kind: str = "full",
    timesteps_per_image: int = 50,
    seed: int = 0,
    image_seeds: Sequence[int] | None = None,
    clip_denoised: bool = True,
    device: torch.device | str = "cpu",
    timesteps_per_batch: int = 16,
    progress: Callable[[int], None] | None = None,
) -> NLLResult:
    """Bits/dim over every image in ``batches`` ([B, C, H, W] tensors in [-1, 1]).

    ``kind`` is "full" (the paper's number) or "subset" (cheap unbiased estimate with K =
    ``timesteps_per_image`` terms per image). Seeding as :func:`nll_per_image`.
    """
    values = nll_per_image(
        diffusion,
        model,
        batches,
        kind=kind,
        timesteps_per_image=timesteps_per_image,
        seed=seed,
        image_seeds=image_seeds,
        clip_denoised=clip_denoised,
        device=device,
        timesteps_per_batch=timesteps_per_batch,
        progress=progress,
    )
    return summarize_nll(
        values,
        kind=kind,
        num_timesteps=diffusion.num_timesteps,
        timesteps_per_image=timesteps_per_image,
    )


def _noise_from(generator: torch.Generator, like: torch.Tensor) -> NoiseFn:
    def noise_fn(_t: int) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)

    return noise_fn


def _noise_per_image(generators: Sequence[torch.Generator], like: torch.Tensor) -> NoiseFn:
    """Timestep t's noise, row j from ``generators[j]`` (drawn t = T-1, ..., 0)."""

    def noise_fn(_t: int) -> torch.Tensor:
        return draw_per_index(generators, like.shape[1:], device=like.device, dtype=like.dtype)

    return noise_fn
