"""Training-step throughput of the paper's UNet on this machine (not a test).

Configuration (fixed, so numbers compare across commits and with the reference): by default
the `cifar10-w64-b2` UNet (32x32 RGB, 64 channels, 2 residual blocks, multipliers
(1,2,2,2), attention at 16 and 8), learned sigmas, dropout 0.1; cosine schedule T=4000,
L_hybrid, uniform timestep sampler, AdamW (lr 1e-4), EMA 0.9999; batch 16; torch threads =
cores. ``--model`` and ``--batch`` change the UNet and the batch (the GPU script times
`imagenet64-w64` at batch 32).

Variants, all timed in the same run, in interleaved rounds so machine noise hits each alike:
``fp32``, ``bf16`` (autocast), ``channels_last`` and ``bf16+channels_last``; and, with
``--reference DIR`` (a checkout of openai/improved-diffusion, its ``improved_diffusion``
package; never part of this repository), the very same step written with the reference's
own model, diffusion, uniform sampler and EMA update (fp32, CPU). Every variant reports
images/s, achieved FLOP/s (3 x forward FLOPs x images/s, forward FLOPs measured by
diffusion.flops) and its ratio to our fp32 step and to the reference. The machine's fp32
and bf16 matmul FLOP/s are measured in the same run, and ``torch.backends.cpu.
get_cpu_capability()`` and the CPU's bf16 flags are recorded.

``--profile`` adds a torch.profiler table of one fp32 and one bf16 step: where the time
goes, by operator and by kind (convolution, matmul, normalisation, elementwise, casts,
optimizer), to see what holds the bf16 step back.

    python benchmarks/train_step.py [--steps 12] [--rounds 3] [--reference DIR] [--profile]
        [--variants fp32,bf16,channels_last,bf16+channels_last] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffusion.flops import forward_flops_per_image
from diffusion.gaussian import GaussianDiffusion
from diffusion.schedules import get_beta_schedule
from diffusion.timesteps import UniformSampler
from diffusion.training import EMA, make_optimizer, train_step
from diffusion.unet import build_model, count_parameters, get_model_config

VARIANTS = ("fp32", "bf16", "channels_last", "bf16+channels_last")
DEFAULT_MODEL = "cifar10-w64-b2"
DEFAULT_BATCH = 16
RESULTS = Path(__file__).parent / "results"


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10):
    """Best-of [n, n] @ [n, n] throughput in ``dtype``: the practical matmul peak here."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def ours(variant: str, model_name: str, batch: int, device: torch.device):
    """This library's step for one variant; returns (step function, config, model)."""
    torch.manual_seed(0)
    config = get_model_config(model_name, dropout=0.1)
    model = build_model(config).to(device)
    channels_last = "channels_last" in variant
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    diffusion = GaussianDiffusion(
        get_beta_schedule("cosine", 4000),
        mean_type="eps",
        var_type="learned_range",
        objective="hybrid",
        rescale_timesteps=True,
    )
    sampler = UniformSampler(diffusion.num_timesteps)
    optimizer = make_optimizer(model.parameters(), lr=1e-4)
    ema = EMA(model, 0.9999)
    generator = torch.Generator(device=device).manual_seed(0)  # on a GPU: draws stay there
    shape = (batch, config.in_channels, config.image_size, config.image_size)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if variant.startswith("bf16") else None
    model.train()

    def step() -> None:
        train_step(
            model,
            diffusion,
            sampler,
            optimizer,
            x,
            generator=generator,
            ema=ema,
            autocast_dtype=dtype,
            check_finite=False,  # as trials run: no host sync inside the step
        )

    return step, config, model


def reference(path: Path, batch: int):
    """The same step written against the reference package found under ``path``."""
    sys.path.insert(0, str(path))
    from improved_diffusion.nn import update_ema
    from improved_diffusion.resample import UniformSampler as RefUniformSampler
    from improved_diffusion.script_util import (
        create_model_and_diffusion,
        model_and_diffusion_defaults,
    )

    torch.manual_seed(0)
    options = model_and_diffusion_defaults()
    options.update(
        image_size=32,
        num_channels=64,
        num_res_blocks=2,
        learn_sigma=True,
        attention_resolutions="16,8",
        dropout=0.1,
        diffusion_steps=4000,
        noise_schedule="cosine",
        use_kl=False,
        rescale_learned_sigmas=True,
        rescale_timesteps=True,
    )
    model, diffusion = create_model_and_diffusion(**options)
    sampler = RefUniformSampler(diffusion)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ema_params = [p.detach().clone() for p in model.parameters()]
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model.train()

    def step() -> None:
        t, weights = sampler.sample(batch, "cpu")
        losses = diffusion.training_losses(model, x, t)
        loss = (losses["loss"] * weights).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_ema(ema_params, model.parameters(), rate=0.9999)

    return step, sum(p.numel() for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], n: int, device: torch.device) -> list[float]:
    """Seconds per step; on a GPU each step is waited for (a queue would hide its time)."""
    times = []
    for _ in range(n):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


OP_KINDS = (  # (kind, substrings of an operator name), first match wins
    ("convolution", ("conv", "mkldnn_convolution")),
    ("matmul", ("mm", "matmul", "linear", "addmm", "bmm", "baddbmm")),
    ("normalisation", ("group_norm", "native_group_norm", "layer_norm")),
    ("cast/copy", ("copy_", "to_copy", "_to_copy", "contiguous", "clone")),
    ("optimizer/ema", ("adam", "foreach", "_fused")),
    ("attention softmax", ("softmax",)),
)


def op_kind(name: str) -> str:
    lowered = name.lower()
    for kind, keys in OP_KINDS:
        if any(k in lowered for k in keys):
            return kind
    return "elementwise/other"


