"""Host syncs per training step of the trial's worker loop (not a test; run by gpu.sh).

Builds one rank's :class:`~orchestrator.trial.loop.Worker` exactly as a trial does (digits,
the `digits-xs` UNet unless ``--model``), then runs the loop's per-step work — the next
batch from the prefetching loader and ``train_one_step`` (the step, the log window, the
non-finite watch) — under ``torch.cuda.set_sync_debug_mode("warn")``, counting every
synchronizing CUDA call and where in Python it was made; the log point's reads
(``stop_if_non_finite`` and the window's metrics) are counted apart. Goal: 0 per step.

On the CPU there is nothing to count (the debug mode is CUDA's): the steps run and the
JSON says so, which is how this script is checked on a machine without a GPU.

    python benchmarks/host_syncs.py --device cuda [--bf16] [--steps 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

from diffusion.data import prepare_dataset
from orchestrator.config import TrialConfig
from orchestrator.trial.loop import build_worker, stop_if_non_finite, train_one_step


class SyncCounter:
    """Counts CUDA's "synchronizing operation" warnings and the Python lines raising them."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.count = 0
        self.where: collections.Counter[str] = collections.Counter()

    def __enter__(self) -> SyncCounter:
        self._warnings = warnings.catch_warnings(record=True)
        self._records = self._warnings.__enter__()
        warnings.simplefilter("always")
        if self.enabled:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(*exc)
        for w in self._records:
            if "synchroniz" in str(w.message):
                self.count += 1
                self.where[f"{w.filename}:{w.lineno}"] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="digits-xs")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="counted steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)

    data = Path(tempfile.mkdtemp(prefix="diffscale-syncs-")) / "digits"
    prepare_dataset("digits", str(data))
    total = args.warmup + args.steps
    cfg = TrialConfig.from_dict(
        {
            "name": "host-syncs",
            "model": {"name": args.model},
            "train": {
                "batch_size": args.batch,
                "log_every": total,  # the counted steps hold no log point
                "bf16": args.bf16,
                "channels_last": args.channels_last,
            },
            "budget": {"steps": total},
        }
    )
    w = build_worker(
        cfg, rank=0, world_size=1, device=device, data_uri=str(data), data_endpoint=None
    )
    batches = w.loader.batches()
    for _ in range(args.warmup):  # first steps allocate, pick kernels, start the thread
        train_one_step(w, next(batches)[0])
    with SyncCounter(device) as steps:
        start = time.perf_counter()
        for _ in range(args.steps):
            x, _ = next(batches)
            terms = train_one_step(w, x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    with SyncCounter(device) as log_point:
        stop_if_non_finite(w)
        metrics = w.window.metrics("mse" in terms, "vb" in terms)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model,
        "batch": args.batch,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "counted_steps": args.steps,
        "counting": steps.enabled,
        "syncs_per_step": steps.count / args.steps if steps.enabled else None,
        "sync_sites": dict(steps.where.most_common(10)),
        "syncs_at_a_log_point": log_point.count if log_point.enabled else None,
        "log_point_sites": dict(log_point.where.most_common(10)),
        "steps_per_s": args.steps / seconds,
        "train_loss": metrics["train/loss"],
        "note": None if steps.enabled else "CPU: set_sync_debug_mode is CUDA's; steps ran only",
    }
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
