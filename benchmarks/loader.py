"""ShardLoader throughput against what training consumes (not a test).

Builds a CIFAR-shaped synthetic dataset in a temporary directory: a fake
``cifar-10-python.tar.gz`` (official layout: data_batch_1..5 and test_batch of random uint8
pixels) prepared by the real cifar10 preparer into Parquet shards (10,000 rows each). Then
times ``ShardLoader`` (batch 128, world_size 1, flips on, drop_last) over whole epochs:
images/s delivered as float32 [-1, 1] tensors, with shard reads, sha256 checks, shuffling
and flips included. Random pixels are the worst case for the zstd-compressed shards.

The ratio is against the 64-channel training step's consumption (``images_per_s`` of
benchmarks/results/train_step.json when present); target: at least 20x. Writes JSON
(default benchmarks/results/loader.json).

    python benchmarks/loader.py [--images 20000] [--batch 128] [--epochs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import platform
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffusion.data import ShardLoader, prepare_dataset

RESULTS = Path(__file__).parent / "results"
TARGET_RATIO = 20.0


def fake_cifar_tarball(path: Path, train_images: int, seed: int = 0) -> str:
    """Write a cifar-10-python.tar.gz of random pixels; returns its md5."""
    rng = np.random.default_rng(seed)
    per_batch = train_images // 5
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [
            ("test_batch", 1000)
        ]:
            batch = {
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"labels": rng.integers(0, 10, n).tolist(),
            }
            blob = pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000, help="training images")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=RESULTS / "loader.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="diffscale-loader-") as tmp:
        tarball = Path(tmp) / "cifar-10-python.tar.gz"
        md5 = fake_cifar_tarball(tarball, args.images)
        start = time.perf_counter()
        result = prepare_dataset(
            "cifar10", f"{tmp}/shards", source=str(tarball), md5=md5, shard_size=args.shard_size
        )
        prepare_s = time.perf_counter() - start
        info = result.manifest.splits["train"]
        loader = ShardLoader(
            f"{tmp}/shards", "train", args.batch, rank=0, world_size=1, seed=0, flip=True
        )
        epoch_s, checksum = [], 0.0
        for _ in range(args.epochs):
            start = time.perf_counter()
            for x, _ in loader:
                checksum += float(x[0, 0, 0, 0])  # touch every batch
            epoch_s.append(time.perf_counter() - start)

    images_per_epoch = loader.examples_per_epoch
    images_per_s = images_per_epoch / statistics.median(epoch_s)
    train = RESULTS / "train_step.json"
    train_images_per_s = json.loads(train.read_text())["images_per_s"] if train.exists() else None
    ratio = images_per_s / train_images_per_s if train_images_per_s else None
    out = {
        "dataset": f"synthetic CIFAR-shaped, {info.count} x 3x32x32 uint8 (random pixels)",
        "shards": len(info.shards),
        "shard_size": args.shard_size,
        "shard_mb": sum(s.bytes for s in info.shards) / len(info.shards) / 1e6,
        "prepare_seconds": prepare_s,
        "batch": args.batch,
        "world_size": 1,
        "flip": True,
        "images_per_epoch": images_per_epoch,
        "epoch_seconds_all": epoch_s,
        "images_per_s": images_per_s,
        "train_step_images_per_s": train_images_per_s,
        "ratio_vs_train_step": ratio,
        "target_ratio": TARGET_RATIO,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"prepared {info.count} images in {len(info.shards)} shards in {prepare_s:.1f} s")
    print(f"loader: {images_per_s:,.0f} images/s (batch {args.batch}, flips on, median epoch)")
    if ratio is not None:
        verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
        print(
            f"training step consumes {train_images_per_s:.1f} images/s: ratio {ratio:,.0f}x "
            f"({verdict} the {TARGET_RATIO:.0f}x target)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
