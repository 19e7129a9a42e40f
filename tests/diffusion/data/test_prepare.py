"""Preparers: each official format round-trips into Parquet shards; bad input is named."""

import functools
import http.server
import pickle
import threading

import numpy as np
import pytest
from PIL import Image

from diffusion.data import load_digits_uint8, open_dataset, prepare_dataset, sources
from diffusion.data.folder import load_image
from diffusion.data.sources import CIFAR10_MD5, cifar_batch
from orchestrator.cli import main
from tests.diffusion.data.conftest import make_cifar_tarball


def _assert_split(uri, split, images, labels):
    got_images, got_labels = open_dataset(uri).load_split(split)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_digits_round_trip(tmp_path):
    out = str(tmp_path / "digits")
    result = prepare_dataset("digits", out)
    assert result.manifest.dataset == "digits"
    assert {k: (v.shape, v.count) for k, v in result.manifest.splits.items()} == {
        "train": ((1, 8, 8), 1500),
        "test": ((1, 8, 8), 297),
    }
    for split in ("train", "test"):
        _assert_split(out, split, *load_digits_uint8(split))


def test_cifar10_from_tarball(tmp_path, cifar_tarball):
    path, md5, expected = cifar_tarball
    out = str(tmp_path / "cifar")
    result = prepare_dataset("cifar10", out, source=str(path), md5=md5, shard_size=8)
    assert result.manifest.splits["train"].count == 20
    assert [s.count for s in result.manifest.splits["train"].shards] == [8, 8, 4]
    assert result.manifest.splits["test"].shape == (3, 32, 32)
    for split in ("train", "test"):
        _assert_split(out, split, *expected[split])


def test_cifar10_wrong_md5_names_both_sums(cifar_tarball, tmp_path):
    path, md5, _ = cifar_tarball
    with pytest.raises(ValueError, match=rf"md5 {md5}, expected {CIFAR10_MD5}"):
        prepare_dataset("cifar10", str(tmp_path / "out"), source=str(path))  # official md5
    assert not (tmp_path / "out").exists()


