"""Readers of the datasets in their official formats, each turned into a ``Source``: the
image shape, an identity of the inputs (for re-run detection), and per split a function
returning a stream of (images [n, C, H, W] uint8, labels [n] int64) batches.

- digits: ``diffusion.data.digits`` (train/test as that module fixes them), 1x8x8.
- cifar10: the official python tarball ``cifar-10-python.tar.gz`` (local path or URL),
  md5-checked; train = data_batch_1..5, test = test_batch; 3x32x32.
- imagenet64: downsampled ImageNet 64x64 npz batches (``train_data_batch_1..10.npz``,
  ``val_data.npz``); train and val splits; labels stored 0-based; 3x64x64; read row block by
  row block straight out of the npz, so no batch file is ever held whole in memory.
The folder-of-images source lives in ``diffusion.data.folder``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import re
import shutil
import tarfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

try:  # numpy >= 2
    from numpy._core import multiarray as np_multiarray
    from numpy._core import numeric as np_numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as np_multiarray
    from numpy.core import numeric as np_numeric

from diffusion.data.digits import SPLITS as DIGITS_SPLITS
from diffusion.data.digits import load_digits_uint8

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "Batches",
    "Source",
    "cifar10_source",
    "cifar_batch",
    "digits_source",
    "fetch",
    "imagenet64_source",
]

log = logging.getLogger(__name__)

Batches = Iterator[tuple[np.ndarray, np.ndarray]]  # (images [n, C, H, W] uint8, labels [n])

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)
READ_ROWS = 4096  # rows per block when streaming npz arrays


@dataclass(frozen=True)
class Source:
    """A dataset ready to be written: ``identity`` (JSON-able) changes whenever the content
    would; ``splits`` maps a split name to a function opening its batch stream."""

    dataset: str
    shape: tuple[int, int, int]
    identity: dict
    splits: dict[str, Callable[[], Batches]]
    classes: tuple[str, ...] | None = None


def digits_source() -> Source:
    """scikit-learn's digits, split as ``diffusion.data.digits`` fixes it."""

    def split_batches(split: str) -> Callable[[], Batches]:
        return lambda: iter([load_digits_uint8(split)])

    return Source(
        dataset="digits",
        shape=(1, 8, 8),
        identity={"source": "sklearn.datasets.load_digits", "split": "diffusion.data.digits"},
        splits={split: split_batches(split) for split in DIGITS_SPLITS},
        classes=tuple(str(d) for d in range(10)),
    )


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFSCALE_CACHE", Path.home() / ".cache" / "diffscale"))


