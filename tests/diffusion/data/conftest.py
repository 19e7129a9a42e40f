"""Fixtures for the dataset tests: tiny archives in each official format, built in tmp dirs."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CIFAR_MEMBERS = {f"data_batch_{i}": 4 for i in range(1, 6)} | {"test_batch": 3}


def make_cifar_tarball(path: Path, members: dict[str, int] = CIFAR_MEMBERS, seed: int = 0):
    """A cifar-10-python.tar.gz with ``members`` (name -> rows) of random pixels; returns
    the expected (train, test) arrays as [N, 3, 32, 32] uint8 and labels."""
    rng = np.random.default_rng(seed)
    expected: dict[str, list] = {"train": [], "test": []}
    with tarfile.open(path, "w:gz") as tar:
        for name, n in members.items():
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, n).tolist()
            blob = pickle.dumps({b"batch_label": name.encode(), b"data": data, b"labels": labels})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            split = "test" if name == "test_batch" else "train"
            expected[split].append((data.reshape(n, 3, 32, 32), np.asarray(labels)))
    return {
        split: (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        for split, parts in expected.items()
        if parts
    }


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


@pytest.fixture
def cifar_tarball(tmp_path: Path):
    """(path of a fake cifar-10-python.tar.gz, its md5, expected {split: (images, labels)})."""
    path = tmp_path / "cifar-10-python.tar.gz"
    expected = make_cifar_tarball(path)
    return path, md5_of(path), expected


@pytest.fixture
def imagenet_dir(tmp_path: Path):
    """A directory of fake downsampled-ImageNet npz files (2 train batches, val); returns
    (dir, expected {split: (images [N, 3, 64, 64], 0-based labels)})."""
    rng = np.random.default_rng(1)
    root = tmp_path / "imagenet64"
    root.mkdir()
    expected: dict[str, list] = {"train": [], "val": []}
    # Batch 10 before 2 on disk: the preparer must order by number, not by name.
    for name, n in [("train_data_batch_10", 5), ("train_data_batch_2", 7), ("val_data", 6)]:
        data = rng.integers(0, 256, (n, 12288), dtype=np.uint8)
        labels = rng.integers(1, 1001, n)
        np.savez_compressed(root / f"{name}.npz", data=data, labels=labels, mean=np.zeros(3))
        split = "val" if name == "val_data" else "train"
        expected[split].append((name, data.reshape(n, 3, 64, 64), labels - 1))
    for split in expected:
        expected[split].sort(key=lambda p: int(p[0].rsplit("_", 1)[1]) if "batch" in p[0] else 0)
    return root, {
        split: (np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))
        for split, parts in expected.items()
    }


@pytest.fixture
def image_folder(tmp_path: Path):
    """Class sub-directories "cat" (2 PNG) and "dog" (1 JPEG, 1 PNG) of non-square images."""
    root = tmp_path / "images"
    rng = np.random.default_rng(2)
    for cls, names in {"cat": ["a.png", "b.png"], "dog": ["c.jpg", "d.PNG"]}.items():
        (root / cls).mkdir(parents=True)
        for i, name in enumerate(names):
            pixels = rng.integers(0, 256, (20 + 4 * i, 30, 3), dtype=np.uint8)  # H != W
            Image.fromarray(pixels).save(root / cls / name)
    return root
