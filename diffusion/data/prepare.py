"""``prepare_dataset(name, out_uri, **options)``: any registered source -> Parquet shards.

A re-run to the same URI never duplicates shards: shard names are deterministic
(``{split}/part-NNNNN.parquet``). If the URI already holds a complete dataset with the same
fingerprint (dataset, shape, source identity, shard size, format) whose shards are all
present with their recorded sizes, nothing is written ("skipped"). Otherwise the old
manifest is deleted first (from then on the old dataset no longer reads as complete), the
shards are rewritten, the manifest is written last, and shards the new manifest does not list
(left by an earlier, larger run) are deleted.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from diffusion.data import storage
from diffusion.data.registry import DATASETS, get_dataset
from diffusion.data.shards import (
    DEFAULT_SHARD_SIZE,
    FORMAT,
    MANIFEST_NAME,
    IncompleteDatasetError,
    Manifest,
    read_manifest,
    write_manifest,
    write_split,
)
from diffusion.data.sources import Source

__all__ = ["PREPARERS", "PrepareResult", "prepare_dataset"]

log = logging.getLogger(__name__)

PREPARERS: dict[str, Callable[..., Source]] = {name: spec.source for name, spec in DATASETS.items()}
_OURS = re.compile(r"[^/]+/part-\d{5}\.parquet(\.tmp-[0-9a-f]+)?|manifest\.json\.tmp-[0-9a-f]+")


@dataclass(frozen=True)
class PrepareResult:
    """The dataset at ``uri`` and whether this call wrote it (False: already complete)."""

    uri: str
    manifest: Manifest
    written: bool


def _source(name: str, options: dict) -> Source:
    make = get_dataset(name).source
    allowed = list(inspect.signature(make).parameters)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"{name}: unknown option(s) {unknown}; allowed options: {allowed or 'none'}"
        )
    return make(**options)


def _fingerprint(source: Source, shard_size: int) -> str:
    key = {
        "format": FORMAT,
        "dataset": source.dataset,
        "shape": list(source.shape),
        "identity": source.identity,
        "splits": sorted(source.splits),
        "shard_size": shard_size,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _complete(fs, root: str, manifest: Manifest) -> bool:
    for info in manifest.splits.values():
        for shard in info.shards:
            file = fs.get_file_info(storage.join(root, shard.path))
            if file.size != shard.bytes:
                return False
    return True


def _remove_stale(fs, root: str, manifest: Manifest) -> None:
    keep = {s.path for info in manifest.splits.values() for s in info.shards}
    for path in storage.list_files(fs, root):
        rel = path[len(root) + 1 :]
        if rel not in keep and _OURS.fullmatch(rel):
            log.info("removing stale %s", rel)
            fs.delete_file(path)


def prepare_dataset(
    name: str,
    out_uri: str,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    endpoint_url: str | None = None,
    force: bool = False,
    **options,
) -> PrepareResult:
    """Prepare dataset ``name`` (one of ``DATASETS``) as Parquet shards at ``out_uri`` (local
    path or ``s3://bucket/prefix``; ``endpoint_url`` for S3-compatible servers).

    ``options`` go to the source: digits takes none; cifar10 ``source`` (path or URL),
    ``md5``, ``cache_dir``; imagenet64 ``source`` (directory or list of npz files); folder
    ``source`` (directory), ``size``, ``split``. ``force`` rewrites even an identical dataset.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size: got {shard_size}; expected a positive number of rows")
    source = _source(name, options)
    fs, root = storage.resolve(out_uri, endpoint_url=endpoint_url)
    fingerprint = _fingerprint(source, shard_size)
    try:
        existing = read_manifest(fs, root, out_uri)
    except IncompleteDatasetError:
        existing = None
    if (
        existing is not None
        and not force
        and existing.fingerprint == fingerprint
        and _complete(fs, root, existing)
    ):
        log.info("%s: complete identical %s dataset present; skipping", out_uri, name)
        return PrepareResult(uri=out_uri, manifest=existing, written=False)

    storage.delete(fs, storage.join(root, MANIFEST_NAME))
    splits = {}
    for split, batches in source.splits.items():
        log.info("%s: writing split %s", out_uri, split)
        splits[split] = write_split(
            fs, root, source.dataset, split, source.shape, batches(), shard_size=shard_size
        )
    manifest = Manifest(
        dataset=source.dataset,
        splits=splits,
        fingerprint=fingerprint,
        source=source.identity,
        classes=source.classes,
    )
    write_manifest(fs, root, manifest)
    _remove_stale(fs, root, manifest)
    log.info("%s: %s ready (%s)", out_uri, name, {k: v.count for k, v in splits.items()})
    return PrepareResult(uri=out_uri, manifest=manifest, written=True)
