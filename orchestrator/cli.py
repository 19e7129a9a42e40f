"""The ``diffscale`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tabulate import tabulate

from diffusion.data.registry import DATASETS
from diffusion.likelihood import NLL_KINDS
from diffusion.metrics.registry import FEATURE_EXTRACTORS
from diffusion.sampling import SAMPLING_METHODS
from orchestrator.analysis.commands import add_parsers as add_analysis_parsers
from orchestrator.names import EVAL_RESULT_FILE
from orchestrator.sweep.commands import add_parsers as add_sweep_parsers


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


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from diffusion.data.prepare import prepare_dataset

    options = {
        key: value
        for key, value in [
            ("source", args.source),
            ("size", args.size),
            ("md5", args.md5),
            ("split", args.split),
        ]
        if value is not None
    }
    try:
        result = prepare_dataset(
            args.name,
            args.out,
            shard_size=args.shard_size,
            endpoint_url=args.endpoint_url,
            force=args.force,
            **options,
        )
    except (ValueError, OSError) as e:
        print(f"diffscale data prepare: error: {e}", file=sys.stderr)
        return 2
    manifest = result.manifest
    state = "written" if result.written else "already complete, nothing written"
    print(f"{manifest.dataset} -> {result.uri} ({state})")
    rows = [
        [
            split,
            f"{info.count:,}",
            "x".join(map(str, info.shape)),
            len(info.shards),
            f"{sum(s.bytes for s in info.shards) / 1e6:.2f}",
        ]
        for split, info in manifest.splits.items()
    ]
    print(tabulate(rows, headers=["split", "images", "shape", "shards", "MB"]))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from orchestrator.evaluate import EvalOptions, evaluate_checkpoint

    try:
        options = EvalOptions(
            data=args.data,
            split=args.split,
            num_images=args.num_images,
            nll=args.nll,
            nll_timesteps=args.nll_timesteps,
            num_samples=args.num_samples,
            sample_steps=args.sample_steps,
            sample_method=args.sample_method,
            features=args.features,
            k=args.k,
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device,
        )
    except ValueError as e:
        print(f"diffscale eval: error: {e}", file=sys.stderr)
        return 2
    out = args.out or str(Path(args.checkpoint) / "eval")
    say = None if args.json else (lambda msg: print(f"  {msg} ...", file=sys.stderr))
    try:
        r = evaluate_checkpoint(args.checkpoint, options, out, progress=say)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"diffscale eval: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    fd_key = "fid" if "fid" in r else next(k for k in r if k.endswith("_fd"))
    fd_how = (
        f"features: {r['features']}, {options.num_samples} samples, {options.sample_steps} steps"
    )
    rows = [
        ["NLL (bits/dim)", f"{r['nll_bpd']:.4f} +- {r['nll_stderr']:.4f}", r["nll_kind"]],
        [fd_key, f"{r[fd_key]:.4f}", fd_how],
        ["precision", f"{r['precision']:.4f}", f"k={options.k}"],
        ["recall", f"{r['recall']:.4f}", f"k={options.k}"],
        ["samples", r["samples_png"], ""],
    ]
    print(tabulate(rows, headers=["metric", "value", "how"]))
    print(f"wrote {Path(out) / EVAL_RESULT_FILE}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.config import ConfigError, TrialConfig

    try:
        cfg = TrialConfig.from_yaml(args.config)
        if args.set:
            cfg = cfg.with_overrides(args.set)
    except (ConfigError, OSError) as e:
        print(f"diffscale train: error: {e}", file=sys.stderr)
        return 2
    from orchestrator.trial import run_trial

    print(
        f"diffscale train: trial {cfg.name!r}, {cfg.resources.num_workers} worker(s), "
        f"storage {cfg.storage.path}, MLflow {cfg.tracking.resolve_uri()}"
    )
    import ray.train

    try:
        result = run_trial(cfg)
    except ray.train.TrainingFailedError as e:
        print(f"diffscale train: trial {cfg.name!r} failed: {e}", file=sys.stderr)
        return 1
    metrics = {k: v for k, v in (result.metrics or {}).items() if "/" in k}
    print(tabulate(sorted(metrics.items()), headers=["metric", "final value"]))
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else '-'}")
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

    data = sub.add_parser("data", help="datasets as Parquet shards (local or s3://)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser(
        "prepare",
        help="convert a dataset to Parquet shards",
        description="Convert a dataset to Parquet shards plus a manifest, locally or on S3. "
        "Re-running to the same --out skips an identical complete dataset.",
    )
    *others, last = DATASETS
    prep.add_argument("name", help=f"{', '.join(others)} or {last}")
    prep.add_argument("--out", required=True, help="output: a directory or s3://bucket/prefix")
    prep.add_argument(
        "--source",
        help="cifar10: cifar-10-python.tar.gz path or URL; imagenet64: directory of npz "
        "batches; folder: directory of PNG/JPEG images",
    )
    prep.add_argument("--size", type=int, help="folder: output image size in pixels")
    prep.add_argument("--md5", help="cifar10: expected tarball md5 (default: the official one)")
    prep.add_argument("--split", help="folder: split name (default: train)")
    prep.add_argument("--shard-size", type=int, default=10_000, help="rows per shard")
    prep.add_argument(
        "--endpoint-url", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL, else AWS)"
    )
    prep.add_argument("--force", action="store_true", help="rewrite even an identical dataset")
    prep.set_defaults(func=_cmd_data_prepare)

    ev = sub.add_parser(
        "eval",
        help="NLL, FID (or digits FD), precision/recall and samples of a checkpoint",
        description="Evaluate a checkpoint's EMA model: NLL in bits/dim (full bound or an "
        "unbiased subset estimate), Frechet distance and improved precision/recall of "
        "strided samples, and a sample grid PNG.",
    )
    ev.add_argument("checkpoint", help="checkpoint directory (e.g. outputs/demo/checkpoint)")
    ev.add_argument("--data", default="digits", help="'digits' or a prepared dataset URI")
    ev.add_argument("--split", default="test", help="split of the real images")
    ev.add_argument("--num-images", type=int, default=256, help="real images (NLL, stats)")
    ev.add_argument("--nll", default="subset", choices=list(NLL_KINDS))
    ev.add_argument("--nll-timesteps", type=int, default=50, help="subset: terms per image")
    ev.add_argument("--num-samples", type=int, default=256, help="samples for FD, P/R")
    ev.add_argument("--sample-steps", default="100", help="strided steps: '100', 'ddim50'")
    ev.add_argument("--sample-method", default="ancestral", choices=list(SAMPLING_METHODS))
    ev.add_argument(
        "--features",
        choices=sorted(FEATURE_EXTRACTORS),
        default=None,
        help="feature network (default: digits for digits, else inception)",
    )
    ev.add_argument("--k", type=int, default=3, help="k of precision/recall")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--out", default=None, help="output directory (default: CHECKPOINT/eval)")
    ev.add_argument("--json", action="store_true", help="print one JSON document")
    ev.set_defaults(func=_cmd_eval)

    tr = sub.add_parser(
        "train",
        help="train one trial on Ray (resumes if the trial already has checkpoints)",
        description="Train one trial (a trial YAML) with Ray Train on the local Ray or the "
        "cluster in RAY_ADDRESS. Re-running the same trial name with the same storage "
        "continues from its newest checkpoint and the same MLflow run.",
    )
    tr.add_argument("config", help="trial YAML, e.g. sweeps/trial_digits.yaml")
    tr.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)",
    )
    tr.set_defaults(func=_cmd_train)

    add_sweep_parsers(sub)
    add_analysis_parsers(sub)
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
