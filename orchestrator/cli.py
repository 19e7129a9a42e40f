"""The ``diffscale`` command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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
            data=args.data, split=args.split, num_images=args.num_images, nll=args.nll,
            nll_timesteps=args.nll_timesteps, num_samples=args.num_samples,
            sample_steps=args.sample_steps, sample_method=args.sample_method,
            features=args.features, k=args.k, batch_size=args.batch_size, seed=args.seed,
            device=args.device,
        )  # fmt: skip
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
    rows = [
        ["NLL (bits/dim)", f"{r['nll_bpd']:.4f} +- {r['nll_stderr']:.4f}", r["nll_kind"]],
        [fd_key, f"{r[fd_key]:.4f}", f"features: {r['features']}, {options.num_samples} "
                                     f"samples, {options.sample_steps} steps"],
        ["precision", f"{r['precision']:.4f}", f"k={options.k}"],
        ["recall", f"{r['recall']:.4f}", f"k={options.k}"],
        ["samples", r["samples_png"], ""],
    ]  # fmt: skip
    print(tabulate(rows, headers=["metric", "value", "how"]))
    print(f"wrote {Path(out) / 'eval.json'}")
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
    from orchestrator.train import run_trial

    print(f"diffscale train: trial {cfg.name!r}, {cfg.resources.num_workers} worker(s), "
          f"storage {cfg.storage.path}, MLflow {cfg.tracking.resolve_uri()}")  # fmt: skip
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


def _print_status(report: dict) -> None:
    rows = []
    for r in report["trials"]:
        m = r["metrics"]
        fd = next((k for k in ("eval/fid", "eval/digits_fd") if k in m), None)
        rows.append([
            r["trial"], r["size"], r["status"], f"{r['step']}/{r['total']}", r["cells"],
            f"{m['eval/nll_bpd']:.4f}" if "eval/nll_bpd" in m else "-",
            f"{m[fd]:.4g}" if fd else "-", (r["mlflow_run"] or "-")[:12],
        ])  # fmt: skip
    print(f"sweep {report['name']}: {report['state']}  (storage {report['storage']})")
    print(tabulate(rows, headers=["trial", "size", "status", "step", "cells", "NLL bpd", "FD",
                                  "MLflow run"]))  # fmt: skip
    for r in report["trials"]:
        if r["status"] == "ERROR" and r["error"]:
            print(f"\n{r['trial']} failed:\n  " + r["error"].strip().splitlines()[-1][:400])


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.grid import dataset_problems, trial_table
    from orchestrator.sweep import SweepError, capacity_problems, prepare, status, submit
    from orchestrator.validation import ConfigError

    try:
        prepared = prepare(args.sweep, args.set, check_data=False)
    except (ConfigError, SweepError) as e:
        print(f"diffscale submit: error: {e}", file=sys.stderr)
        return 2
    spec, plan, store = prepared.spec, prepared.plan, prepared.store
    data_error = ConfigError(dataset_problems(plan.cells), spec.source)
    capacity = ConfigError(capacity_problems(plan), spec.source)
    if not args.dry_run and (data_error.problems or capacity.problems):
        print(f"diffscale submit: error: {data_error if data_error.problems else capacity}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.dry_run or not args.quiet:
        print(f"sweep {spec.name}: {len(plan.cells)} cells, {len(plan.trials)} trials, at most "
              f"{spec.max_concurrent_trials} at once")  # fmt: skip
        print(tabulate(*trial_table(plan)))
        print(plan.saving())
        print(f"storage: {store.uri}\nMLflow:  {spec.tracking_uri} (experiment "
              f"{spec.experiment!r})")  # fmt: skip
    if args.dry_run:
        if prepared.record is not None:
            print(f"(already submitted: `diffscale status {spec.name}`)")
        if capacity.problems:  # a cluster may have what this machine lacks
            print(f"note: without RAY_ADDRESS this machine cannot run it:\n{capacity}")
        if data_error.problems:
            print(f"diffscale submit: error: {data_error}", file=sys.stderr)
            return 2
        return 0
    try:
        result = submit(prepared, retry_errored=args.retry_errored, say=_say)
    except (ConfigError, SweepError) as e:
        print(f"diffscale submit: error: {e}", file=sys.stderr)
        return 2
    _print_status(status(spec.name, storage_path=spec.storage_path.rsplit("/", 1)[0],
                         endpoint_url=store.endpoint_url))  # fmt: skip
    return _exit_code(result)


def _exit_code(result) -> int:
    if result.interrupted:
        print(f"interrupted: `diffscale resume {result.plan.spec.name}` continues it")
        return 130
    return 0 if all(s == "FINISHED" for s in result.statuses.values()) else 1


def _cmd_resume(args: argparse.Namespace) -> int:
    from orchestrator.sweep import SweepError, resume, status
    from orchestrator.validation import ConfigError

    try:
        result = resume(args.name, storage_path=args.storage, endpoint_url=args.endpoint_url,
                        retry_errored=args.retry_errored, say=_say)  # fmt: skip
    except (ConfigError, SweepError) as e:
        print(f"diffscale resume: error: {e}", file=sys.stderr)
        return 2
    _print_status(status(args.name, storage_path=args.storage, endpoint_url=args.endpoint_url))
    return _exit_code(result)


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from orchestrator.sweep import SweepError, status
    from orchestrator.validation import ConfigError

    try:
        report = status(args.name, storage_path=args.storage, endpoint_url=args.endpoint_url)
    except (ConfigError, SweepError) as e:
        print(f"diffscale status: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        _print_status(report)
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from orchestrator.sweep import SweepError, cancel

    try:
        print(cancel(args.name, storage_path=args.storage, endpoint_url=args.endpoint_url,
                     wait_s=args.wait))  # fmt: skip
    except SweepError as e:
        print(f"diffscale cancel: error: {e}", file=sys.stderr)
        return 2
    return 0


def _sweep_location(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the sweep's name (its `name:` key)")
    p.add_argument("--storage", default=None,
                   help="storage.path the sweep was submitted with (default: $DIFFSCALE_STORAGE, "
                   "else ./diffscale_runs)")  # fmt: skip
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint of the storage")


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
    prep.add_argument("name", help="digits, cifar10, imagenet64 or folder")
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
    ev.add_argument("--nll", default="subset", choices=["full", "subset"])
    ev.add_argument("--nll-timesteps", type=int, default=50, help="subset: terms per image")
    ev.add_argument("--num-samples", type=int, default=256, help="samples for FD, P/R")
    ev.add_argument("--sample-steps", default="100", help="strided steps: '100', 'ddim50'")
    ev.add_argument("--sample-method", default="ancestral", choices=["ancestral", "ddim"])
    ev.add_argument(
        "--features",
        choices=["digits", "inception"],
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

    sb = sub.add_parser(
        "submit",
        help="run a sweep YAML (model size x compute grid) on Ray Tune",
        description="Validate and expand a sweep YAML, then run every trial with Ray Tune "
        "(the local Ray, or the cluster in RAY_ADDRESS). Submitting a sweep that already "
        "exists continues it: finished trials are not trained again.",
    )
    sb.add_argument("sweep", help="sweep YAML, e.g. sweeps/demo.yaml")
    sb.add_argument("--dry-run", action="store_true", help="print the trial table; start nothing")
    sb.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override: train.lr=3e-4, max_concurrent_trials=1, "
                    "grid.budget.steps=[100,200] (repeatable)")  # fmt: skip
    sb.add_argument("--retry-errored", action="store_true", help="retry trials that failed")
    sb.add_argument("--quiet", action="store_true", help="no trial table before running")
    sb.set_defaults(func=_cmd_submit)

    rs = sub.add_parser("resume", help="continue an interrupted sweep")
    _sweep_location(rs)
    rs.add_argument("--retry-errored", action="store_true", help="retry trials that failed")
    rs.set_defaults(func=_cmd_resume)

    st = sub.add_parser("status", help="per-trial state, progress and latest metrics")
    _sweep_location(st)
    st.add_argument("--json", action="store_true", help="print one JSON document")
    st.set_defaults(func=_cmd_status)

    cn = sub.add_parser("cancel", help="stop a running sweep (checkpoints are kept)")
    _sweep_location(cn)
    cn.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the stop")
    cn.set_defaults(func=_cmd_cancel)
    from orchestrator.analysis.commands import add_parsers as _add_analysis

    _add_analysis(sub)
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