def test_cifar10_missing_member_and_source(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_tarball(path, {"data_batch_1": 2, "test_batch": 2})
    with pytest.raises(ValueError, match=r"data_batch_2"):
        prepare_dataset("cifar10", str(tmp_path / "out"), source=str(path), md5=None)
    with pytest.raises(FileNotFoundError, match=r"nope\.tar\.gz"):
        prepare_dataset("cifar10", str(tmp_path / "out"), source=str(tmp_path / "nope.tar.gz"))
    with pytest.raises(ValueError, match=r"source: cifar10 needs .*https://"):
        prepare_dataset("cifar10", str(tmp_path / "out"))


def test_cifar10_from_url_downloads_once_into_the_cache(tmp_path, cifar_tarball):
    path, md5, expected = cifar_tarball
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(path.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
        cache = tmp_path / "cache"
        out = str(tmp_path / "cifar")
        prepare_dataset("cifar10", out, source=url, md5=md5, cache_dir=str(cache))
        assert (cache / path.name).read_bytes() == path.read_bytes()
        _assert_split(out, "test", *expected["test"])
        # wrong md5 on download: error with both sums, no partial file left in the cache
        with pytest.raises(ValueError, match=rf"md5 {md5}, expected 0{{32}}"):
            prepare_dataset(
                "cifar10", out, source=url, md5="0" * 32, cache_dir=str(tmp_path / "c2")
            )
        assert list((tmp_path / "c2").iterdir()) == []
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_cifar10_from_file_url(tmp_path, cifar_tarball):
    path, md5, expected = cifar_tarball
    out = str(tmp_path / "cifar")
    prepare_dataset("cifar10", out, source=path.as_uri(), md5=md5, cache_dir=str(tmp_path / "c"))
    _assert_split(out, "train", *expected["train"])


def test_imagenet64_from_npz_batches(tmp_path, imagenet_dir, monkeypatch):
    root, expected = imagenet_dir
    monkeypatch.setattr(sources, "READ_ROWS", 3)  # stream each npz in several row blocks
    out = str(tmp_path / "in64")
    result = prepare_dataset("imagenet64", out, source=str(root), shard_size=5)
    assert {k: (v.shape, v.count) for k, v in result.manifest.splits.items()} == {
        "train": ((3, 64, 64), 12),
        "val": ((3, 64, 64), 6),
    }
    for split in ("train", "val"):
        _assert_split(out, split, *expected[split])
    assert open_dataset(out).load_split("train")[1].min() >= 0  # stored 0-based


def test_imagenet64_rejects_zero_based_labels_and_empty_dirs(tmp_path):
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 12288), np.uint8), labels=[0, 3])
    with pytest.raises(ValueError, match=r"1-based"):
        prepare_dataset("imagenet64", str(tmp_path / "out"), source=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no train_data_batch_<k>\.npz"):
        prepare_dataset("imagenet64", str(tmp_path / "out"), source=str(tmp_path / "empty"))


def test_folder_with_class_subdirectories(tmp_path, image_folder):
    out = str(tmp_path / "folder")
    result = prepare_dataset("folder", out, source=str(image_folder), size=16)
    assert result.manifest.classes == ("cat", "dog")
    info = result.manifest.splits["train"]
    assert (info.shape, info.count) == ((3, 16, 16), 4)
    images, labels = open_dataset(out).load_split("train")
    assert sorted(labels.tolist()) == [0, 0, 1, 1]
    expected = {p.name: load_image(p, 16) for p in image_folder.rglob("*.*")}
    class_of = {"a.png": 0, "b.png": 0, "c.jpg": 1, "d.PNG": 1}
    # each stored image is one file, centre-cropped and resized, with its class label
    for image, label in zip(images, labels, strict=True):
        (name,) = [n for n, e in expected.items() if np.array_equal(image, e)]
        assert label == class_of[name]
    # centre crop: a 20x30 image keeps columns 5..24
    pixels = np.asarray(Image.open(image_folder / "cat" / "a.png"))
    crop = Image.fromarray(pixels[:, 5:25]).resize((16, 16), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(expected["a.png"], np.asarray(crop).transpose(2, 0, 1))


def test_folder_flat_gets_label_zero_and_named_split(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        Image.new("L", (10 + i, 12), color=40 * i).save(root / f"{i}.png")  # grey -> RGB
    result = prepare_dataset("folder", str(tmp_path / "out"), source=str(root), size=4, split="all")
    assert list(result.manifest.splits) == ["all"] and result.manifest.classes is None
    images, labels = open_dataset(str(tmp_path / "out")).load_split("all")
    assert images.shape == (3, 3, 4, 4) and labels.tolist() == [0, 0, 0]


def test_folder_bad_input(tmp_path, image_folder):
    with pytest.raises(ValueError, match=r"size: folder needs a positive image size"):
        prepare_dataset("folder", str(tmp_path / "out"), source=str(image_folder))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        prepare_dataset("folder", str(tmp_path / "out"), source=str(empty), size=4)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        prepare_dataset("folder", str(tmp_path / "out"), source=str(tmp_path / "nope"), size=4)
    (image_folder / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png: not a readable image"):
        prepare_dataset("folder", str(tmp_path / "out"), source=str(image_folder), size=4)


def test_unknown_dataset_and_option_name_the_allowed_values(tmp_path):
    with pytest.raises(ValueError, match=r"unknown name 'mnist'.*'cifar10'.*'digits'"):
        prepare_dataset("mnist", str(tmp_path))
    with pytest.raises(ValueError, match=r"digits: unknown option\(s\) \['size'\]"):
        prepare_dataset("digits", str(tmp_path), size=8)


def test_cli_data_prepare(tmp_path, cifar_tarball, capsys):
    path, md5, _ = cifar_tarball
    out = str(tmp_path / "cifar")
    argv = ["data", "prepare", "cifar10", "--out", out, "--source", str(path), "--md5", md5]
    assert main([*argv, "--shard-size", "8"]) == 0
    text = capsys.readouterr().out
    assert "(written)" in text and "3x32x32" in text and "train" in text and "test" in text
    assert main([*argv, "--shard-size", "8"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["data", "prepare", "cifar10", "--out", out, "--source", str(path)]) == 2
    assert "expected c58f30108f718f92721af3b95e74349a" in capsys.readouterr().err
    assert main(["data", "prepare", "svhn", "--out", out]) == 2
    assert "allowed values" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_cifar_batches_unpickle_arrays_and_nothing_else(protocol):
    data = np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072)
    blob = pickle.dumps({b"data": data, b"labels": [3, 4]}, protocol=protocol)
    if protocol == 0:  # as numpy 1 (and the official python-2 tarball) names the module
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    images, labels = cifar_batch(blob, "data_batch_1")
    np.testing.assert_array_equal(images.reshape(2, -1), data)
    assert labels.tolist() == [3, 4]

    class Payload:
        def __reduce__(self):
            return (print, ("not allowed",))

    with pytest.raises(
        pickle.UnpicklingError, match=r"refusing to load (__builtin__|builtins)\.print"
    ):
        cifar_batch(pickle.dumps({b"data": Payload()}, protocol=protocol), "data_batch_1")