def profile(step: Callable[[], None], top: int = 15) -> dict:
    """One profiled step: self CPU time by operator (top ``top``) and by kind."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()  # warm
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    kinds: dict[str, float] = {}
    for e in events:
        kinds[op_kind(e.key)] = kinds.get(op_kind(e.key), 0.0) + e.self_cpu_time_total
    return {
        "self_cpu_seconds": total / 1e6,
        "by_kind": {k: v / total for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_ops": [
            {
                "op": e.key,
                "calls": e.count,
                "self_seconds": e.self_cpu_time_total / 1e6,
                "share": e.self_cpu_time_total / total,
            }
            for e in events[:top]
        ],
    }


def cpu_flags() -> dict:
    """The ISA that torch dispatches to, and the CPU's bf16 / AMX flags."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "mkldnn_bf16_supported": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="checkout of openai/improved-diffusion to time in the same run",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--profile", action="store_true", help="per-op profile, fp32 and bf16")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_step.json")
    args = parser.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or not args.variants:
        parser.error(f"--variants: unknown {unknown}; allowed: {list(VARIANTS)}")
    if args.reference is not None and (
        args.model != DEFAULT_MODEL or args.device != "cpu" or args.batch != DEFAULT_BATCH
    ):
        parser.error(f"--reference: only with the default --model {DEFAULT_MODEL}, batch 16, cpu")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = 8192 if device.type == "cuda" else 2048
    peaks = {
        "fp32": matmul_flops_per_s(device, torch.float32, n),
        "bf16": matmul_flops_per_s(device, torch.bfloat16, n),
    }
    steps: dict[str, Callable[[], None]] = {}
    for variant in args.variants:
        steps[variant], config, model = ours(variant, args.model, args.batch, device)
    if args.reference is not None:
        steps["reference"], ref_params = reference(args.reference, args.batch)
        if ref_params != count_parameters(model):
            raise SystemExit(
                f"reference model has {ref_params} parameters, ours "
                f"{count_parameters(model)}: not the same configuration"
            )
    for step in steps.values():
        timed(step, args.warmup, device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    per_round = max(1, args.steps // args.rounds)
    for _ in range(args.rounds):  # interleaved, so drift and noise hit every variant alike
        for name, step in steps.items():
            times[name] += timed(step, per_round, device)

    fwd = forward_flops_per_image(config)
    rate = {name: args.batch / statistics.median(ts) for name, ts in times.items()}
    best = {name: args.batch / min(ts) for name, ts in times.items()}  # robust on a shared box
    base = rate.get("fp32")
    variants = {}
    for name, ts in times.items():
        achieved = 3 * fwd * rate[name]
        peak = peaks["bf16" if name.startswith("bf16") else "fp32"]
        variants[name] = {
            "step_seconds_median": statistics.median(ts),
            "step_seconds_all": ts,
            "images_per_s": rate[name],
            "achieved_flops_per_s": achieved,
            "utilisation_of_matmul_peak": achieved / peak,  # of its own dtype's peak
            "utilisation_of_bf16_matmul_peak": achieved / peaks["bf16"],
            "ratio_vs_fp32": rate[name] / base if base else None,
            "ratio_vs_reference": rate[name] / rate["reference"] if "reference" in rate else None,
            "images_per_s_best": best[name],
            "ratio_vs_fp32_best": best[name] / best["fp32"] if "fp32" in best else None,
            "ratio_vs_reference_best": (
                best[name] / best["reference"] if "reference" in best else None
            ),
        }
    result = {
        "model": f"{args.model}, dropout 0.1, L_hybrid, cosine T=4000, uniform t, AdamW, EMA",
        "params": count_parameters(model),
        "forward_flops_per_image": fwd,
        "batch": args.batch,
        "device": _device_name(device),
        "threads": args.threads,
        **cpu_flags(),
        "matmul_flops_per_s": peaks,
        "matmul_size": n,
        "rounds": args.rounds,
        "variants": variants,
        # the fastest of our variants, at the top level for benchmarks/loader.py's ratio
        "images_per_s": max(v for k, v in rate.items() if k != "reference"),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if args.profile and device.type == "cpu":
        result["profile"] = {
            name: profile(steps[name]) for name in ("fp32", "bf16") if name in steps
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"training step, {args.model}, batch {args.batch}, {result['device']}, "
        f"{args.threads} threads, capability {result['cpu_capability']}, "
        f"avx512_bf16 {result['avx512_bf16']}, amx_bf16 {result['amx_bf16']}"
    )
    print(
        f"  matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} G, bf16 {peaks['bf16'] / 1e9:.1f} G FLOP/s"
    )
    print("  median step (and best step) of each variant:")
    print(f"  {'variant':<20} {'images/s':>15} {'GFLOP/s':>9} {'vs fp32':>13} {'vs ref':>13}")

    def pair(a: float | None, b: float | None) -> str:
        return f"{a:.2f} ({b:.2f})" if a else "-"

    for name, v in variants.items():
        print(
            f"  {name:<20} {pair(v['images_per_s'], v['images_per_s_best']):>15} "
            f"{v['achieved_flops_per_s'] / 1e9:>9.1f} "
            f"{pair(v['ratio_vs_fp32'], v['ratio_vs_fp32_best']):>13} "
            f"{pair(v['ratio_vs_reference'], v['ratio_vs_reference_best']):>13}"
        )
    for name, prof in result.get("profile", {}).items():
        kinds = ", ".join(f"{k} {share:.0%}" for k, share in prof["by_kind"].items())
        print(f"  profile {name}: {prof['self_cpu_seconds']:.2f} s self CPU: {kinds}")
    print(f"  wrote {args.out}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