def fetch(
    source: str | os.PathLike, *, md5: str | None, cache_dir: str | os.PathLike | None
) -> Path:
    """A local file for ``source``: a path as it is, or an http(s)/file URL downloaded once
    into ``cache_dir`` (default ``$DIFFSCALE_CACHE`` or ``~/.cache/diffscale``). Checks
    ``md5`` when given (ValueError with both sums on a mismatch)."""
    text = os.fspath(source)
    scheme = urlparse(text).scheme
    if scheme not in ("http", "https", "file"):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"source: {text!r} is not a file (nor an http(s)/file URL)")
        _check_md5(path, md5)
        return path
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    name = Path(urlparse(text).path).name or "download"
    target = cache / name
    if target.is_file() and (md5 is None or _md5(target) == md5.lower()):
        log.info("using cached %s for %s", target, text)
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"{name}.partial-{os.getpid()}"
    log.info("downloading %s -> %s", text, target)
    try:
        with urllib.request.urlopen(text, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
        _check_md5(partial, md5, label=text)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _check_md5(path: Path, md5: str | None, label: str | None = None) -> None:
    if md5 is None:
        return
    actual = _md5(path)
    if actual != md5.lower():
        raise ValueError(
            f"md5: {label or path} has md5 {actual}, expected {md5.lower()}; "
            "a damaged or different file (pass md5=... / --md5 HEX to accept another one)"
        )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts, allowing only what numpy arrays need (a pickle can
    otherwise run arbitrary code)."""

    def find_class(self, module: str, name: str) -> object:
        # numpy 1 pickles name numpy.core.multiarray, numpy 2 numpy._core.multiarray;
        # protocol-2 pickles of bytes go through _codecs.encode.
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
            "_reconstruct",
            "scalar",
        ):
            return getattr(np_multiarray, name)
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return np_numeric._frombuffer  # protocol 5
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR batch: refusing to load {module}.{name}")


def cifar_batch(data: bytes, member: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch ``member`` -> images [N, 3, 32, 32] uint8, labels [N] int64.

    Only what numpy arrays need is unpickled; anything else raises UnpicklingError.
    """
    batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    images = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or len(labels) != len(images):
        raise ValueError(
            f"{member}: expected data [N, 3072] and N labels, got {list(images.shape)} "
            f"and {len(labels)}"
        )
    return images.reshape(-1, 3, 32, 32), labels  # [N, 3072] CHW planes -> [N, 3, 32, 32]


def _cifar_split(path: Path, members: Sequence[str]) -> Batches:
    wanted = {f"cifar-10-batches-py/{m}": m for m in members}
    found: dict[str, bytes] = {}
    with tarfile.open(path, "r:gz") as tar:
        for info in tar:
            if info.name in wanted and info.isfile():
                found[wanted[info.name]] = tar.extractfile(info).read()
    missing = [m for m in members if m not in found]
    if missing:
        raise ValueError(f"{path}: no member(s) {missing} under cifar-10-batches-py/")
    for m in members:
        yield cifar_batch(found.pop(m), m)


def cifar10_source(
    source: str | os.PathLike | None = None,
    *,
    md5: str | None = CIFAR10_MD5,
    cache_dir: str | os.PathLike | None = None,
) -> Source:
    """CIFAR-10 from ``cifar-10-python.tar.gz``: a local path or a URL (e.g. the official
    ``CIFAR10_URL``). ``md5`` defaults to the official tarball's; None skips the check."""
    if source is None:
        raise ValueError(
            "source: cifar10 needs the official python tarball, a path to "
            f"cifar-10-python.tar.gz or a URL such as {CIFAR10_URL}"
        )
    path = fetch(source, md5=md5, cache_dir=cache_dir)
    digest = md5.lower() if md5 else _md5(path)
    return Source(
        dataset="cifar10",
        shape=(3, 32, 32),
        identity={"tarball_md5": digest},
        splits={
            "train": lambda: _cifar_split(path, CIFAR10_TRAIN),
            "test": lambda: _cifar_split(path, CIFAR10_TEST),
        },
    )


def _npz_rows(path: Path, key: str, row_bytes: int) -> Iterator[np.ndarray]:
    """Blocks of rows [<= READ_ROWS, row_bytes] uint8 of ``key`` in an npz file, streamed."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{path}: {key}.npy has unsupported .npy version {version}")
        if dtype != np.uint8 or fortran or len(shape) != 2 or shape[1] != row_bytes:
            raise ValueError(
                f"{path}: {key!r} must be uint8 [N, {row_bytes}] in C order, got {dtype} "
                f"{list(shape)}{' (Fortran order)' if fortran else ''}"
            )
        left = shape[0]
        while left:
            n = min(left, READ_ROWS)
            block = f.read(n * row_bytes)
            if len(block) != n * row_bytes:
                raise ValueError(f"{path}: {key!r} is truncated")
            yield np.frombuffer(block, dtype=np.uint8).reshape(n, row_bytes)
            left -= n


def _imagenet_file(path: Path) -> Batches:
    with np.load(path) as npz:
        if "labels" not in npz.files or "data" not in npz.files:
            raise ValueError(f"{path}: expected keys 'data' and 'labels', got {npz.files}")
        labels = np.asarray(npz["labels"], dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 1 or labels.max() > 1000):
        raise ValueError(
            f"{path}: labels must be 1-based class indices in 1..1000, got "
            f"{labels.min()}..{labels.max()}"
        )
    done = 0
    for block in _npz_rows(path, "data", 3 * 64 * 64):
        n = len(block)
        yield block.reshape(n, 3, 64, 64), labels[done : done + n] - 1  # CHW planes
        done += n
    if done != len(labels):
        raise ValueError(f"{path}: {done} images but {len(labels)} labels")


def _imagenet_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if root.is_dir():
            return sorted(root.glob("*.npz"))
        if not root.is_file():
            raise FileNotFoundError(f"source: {os.fspath(source)!r} is no directory or file")
        return [root]
    files = [Path(p) for p in source]
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"source: {os.fspath(p)!r} is not a file")
    return files


def imagenet64_source(
    source: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> Source:
    """Downsampled ImageNet 64x64 from a directory of (or a list of) npz batch files:
    ``train_data_batch_<k>.npz`` (train split, in k order) and ``val_data.npz`` (val split)."""
    if source is None:
        raise ValueError(
            "source: imagenet64 needs a directory holding train_data_batch_1..10.npz and "
            "val_data.npz (or a list of those files)"
        )
    train: list[tuple[int, Path]] = []
    val: list[Path] = []
    for path in _imagenet_files(source):
        if m := re.fullmatch(r"train_data_batch_(\d+)\.npz", path.name):
            train.append((int(m.group(1)), path))
        elif path.name == "val_data.npz":
            val.append(path)
    if not train and not val:
        raise FileNotFoundError(
            f"source: no train_data_batch_<k>.npz or val_data.npz in {os.fspath(source)!r}"
        )
    ordered = {"train": [p for _, p in sorted(train)], "val": val}
    identity = {
        split: [
            {"name": p.name, "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
            for p in files
        ]
        for split, files in ordered.items()
    }

    def split_batches(files: list[Path]) -> Callable[[], Batches]:
        return lambda: (batch for p in files for batch in _imagenet_file(p))

    return Source(
        dataset="imagenet64",
        shape=(3, 64, 64),
        identity=identity,
        splits={split: split_batches(files) for split, files in ordered.items() if files},
    )
