"""The one on-disk format of every dataset: Parquet shards plus a manifest written last.

Layout under a root URI (local path or ``s3://bucket/prefix``)::

    {root}/{split}/part-00000.parquet
    {root}/{split}/part-00001.parquet
    ...
    {root}/manifest.json

A shard has columns ``image`` (fixed_size_binary of C*H*W bytes: the raw uint8 CHW pixels)
and ``label`` (int64), one row group, zstd, and key-value metadata "diffscale" = JSON
{dataset, split, shape, count, shard}. The manifest holds the dataset name, a fingerprint of
the preparer's inputs, a description of the source, optional class names, and per split
{shape, count, shards: [{path (relative to the root), count, sha256, bytes}]}.

The manifest is written after every shard, atomically (temporary name then rename on local
disk; a single S3 PUT), so a dataset without one is incomplete and readers refuse it.
Shard checksums (sha256 of the file) are verified on every shard read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from diffusion.data import storage

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "IncompleteDatasetError",
    "Manifest",
    "ShardChecksumError",
    "ShardDataset",
    "ShardInfo",
    "SplitInfo",
    "open_dataset",
    "read_manifest",
    "take_rows",
    "write_manifest",
    "write_split",
]

log = logging.getLogger(__name__)

FORMAT = "diffscale-shards/1"
MANIFEST_NAME = "manifest.json"
DEFAULT_SHARD_SIZE = 10_000


class IncompleteDatasetError(FileNotFoundError):
    """The dataset has no (readable) manifest: never prepared, or its preparer did not finish."""


class ShardChecksumError(ValueError):
    """A shard's bytes do not match the sha256 recorded in the manifest."""


@dataclass(frozen=True)
class ShardInfo:
    """One Parquet file: ``path`` relative to the dataset root."""

    path: str
    count: int
    sha256: str
    bytes: int


@dataclass(frozen=True)
class SplitInfo:
    """One split: image ``shape`` (C, H, W), number of examples, and its shards in order."""

    shape: tuple[int, int, int]
    count: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    """What a complete dataset holds. ``fingerprint`` identifies the preparer inputs (source
    and options), so a re-run can tell an identical dataset from a stale one."""

    dataset: str
    splits: dict[str, SplitInfo]
    fingerprint: str = ""
    source: dict = field(default_factory=dict)
    classes: tuple[str, ...] | None = None

    def to_json(self) -> str:
        """Deterministic JSON text."""
        out = {"format": FORMAT, **asdict(self)}
        return json.dumps(out, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Manifest:
        """Parse a manifest; ``where`` (its URI) names it in errors."""
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT!r}")
            splits = {
                name: SplitInfo(
                    shape=tuple(int(d) for d in s["shape"]),
                    count=int(s["count"]),
                    shards=tuple(ShardInfo(**sh) for sh in s["shards"]),
                )
                for name, s in raw["splits"].items()
            }
            classes = raw.get("classes")
            return cls(
                dataset=raw["dataset"],
                splits=splits,
                fingerprint=raw.get("fingerprint", ""),
                source=raw.get("source", {}),
                classes=tuple(classes) if classes is not None else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IncompleteDatasetError(
                f"{where}: unreadable manifest ({type(e).__name__}: {e}); the dataset is "
                "incomplete or damaged: prepare it again (`diffscale data prepare`)"
            ) from e


def _shard_table(images: np.ndarray, labels: np.ndarray) -> pa.Table:
    """[n, C, H, W] uint8 and [n] int64 -> a two-column Arrow table (no copy of pixels)."""
    n = len(images)
    row_bytes = int(np.prod(images.shape[1:]))
    flat = np.ascontiguousarray(images).reshape(-1)  # [n * C * H * W]
    image_col = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(row_bytes), n, [None, pa.py_buffer(flat)]
    )
    return pa.table({"image": image_col, "label": pa.array(labels, type=pa.int64())})


def _encode_shard(images: np.ndarray, labels: np.ndarray, meta: dict) -> tuple[bytes, str]:
    """One shard's Parquet bytes and their sha256."""
    table = _shard_table(images, labels)
    table = table.replace_schema_metadata({"diffscale": json.dumps(meta, sort_keys=True)})
    sink = pa.BufferOutputStream()
    # Pixels: zstd, no dictionary, no statistics (useless on image bytes); one row group.
    pq.write_table(
        table,
        sink,
        compression="zstd",
        use_dictionary=["label"],
        write_statistics=["label"],
        row_group_size=max(len(images), 1),
    )
    data = sink.getvalue().to_pybytes()
    return data, hashlib.sha256(data).hexdigest()


def take_rows(queue: list[tuple[np.ndarray, ...]], n: int) -> tuple[np.ndarray, ...]:
    """Remove the first ``n`` rows from a queue of parallel-array tuples (e.g. images,
    labels); slices are views, so only rows spanning two entries are copied."""
    pieces = []
    while n:
        k = min(n, len(queue[0][0]))
        pieces.append(tuple(a[:k] for a in queue[0]))
        queue[0] = tuple(a[k:] for a in queue[0])
        if not len(queue[0][0]):
            queue.pop(0)
        n -= k
    if len(pieces) == 1:
        return pieces[0]
    return tuple(np.concatenate(parts) for parts in zip(*pieces, strict=True))


def _check_batch(images: np.ndarray, labels: np.ndarray, shape: tuple[int, int, int]) -> None:
    if images.dtype != np.uint8 or images.shape[1:] != tuple(shape):
        raise ValueError(
            f"images: expected uint8 [N, {', '.join(map(str, shape))}], "
            f"got {images.dtype} {list(images.shape)}"
        )
    if labels.shape != (len(images),):
        raise ValueError(f"labels: expected shape [{len(images)}], got {list(labels.shape)}")


