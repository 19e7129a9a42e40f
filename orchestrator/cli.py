"""The ``diffscale`` command.

Building the parser stays light (tests/test_cli_imports.py): every subcommand module imports
torch, Ray, MLflow, scipy, matplotlib, pyarrow and pandas inside its handlers, so that
``diffscale status`` and ``--help`` answer in about a second.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from tabulate import tabulate

from orchestrator.analysis.commands import add_parsers as add_analysis_parsers
from orchestrator.analysis.optimal import add_parser as add_isoflop_parser
from orchestrator.analysis.paper_command import add_paper_parser
from orchestrator.analysis.summary import add_parser as add_summary_parser
from orchestrator.choices import DATASET_NAMES, FEATURE_EXTRACTOR_NAMES, NLL_KINDS, SAMPLING_METHODS
from orchestrator.names import EVAL_RESULT_FILE
from orchestrator.progress import Ticker
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

    from orchestrator.evaluate import (
        EvalOptions,
        evaluate_checkpoint,
        evaluate_on_workers,
        torch_threads,
    )

    for flag, value in (("--workers", args.workers), ("--threads", args.threads)):
        if value is not None and value < 1:
            print(f"diffscale eval: error: {flag}: must be >= 1, got {value}", file=sys.stderr)
            return 2
    try:
        checkpoint, data, split = _eval_target(args)
    except ValueError as e:
        print(f"diffscale eval: error: {e}", file=sys.stderr)
        return 2
    try:
        options = EvalOptions(
            data=data,
            split=split,
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
            device="cuda" if args.gpu else args.device,
            sampling=tuple(args.sampling),
        )
    except ValueError as e:
        print(f"diffscale eval: error: {e}", file=sys.stderr)
        return 2
    out = args.out or str(Path(checkpoint) / "eval")
    ticker = None if args.json else Ticker()
    try:
        with ticker or contextlib.nullcontext():
            if args.workers > 1:  # Ray Train workers, each evaluating its share
                r = evaluate_on_workers(
                    checkpoint,
                    options,
                    out,
                    workers=args.workers,
                    use_gpu=args.gpu,
                    cpus_per_worker=args.threads,
                )
            else:
                with torch_threads(args.threads):
                    r = evaluate_checkpoint(
                        checkpoint,
                        options,
                        out,
                        progress=ticker.stage if ticker else None,
                        count=ticker.count if ticker else None,
                    )
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
        *[[name, f"{fd:.4f}", "sampling study"] for name, fd in r["sampling"].items()],
        ["samples", r["samples_png"], ""],
    ]
    print(tabulate(rows, headers=["metric", "value", "how"]))
    print(f"wrote {Path(out) / EVAL_RESULT_FILE}")
    return 0


def _eval_target(args: argparse.Namespace) -> tuple[str, str, str]:
    """(checkpoint directory, dataset, split) of ``diffscale eval``: a path, or with ``--cell`` the
    checkpoint a sweep's trial wrote at that cell's step."""
    if args.cell is None:
        if not Path(args.checkpoint).exists():
            hint = "a checkpoint directory (e.g. outputs/demo/checkpoint)"
            if _sweep_exists(args.checkpoint, args.storage):
                hint = f"a cell: `diffscale eval {args.checkpoint} --cell c00`"
            raise ValueError(f"{args.checkpoint} does not exist; give {hint}")
        return args.checkpoint, args.data or "digits", args.split or "test"
    from orchestrator.sweep.store import SweepError, cell_checkpoint, store_for

    try:
        trial, step, uri, config = cell_checkpoint(
            store_for(args.checkpoint, args.storage), args.cell
        )
    except SweepError as e:
        raise ValueError(str(e)) from None
    if "://" in uri or not Path(uri).is_dir():
        raise ValueError(
            f"cell {args.cell}: trial {trial}'s checkpoint at step {step} ({uri}) is not a "
            "local directory: has the trial reached that step? (`diffscale status "
            f"{args.checkpoint}`)"
        )
    print(f"cell {args.cell}: trial {trial}, step {step}: {uri}", file=sys.stderr)
    return uri, args.data or config["data"]["dataset"], args.split or config["data"]["eval_split"]


def _sweep_exists(name: str, storage_path: str | None) -> bool:
    from orchestrator.names import SWEEP_RECORD
    from orchestrator.sweep.store import store_for

    try:
        return "/" not in name and store_for(name, storage_path).exists(SWEEP_RECORD)
    except (OSError, ValueError):
        return False


def _cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.config import ConfigError, TrialConfig

    try:
        cfg = TrialConfig.from_yaml(args.config)
        if args.set:
            cfg = cfg.with_overrides(args.set)
    except ConfigError as e:
        print(f"diffscale train: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        what = "does not exist" if isinstance(e, FileNotFoundError) else f"cannot be read ({e})"
        print(
            f"diffscale train: error: {args.config} {what}; give a trial YAML "
            "(e.g. sweeps/trial_digits.yaml)",
            file=sys.stderr,
        )
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


class _Parser(argparse.ArgumentParser):
    """argparse with a suggestion for a mistyped choice: ``sumbit`` -> ``submit``."""

    def error(self, message: str) -> NoReturn:
        import difflib
        import re

        found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if found:
            choices = re.findall(r"'([^']*)'", found[2])
            close = difflib.get_close_matches(found[1], choices, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            message = f"unknown choice {found[1]!r}: {hint}(one of: {', '.join(choices)})"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    *others, last = DATASET_NAMES
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
    ev.add_argument(
        "checkpoint",
        help="checkpoint directory (e.g. outputs/demo/checkpoint), or a sweep name with --cell",
    )
    ev.add_argument("--cell", help="with a sweep name: the grid cell's checkpoint (e.g. c01)")
    ev.add_argument(
        "--storage", help="with --cell: the sweep's storage.path (default ./diffscale_runs)"
    )
    ev.add_argument(
        "--data",
        default=None,
        help="'digits' or a prepared dataset URI (default: the cell's dataset, else digits)",
    )
    ev.add_argument(
        "--split", default=None, help="split of the real images (default: the cell's, else test)"
    )
    ev.add_argument("--num-images", type=int, default=256, help="real images (NLL, stats)")
    ev.add_argument("--nll", default="subset", choices=list(NLL_KINDS))
    ev.add_argument("--nll-timesteps", type=int, default=50, help="subset: terms per image")
    ev.add_argument("--num-samples", type=int, default=256, help="samples for FD, P/R")
    ev.add_argument("--sample-steps", default="100", help="strided steps: '100', 'ddim50'")
    ev.add_argument("--sample-method", default="ancestral", choices=list(SAMPLING_METHODS))
    ev.add_argument(
        "--features",
        choices=list(FEATURE_EXTRACTOR_NAMES),
        default=None,
        help="feature network (default: digits for digits, else inception)",
    )
    ev.add_argument("--k", type=int, default=3, help="k of precision/recall")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="cpu")
    ev.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Ray Train workers sharing the evaluation (1: this process, no Ray)",
    )
    ev.add_argument("--gpu", action="store_true", help="one GPU per worker (device cuda)")
    ev.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default: all cores / workers); CPU results are "
        "bit-identical for any --workers at the same --threads",
    )
    ev.add_argument(
        "--sampling",
        nargs="+",
        default=[],
        metavar="SAMPLER",
        help="the sampling-steps study: FD of each sampler ('100', 'ddim50', '100@fixed_large')",
    )
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
    add_isoflop_parser(sub)
    add_summary_parser(sub)
    add_paper_parser(sub)
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
