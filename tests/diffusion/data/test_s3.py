"""The same dataset layer against moto's S3 server on 127.0.0.1 (fixture in tests/conftest.py)."""

import uuid

import numpy as np
import pyarrow.fs as pafs
import pytest

from diffusion.data import (
    IncompleteDatasetError,
    ShardChecksumError,
    ShardLoader,
    load_digits_uint8,
    open_dataset,
    prepare_dataset,
    storage,
)
from orchestrator.cli import main


@pytest.fixture
def s3_uri(s3):
    return f"s3://{s3.bucket}/{uuid.uuid4().hex[:8]}"


def _same(uri, split, images, labels, endpoint_url=None):
    got_images, got_labels = open_dataset(uri, endpoint_url=endpoint_url).load_split(split)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_digits_round_trip_rerun_and_stale_shards(s3, s3_uri, caplog):
    ep = s3.endpoint_url
    assert prepare_dataset("digits", s3_uri, shard_size=400, endpoint_url=ep).written
    _same(s3_uri, "train", *load_digits_uint8("train"), endpoint_url=ep)
    with caplog.at_level("INFO", logger="diffusion.data.prepare"):
        assert not prepare_dataset("digits", s3_uri, shard_size=400, endpoint_url=ep).written
    assert "skipping" in caplog.text
    assert prepare_dataset("digits", s3_uri, shard_size=1000, endpoint_url=ep).written
    fs, root = storage.resolve(s3_uri, endpoint_url=ep)
    assert [p[len(root) + 1 :] for p in storage.list_files(fs, root)] == [
        "manifest.json",
        "test/part-00000.parquet",
        "train/part-00000.parquet",
        "train/part-00001.parquet",
    ]
    _same(s3_uri, "test", *load_digits_uint8("test"), endpoint_url=ep)


def test_endpoint_from_environment(s3, s3_uri, monkeypatch, cifar_tarball):
    path, md5, expected = cifar_tarball
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    prepare_dataset("cifar10", s3_uri, source=str(path), md5=md5, shard_size=8)
    for split in ("train", "test"):
        _same(s3_uri, split, *expected[split])


def test_imagenet64_and_folder_to_s3(s3, s3_uri, imagenet_dir, image_folder):
    root, expected = imagenet_dir
    ep = s3.endpoint_url
    prepare_dataset("imagenet64", f"{s3_uri}/in64", source=str(root), endpoint_url=ep)
    _same(f"{s3_uri}/in64", "val", *expected["val"], endpoint_url=ep)
    result = prepare_dataset(
        "folder", f"{s3_uri}/folder", source=str(image_folder), size=8, endpoint_url=ep
    )
    assert result.manifest.splits["train"].count == 4
    images, _ = open_dataset(f"{s3_uri}/folder", endpoint_url=ep).load_split("train")
    assert images.shape == (4, 3, 8, 8)


def test_missing_manifest_and_corrupt_shard_on_s3(s3, s3_uri):
    ep = s3.endpoint_url
    with pytest.raises(IncompleteDatasetError, match=rf"{s3_uri}: no manifest\.json"):
        open_dataset(s3_uri, endpoint_url=ep)
    prepare_dataset("digits", s3_uri, endpoint_url=ep)
    fs, root = storage.resolve(s3_uri, endpoint_url=ep)
    shard = storage.join(root, "test/part-00000.parquet")
    data = bytearray(storage.read_bytes(fs, shard))
    data[100] ^= 1
    storage.write_bytes(fs, shard, bytes(data))
    with pytest.raises(ShardChecksumError, match=rf"{s3_uri}/test/part-00000\.parquet"):
        open_dataset(s3_uri, endpoint_url=ep).read_shard("test", 0)
    fs.delete_file(storage.join(root, "manifest.json"))
    with pytest.raises(IncompleteDatasetError, match="did not finish"):
        open_dataset(s3_uri, endpoint_url=ep)


def test_loader_reads_s3_like_local(s3, s3_uri, tmp_path):
    ep = s3.endpoint_url
    prepare_dataset("digits", s3_uri, shard_size=500, endpoint_url=ep)
    prepare_dataset("digits", str(tmp_path), shard_size=500)
    remote = ShardLoader(
        s3_uri, "train", 64, rank=1, world_size=2, seed=4, flip=True, endpoint_url=ep
    )
    local = ShardLoader(str(tmp_path), "train", 64, rank=1, world_size=2, seed=4, flip=True)
    for (x, y), (x_ref, y_ref) in zip(remote, local, strict=True):
        assert np.array_equal(x.numpy(), x_ref.numpy()) and np.array_equal(y, y_ref)


def test_cli_prepare_to_s3(s3, s3_uri, capsys):
    argv = ["data", "prepare", "digits", "--out", s3_uri, "--endpoint-url", s3.endpoint_url]
    assert main(argv) == 0
    assert s3_uri in capsys.readouterr().out
    fs, root = storage.resolve(s3_uri, endpoint_url=s3.endpoint_url)
    assert isinstance(fs, pafs.S3FileSystem) and storage.exists(fs, f"{root}/manifest.json")
