"""Learning curves of candidate demo sizes at equal training compute (not a test).

The demo sweep (`sweeps/demo.yaml`) must show, on a 2-core CPU within 10 minutes, a compute
frontier held by more than one size and IsoFLOP minima inside the sampled sizes. This script
measures what a recipe gives before the sweep is changed: each size trains alone (one
process, one torch thread, no Ray, no MLflow) with the sweep's own step (L_hybrid, cosine,
T=1000, EMA) and is evaluated, at log-spaced training FLOPs, with the trial's held-out
estimate (20 stratified terms per image, 128 test images, the same noise at every point).

    python benchmarks/demo_calibration.py --sizes a,b --batch 32 --lr 2e-3 \
        --budgets 2.5e11,5e11,1e12,2e12,4e12,8e12 --out benchmarks/results/demo_calibration.json

Sizes are the ladder names or ``CH:BLOCKS:MULT:ATTN`` (e.g. ``32:1:1:`` for 32 channels, one
block, multipliers (1,), no attention). Results are appended per recipe to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from diffusion.config import DiffusionConfig
from diffusion.data import get_dataset
from diffusion.flops import forward_flops_per_image, training_flops
from diffusion.images import to_model_range
from diffusion.likelihood import estimate_bpd
from diffusion.timesteps import create_sampler
from diffusion.training import EMA, make_optimizer, train_step
from diffusion.unet import MODEL_LADDER, UNet, UNetConfig, count_parameters


def size_config(spec: str) -> UNetConfig:
    """A ladder name, or ``CH:BLOCKS:MULT:ATTN`` with MULT and ATTN as ``1-2`` lists."""
    if spec in MODEL_LADDER:
        return MODEL_LADDER[spec]
    ch, blocks, mult, attn = spec.split(":")
    return UNetConfig(
        image_size=8,
        in_channels=1,
        model_channels=int(ch),
        num_res_blocks=int(blocks),
        channel_mult=tuple(int(m) for m in mult.split("-")),
        attention_resolutions=tuple(int(a) for a in attn.split("-") if a),
        dropout=0.1,
    )


def curve(spec: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    unet = size_config(spec)
    model = UNet(unet)
    diffusion = DiffusionConfig(
        schedule="cosine", num_timesteps=1000, objective="hybrid", rescale_timesteps=True
    ).build()
    sampler = create_sampler("uniform", diffusion.num_timesteps)
    optimizer = make_optimizer(model.parameters(), lr=args.lr)
    ema = EMA(model, args.ema)
    data = get_dataset("digits")
    train = to_model_range(data.load_split("train"))
    test = to_model_range(data.load_split("test")[: args.eval_images])
    fwd = forward_flops_per_image(unet)
    budgets = sorted(float(b) for b in args.budgets.split(","))
    generator = torch.Generator().manual_seed(args.seed)
    points, images, step, train_s = [], 0, 0, 0.0
    for budget in budgets:
        t0 = time.perf_counter()
        while training_flops(fwd, images) < budget:
            idx = torch.randint(0, len(train), (args.batch,), generator=generator)
            model.train()
            train_step(
                model, diffusion, sampler, optimizer, train[idx], generator=generator, ema=ema
            )
            images += args.batch
            step += 1
        train_s += time.perf_counter() - t0
        ema.module.eval()
        with torch.no_grad():
            bpd = estimate_bpd(
                diffusion,
                ema.module,
                test,
                timesteps_per_image=20,
                generator=torch.Generator().manual_seed(args.seed + 1),
            )
        points.append(
            {
                "budget": budget,
                "flops": training_flops(fwd, images),
                "steps": step,
                "bpd": float(bpd.mean()),
                "stderr": float(bpd.std() / len(bpd) ** 0.5),
                "train_s": round(train_s, 2),
            }
        )
        print(spec, json.dumps(points[-1]), flush=True)
    return {
        "size": spec,
        "params": count_parameters(model),
        "forward_flops_per_image": fwd,
        "ms_per_step": round(1000 * train_s / max(step, 1), 1),
        "points": points,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", required=True, help="comma-separated sizes")
    p.add_argument("--budgets", default="2.5e11,5e11,1e12,2e12,4e12")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.98)
    p.add_argument("--eval-images", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    recipe = {k: getattr(args, k) for k in ("batch", "lr", "ema", "seed")}
    runs = [curve(s, args) for s in args.sizes.split(",")]
    doc = {
        "recipe": recipe,
        "machine": {
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
        },
        "runs": runs,
    }
    if args.out:
        old = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.write_text(json.dumps([*old, doc], indent=1) + "\n")


if __name__ == "__main__":
    main()
