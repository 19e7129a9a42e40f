"""Training-step throughput of the paper's UNet on this machine (not a test).

Configuration (fixed, so numbers compare across commits and with the reference): 32x32
RGB, 64 channels, 2 residual blocks, multipliers (1,2,2,2), attention at 16 and 8,
learned sigmas, dropout 0.1; cosine schedule T=4000, L_hybrid, uniform timestep sampler,
AdamW (lr 1e-4), EMA 0.9999; batch 16, fp32; torch threads = cores.

Prints images/s, achieved FLOP/s (3 x forward FLOPs x images/s, forward FLOPs measured by
diffusion.flops) and this machine's fp32 matmul FLOP/s measured in the same run, and writes
JSON (default benchmarks/results/train_step.json). Same-machine anchor: the reference
implementation (openai/improved-diffusion) runs this configuration at 16.3 images/s on the
2-core development machine (2 threads, fp32).

    python benchmarks/train_step.py [--steps 12] [--warmup 3] [--bf16] [--channels-last]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusion.flops import forward_flops_per_image

from diffusion.gaussian import GaussianDiffusion
from diffusion.schedules import get_beta_schedule
from diffusion.timesteps import UniformSampler
from diffusion.training import EMA, train_step
from diffusion.unet import build_model, count_parameters, get_model_config

REFERENCE_IMAGES_PER_S = 16.3  # openai/improved-diffusion, same config, 2 threads, this machine
BATCH = 16


def matmul_flops_per_s(n: int = 2048, repeats: int = 10) -> float:
    """Best-of fp32 [n, n] @ [n, n] throughput: the machine's practical fp32 peak here."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def time_steps(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    config = get_model_config("cifar10-w64-b2", dropout=0.1)
    model = build_model(config)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    diffusion = GaussianDiffusion(
        get_beta_schedule("cosine", 4000),
        mean_type="eps",
        var_type="learned_range",
        objective="hybrid",
        rescale_timesteps=True,
    )
    sampler = UniformSampler(diffusion.num_timesteps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ema = EMA(model, 0.9999)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 3, 32, 32, generator=generator) * 2 - 1
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if args.bf16 else None
    model.train()
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        train_step(
            model,
            diffusion,
            sampler,
            optimizer,
            x,
            generator=generator,
            ema=ema,
            autocast_dtype=dtype,
        )
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    fwd = forward_flops_per_image(config)
    median = statistics.median(times)
    images_per_s = BATCH / median
    return {
        "model": "cifar10-w64-b2 (32px, 64ch, 2 blocks, dropout 0.1)",
        "params": count_parameters(model),
        "forward_flops_per_image": fwd,
        "batch": BATCH,
        "dtype": "bf16-autocast" if args.bf16 else "fp32",
        "channels_last": args.channels_last,
        "steps_timed": args.steps,
        "step_seconds_median": median,
        "step_seconds_all": times,
        "images_per_s": images_per_s,
        "achieved_flops_per_s": 3 * fwd * images_per_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast instead of fp32")
    parser.add_argument("--channels-last", action="store_true")
    default_out = Path(__file__).parent / "results" / "train_step.json"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    peak = matmul_flops_per_s()
    result = time_steps(args)
    result.update(
        threads=args.threads,
        matmul_fp32_flops_per_s=peak,
        utilisation_of_matmul_peak=result["achieved_flops_per_s"] / peak,
        reference_images_per_s=REFERENCE_IMAGES_PER_S,
        speedup_vs_reference=result["images_per_s"] / REFERENCE_IMAGES_PER_S,
        torch=torch.__version__,
        cpu=platform.processor() or platform.machine(),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"training step, {result['dtype']}, batch {BATCH}, {args.threads} threads")
    print(
        f"  images/s          {result['images_per_s']:.2f}  "
        f"(reference {REFERENCE_IMAGES_PER_S}: x{result['speedup_vs_reference']:.2f})"
    )
    print(f"  achieved FLOP/s   {result['achieved_flops_per_s'] / 1e9:.1f} G")
    print(
        f"  matmul fp32 peak  {peak / 1e9:.1f} G  "
        f"(utilisation {result['utilisation_of_matmul_peak']:.0%})"
    )
    print(f"  wrote {args.out}")


if __name__ == "__main__":
    main()
