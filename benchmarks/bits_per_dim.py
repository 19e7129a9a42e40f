"""Full-bound bits/dim: one timestep per forward (the reference loop) against many
timesteps per forward (diffusion.likelihood.calc_bpd), timed in the same run (not a test).

digits-xs UNet (8x8 grayscale), cosine T=1000, 16 held-out digits, fp32, torch threads =
cores. Both compute the same numbers (same noise); the JSON records both timings, the
speed-up, and the largest difference between the two results.

    python benchmarks/bits_per_dim.py [--images 16] [--per-batch 50]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from diffusion.data import load_digits_uint8
from diffusion.gaussian import GaussianDiffusion
from diffusion.images import to_model_range
from diffusion.likelihood import calc_bpd
from diffusion.schedules import get_beta_schedule
from diffusion.unet import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--per-batch", type=int, default=50, help="timesteps per forward")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    default_out = Path(__file__).parent / "results" / "bits_per_dim.json"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_model("digits-xs").eval()
    with torch.no_grad():  # a trained-looking model: perturb the zero-initialised output
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    diffusion = GaussianDiffusion(get_beta_schedule("cosine", 1000), rescale_timesteps=True)
    x0 = to_model_range(load_digits_uint8("test")[0][: args.images])

    start = time.perf_counter()
    loop = diffusion.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(1))
    loop_s = time.perf_counter() - start
    start = time.perf_counter()
    fast = calc_bpd(
        diffusion,
        model,
        x0,
        generator=torch.Generator().manual_seed(1),
        timesteps_per_batch=args.per_batch,
    )
    fast_s = time.perf_counter() - start

    result = {
        "model": "digits-xs",
        "num_timesteps": diffusion.num_timesteps,
        "images": args.images,
        "timesteps_per_batch": args.per_batch,
        "threads": args.threads,
        "loop_seconds": loop_s,
        "batched_seconds": fast_s,
        "speedup": loop_s / fast_s,
        "max_abs_difference_bpd": float((loop.total_bpd - fast.total_bpd).abs().max()),
        "mean_bpd": float(fast.total_bpd.mean()),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"bits/dim, T={diffusion.num_timesteps}, {args.images} images, {args.threads} threads")
    print(f"  one t per forward      {loop_s:.2f} s")
    print(f"  {args.per_batch} t per forward     {fast_s:.2f} s  (x{loop_s / fast_s:.1f})")
    print(f"  max |difference|       {result['max_abs_difference_bpd']:.2e} bits/dim")
    print(f"  wrote {args.out}")


if __name__ == "__main__":
    main()
