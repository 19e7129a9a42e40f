"""The Parquet shard format, its manifest and the storage URIs (local disk)."""

import json
import os

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from diffusion.data import storage
from diffusion.data.prepare import prepare_dataset
from diffusion.data.shards import (
    IncompleteDatasetError,
    Manifest,
    ShardChecksumError,
    open_dataset,
    write_manifest,
    write_split,
)


def _batches(n, shape=(2, 3, 4), batch=7, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64)
    return (
        images,
        labels,
        [(images[i : i + batch], labels[i : i + batch]) for i in range(0, n, batch)],
    )


def _write(root, n=25, shard_size=10, shape=(2, 3, 4)):
    fs, path = storage.resolve(str(root))
    images, labels, batches = _batches(n, shape)
    info = write_split(fs, path, "toy", "train", shape, batches, shard_size=shard_size)
    write_manifest(fs, path, Manifest(dataset="toy", splits={"train": info}))
    return images, labels, info


def test_round_trip_shards_and_metadata(tmp_path):
    images, labels, info = _write(tmp_path / "ds")
    assert [s.count for s in info.shards] == [10, 10, 5]
    assert [s.path for s in info.shards] == [f"train/part-0000{i}.parquet" for i in range(3)]
    ds = open_dataset(str(tmp_path / "ds"))
    got_images, got_labels = ds.load_split("train")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.dtype == np.uint8 and got_labels.dtype == np.int64
    table = pq.read_table(tmp_path / "ds" / "train" / "part-00001.parquet")
    meta = json.loads(table.schema.metadata[b"diffscale"])
    assert meta == {"dataset": "toy", "split": "train", "shape": [2, 3, 4], "count": 10, "shard": 1}
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 25
    assert len(manifest["splits"]["train"]["shards"][0]["sha256"]) == 64


def test_no_manifest_is_refused_naming_the_uri(tmp_path):
    fs, path = storage.resolve(str(tmp_path / "half"))
    _, _, batches = _batches(5)
    write_split(fs, path, "toy", "train", (2, 3, 4), batches)  # shards but no manifest
    with pytest.raises(IncompleteDatasetError, match=r"half.*no manifest\.json"):
        open_dataset(str(tmp_path / "half"))


def test_truncated_manifest_is_refused(tmp_path):
    _write(tmp_path / "ds")
    path = tmp_path / "ds" / "manifest.json"
    path.write_text(path.read_text()[:100])
    with pytest.raises(IncompleteDatasetError, match=r"manifest\.json: unreadable manifest"):
        open_dataset(str(tmp_path / "ds"))


def test_corrupted_shard_fails_its_checksum(tmp_path):
    _write(tmp_path / "ds")
    shard = tmp_path / "ds" / "train" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = open_dataset(str(tmp_path / "ds"))
    ds.read_shard("train", 0)  # the others still read
    with pytest.raises(ShardChecksumError, match=r"train/part-00001\.parquet: sha256"):
        ds.read_shard("train", 1)
    with pytest.raises(ShardChecksumError):
        ds.verify()


def test_unknown_split_names_the_allowed_ones(tmp_path):
    _write(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"'val'.*\['train'\]"):
        open_dataset(str(tmp_path / "ds")).split("val")


def test_write_split_rejects_wrong_shape_and_dtype(tmp_path):
    fs, path = storage.resolve(str(tmp_path))
    bad = [(np.zeros((2, 1, 8, 8), np.float32), np.zeros(2))]
    with pytest.raises(ValueError, match=r"images: expected uint8 \[N, 1, 8, 8\]"):
        write_split(fs, path, "toy", "train", (1, 8, 8), bad)
    with pytest.raises(ValueError, match="shard_size"):
        write_split(fs, path, "toy", "train", (1, 8, 8), [], shard_size=0)


def test_rerun_skips_identical_and_rewrites_without_duplicates(tmp_path, caplog):
    out = str(tmp_path / "digits")
    first = prepare_dataset("digits", out, shard_size=400)
    assert first.written
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "digits").rglob("*.parquet")}
    with caplog.at_level("INFO", logger="diffusion.data.prepare"):
        again = prepare_dataset("digits", out, shard_size=400)
    assert not again.written and "skipping" in caplog.text
    assert again.manifest == first.manifest
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing rewritten
    # Different shard size: rewritten, and the now-stale part-00002/3 are gone.
    third = prepare_dataset("digits", out, shard_size=1000)
    assert third.written
    names = sorted(p.name for p in (tmp_path / "digits" / "train").iterdir())
    assert names == ["part-00000.parquet", "part-00001.parquet"]
    # A missing shard makes the dataset incomplete: the same call rewrites it.
    os.remove(tmp_path / "digits" / "train" / "part-00001.parquet")
    assert prepare_dataset("digits", out, shard_size=1000).written
    assert open_dataset(out).load_split("train")[0].shape == (1500, 1, 8, 8)
    assert not list((tmp_path / "digits").rglob("*.tmp-*"))
    # force rewrites an identical dataset
    assert prepare_dataset("digits", out, shard_size=1000, force=True).written


def test_resolve_uris(tmp_path, monkeypatch):
    fs, path = storage.resolve("relative/dir/")
    assert isinstance(fs, pafs.LocalFileSystem) and path == os.path.abspath("relative/dir")
    fs, path = storage.resolve(f"file://{tmp_path}")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fs, path = storage.resolve("s3://bucket/some/prefix/", endpoint_url="http://127.0.0.1:9")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/some/prefix"
    with pytest.raises(ValueError, match=r"scheme 'gs'.*allowed"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(ValueError, match="names no bucket"):
        storage.resolve("s3:///x")
    with pytest.raises(ValueError, match="endpoint_url"):
        storage.resolve("s3://bucket/x", endpoint_url="127.0.0.1:9")


def test_atomic_write_leaves_no_temporary(tmp_path):
    fs, path = storage.resolve(str(tmp_path))
    storage.write_bytes(fs, storage.join(path, "a", "b.json"), b"{}")
    assert (tmp_path / "a" / "b.json").read_bytes() == b"{}"
    assert storage.list_files(fs, path) == [storage.join(path, "a", "b.json")]
    storage.delete(fs, storage.join(path, "a", "b.json"))
    assert not storage.exists(fs, storage.join(path, "a", "b.json"))
