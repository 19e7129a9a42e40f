"""A directory tree of PNG/JPEG images as a dataset: each image is EXIF-rotated, converted to
RGB, centre-cropped to a square and resized to ``size`` x ``size`` with PIL's Lanczos filter
(high-quality downsampling).

Labels: if the root holds no images itself and its images sit in sub-directories, each
top-level sub-directory is a class (label = its index in sorted name order; images anywhere
below it belong to it; the names are kept as the manifest's ``classes``). Otherwise every
image gets label 0. Everything goes into one split (``split``, default "train"), in an order
shuffled once with a fixed seed so that every shard mixes the classes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from diffusion.data.sources import Batches, Source

__all__ = ["IMAGE_SUFFIXES", "folder_source", "load_image"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ORDER_SEED = 0  # the fixed shuffle of the file list
BATCH = 256  # images decoded per yielded batch


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """One image file -> [3, size, size] uint8 (RGB, centre square crop, Lanczos resize)."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize(
                (size, size), Image.Resampling.LANCZOS
            )
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)  # [H, W, 3] -> [3, H, W]
    except OSError as e:
        raise ValueError(f"{os.fspath(path)}: not a readable image ({e})") from e


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _list_images(root: Path) -> tuple[list[Path], list[int], tuple[str, ...] | None]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p))
    if not files:
        raise FileNotFoundError(
            f"source: no images ({', '.join(IMAGE_SUFFIXES)}) under {os.fspath(root)!r}"
        )
    top_level = [p for p in files if p.parent == root]
    if top_level:
        return files, [0] * len(files), None
    classes = tuple(sorted({p.relative_to(root).parts[0] for p in files}))
    index = {name: i for i, name in enumerate(classes)}
    return files, [index[p.relative_to(root).parts[0]] for p in files], classes


def folder_source(
    source: str | os.PathLike | None = None, *, size: int | None = None, split: str = "train"
) -> Source:
    """Images under the directory ``source``, as ``size`` x ``size`` RGB, in one ``split``."""
    if source is None:
        raise ValueError("source: folder needs a directory of PNG/JPEG images")
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"source: {os.fspath(source)!r} is not a directory")
    if size is None or int(size) < 1:
        raise ValueError(f"size: folder needs a positive image size (--size N), got {size!r}")
    size = int(size)
    files, labels, classes = _list_images(root)
    order = np.random.default_rng(ORDER_SEED).permutation(len(files))
    files = [files[i] for i in order]
    labels_arr = np.asarray(labels, dtype=np.int64)[order]
    listing = [
        [p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files
    ]
    identity = {
        "files": len(files),
        "listing_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest(),
        "size": size,
        "resize": "center-crop, lanczos",
    }
    log.info(
        "folder %s: %d images, %s",
        root,
        len(files),
        f"{len(classes)} classes" if classes else "no classes",
    )

    def batches() -> Batches:
        for start in range(0, len(files), BATCH):
            chunk = files[start : start + BATCH]
            images = np.stack([load_image(p, size) for p in chunk])  # [n, 3, size, size]
            yield images, labels_arr[start : start + len(chunk)]

    splits: dict[str, Callable[[], Batches]] = {split: batches}
    return Source(
        dataset="folder", shape=(3, size, size), identity=identity, splits=splits, classes=classes
    )