def write_split(
    fs: pafs.FileSystem,
    root: str,
    dataset: str,
    split: str,
    shape: tuple[int, int, int],
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> SplitInfo:
    """Write a stream of (images [n, C, H, W] uint8, labels [n]) batches as shards
    ``{root}/{split}/part-NNNNN.parquet`` of ``shard_size`` rows (the last one shorter).
    Holds at most one shard plus one batch in memory."""
    if shard_size < 1:
        raise ValueError(f"shard_size: got {shard_size}; expected a positive number of rows")
    shape = tuple(int(d) for d in shape)
    shards: list[ShardInfo] = []
    pending: list[tuple[np.ndarray, ...]] = []
    pending_rows = 0

    def flush(rows: int) -> None:
        images, labels = take_rows(pending, rows)
        index = len(shards)
        rel = f"{split}/part-{index:05d}.parquet"
        meta = {"dataset": dataset, "split": split, "shape": list(shape), "count": rows}
        data, digest = _encode_shard(images, labels.astype(np.int64), {**meta, "shard": index})
        storage.write_bytes(fs, storage.join(root, rel), data)
        shards.append(ShardInfo(path=rel, count=rows, sha256=digest, bytes=len(data)))
        log.info("wrote %s (%d rows, %.1f MB)", rel, rows, len(data) / 1e6)

    for images, labels in batches:
        images, labels = np.asarray(images), np.asarray(labels)
        _check_batch(images, labels, shape)
        pending.append((images, labels))
        pending_rows += len(images)
        while pending_rows >= shard_size:
            flush(shard_size)
            pending_rows -= shard_size
    if pending_rows:
        flush(pending_rows)
    count = sum(s.count for s in shards)
    return SplitInfo(shape=shape, count=count, shards=tuple(shards))


def write_manifest(fs: pafs.FileSystem, root: str, manifest: Manifest) -> None:
    """Write ``{root}/manifest.json`` atomically: the last step of preparing a dataset."""
    storage.write_bytes(fs, storage.join(root, MANIFEST_NAME), manifest.to_json().encode())


def read_manifest(fs: pafs.FileSystem, root: str, uri: str) -> Manifest:
    """The manifest of the dataset at ``root``; IncompleteDatasetError naming ``uri`` if it
    is missing or unreadable."""
    try:
        text = storage.read_bytes(fs, storage.join(root, MANIFEST_NAME))
    except FileNotFoundError as e:
        raise IncompleteDatasetError(
            f"{uri}: no {MANIFEST_NAME}; the dataset was never prepared or its preparer did "
            f"not finish (the manifest is written last): run `diffscale data prepare NAME "
            f"--out {uri}`"
        ) from e
    return Manifest.from_json(text, where=storage.join(uri, MANIFEST_NAME))


class ShardDataset:
    """A complete dataset opened for reading: its manifest and checksum-verified shards."""

    def __init__(self, uri: str, *, endpoint_url: str | None = None) -> None:
        self.uri = uri
        self.fs, self.root = storage.resolve(uri, endpoint_url=endpoint_url)
        self.manifest = read_manifest(self.fs, self.root, uri)

    @property
    def splits(self) -> dict[str, SplitInfo]:
        """Split name -> SplitInfo."""
        return self.manifest.splits

    def split(self, name: str) -> SplitInfo:
        """The SplitInfo of ``name`` (ValueError naming the splits there are)."""
        if name not in self.manifest.splits:
            raise ValueError(
                f"split: {name!r} is not in {self.uri}; allowed values: "
                f"{sorted(self.manifest.splits)}"
            )
        return self.manifest.splits[name]

    def read_shard(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard ``index`` of ``split``: images [n, C, H, W] uint8 (read-only view) and
        labels [n] int64, after checking the file against its manifest sha256."""
        info = self.split(split)
        shard = info.shards[index]
        where = storage.join(self.uri, shard.path)
        data = storage.read_bytes(self.fs, storage.join(self.root, shard.path))
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard.sha256:
            raise ShardChecksumError(
                f"{where}: sha256 {digest} does not match the manifest's {shard.sha256}; "
                "the shard is damaged: prepare the dataset again"
            )
        table = pq.read_table(pa.BufferReader(data))
        images = table.column("image").combine_chunks()
        row_bytes = int(np.prod(info.shape))
        if images.type != pa.binary(row_bytes) or len(images) != shard.count:
            raise ValueError(
                f"{where}: {len(images)} rows of {images.type}, manifest says {shard.count} "
                f"rows of shape {list(info.shape)}"
            )
        pixels = np.frombuffer(
            images.buffers()[1],
            dtype=np.uint8,
            count=len(images) * row_bytes,
            offset=images.offset * row_bytes,
        ).reshape(len(images), *info.shape)  # [n, C, H, W]
        labels = table.column("label").to_numpy().astype(np.int64, copy=False)
        return pixels, labels

    def iter_shards(self, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every shard of ``split`` in stored order, one at a time."""
        for index in range(len(self.split(split).shards)):
            yield self.read_shard(split, index)

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The whole split in memory (for small sets: digits, evaluation references)."""
        parts = list(self.iter_shards(split))
        shape = self.split(split).shape
        if not parts:
            return np.zeros((0, *shape), np.uint8), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def verify(self) -> None:
        """Read every shard once, checking checksums (ShardChecksumError on a mismatch)."""
        for split, info in self.splits.items():
            for index in range(len(info.shards)):
                self.read_shard(split, index)


def open_dataset(uri: str, *, endpoint_url: str | None = None) -> ShardDataset:
    """Open the dataset at ``uri``; IncompleteDatasetError if it has no manifest."""
    return ShardDataset(uri, endpoint_url=endpoint_url)
