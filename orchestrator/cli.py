"""The ``diffscale`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tabulate import tabulate


def _cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator.demo import DemoConfig, run_demo

    config = DemoConfig(
        model=args.model, seconds=args.seconds, seed=args.seed, threads=args.threads
    )
    print(
        f"diffscale demo: training {config.model} on the offline digits for "
        f"{config.seconds:.0f} s (CPU), then evaluating and sampling"
    )
    r = run_demo(config, args.out, progress=not args.no_progress)
    print(
        tabulate(
            [
                ["model", f"{config.model} ({r['params']:,} parameters)"],
                [
                    "training",
                    f"{r['steps']} steps, {r['images_seen']:,} images, "
                    f"{r['images_per_s']:.0f} images/s, {r['training_flops']:.3g} FLOPs",
                ],
                ["bits/dim before", f"{r['bpd_before']:.3f}"],
                ["bits/dim after (EMA)", f"{r['bpd_after']:.3f}"],
                ["bits/dim measured as", r["bpd_kind"]],
                ["samples", f"{r['samples_png']} ({config.sample_steps} strided steps)"],
            ],
            tablefmt="simple",
        )
    )
    if not r["bpd_after"] < r["bpd_before"]:
        print("warning: bits/dim did not fall; train longer (--seconds)", file=sys.stderr)
        return 1
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    import torch

    from diffusion.flops import forward_flops_per_image
    from diffusion.unet import MODEL_LADDER, build_model, count_parameters

    rows = []
    for name, cfg in MODEL_LADDER.items():
        with torch.device("meta"):
            params = count_parameters(build_model(cfg))
        rows.append(
            [
                name,
                cfg.image_size,
                cfg.model_channels,
                cfg.num_res_blocks,
                ",".join(map(str, cfg.channel_mult)),
                f"{params / 1e6:.2f}M",
                f"{forward_flops_per_image(cfg) / 1e9:.2f}",
            ]
        )
    print(
        tabulate(
            rows, headers=["name", "px", "channels", "blocks", "mult", "params", "fwd GFLOP/img"]
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffscale",
        description="Scaling studies of Improved DDPM (Nichol & Dhariwal 2021).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small model on the offline digits (CPU)")
    demo.add_argument("--seconds", type=float, default=120.0, help="training time budget")
    demo.add_argument("--model", default="digits-xs", help="model name from `diffscale models`")
    demo.add_argument("--out", default="outputs/demo", help="output directory")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)

    models = sub.add_parser("models", help="list the model ladder: sizes and FLOPs")
    models.set_defaults(func=_cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
