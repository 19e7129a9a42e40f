"""diffusion.data.registry: one declaration per dataset, looked up by name."""

import inspect

import numpy as np
import pytest

from diffusion.data import (
    DATASETS,
    PREPARERS,
    DatasetSpec,
    builtin_dataset,
    default_features,
    get_dataset,
    load_digits_uint8,
)
from diffusion.metrics import FEATURE_EXTRACTORS


def test_every_dataset_is_registered_once_under_its_own_name():
    assert list(DATASETS) == ["digits", "cifar10", "imagenet64", "folder"]
    for name, spec in DATASETS.items():
        assert isinstance(spec, DatasetSpec) and spec.name == name
        assert spec.features in FEATURE_EXTRACTORS
        assert callable(spec.source) and inspect.signature(spec.source)
    assert PREPARERS == {name: spec.source for name, spec in DATASETS.items()}


def test_get_dataset_names_the_allowed_values():
    assert get_dataset("cifar10") is DATASETS["cifar10"]
    with pytest.raises(ValueError, match=r"dataset: unknown name 'mnist'; allowed values: \["):
        get_dataset("mnist")
    with pytest.raises(ValueError) as info:
        get_dataset("")
    assert all(repr(name) in str(info.value) for name in DATASETS)


@pytest.mark.parametrize("name", list(DATASETS))
def test_only_builtin_names_are_builtin_and_uris_never_are(name):
    spec = DATASETS[name]
    assert builtin_dataset(name) is (spec if spec.builtin else None)
    for uri in (f"s3://bucket/{name}", f"/data/{name}", f"./{name}", ""):
        assert builtin_dataset(uri) is None
        assert default_features(uri) == "inception"
    assert default_features(name) == (spec.features if spec.builtin else "inception")


def test_the_builtin_dataset_loads_its_splits_offline():
    (spec,) = [s for s in DATASETS.values() if s.builtin]
    for split in spec.splits:
        images = spec.load_split(split)
        assert images.dtype == np.uint8 and images.shape[1:] == spec.image_shape
        assert np.array_equal(images, load_digits_uint8(split)[0])
    with pytest.raises(ValueError, match=r"split: got 'val'; allowed values"):
        spec.load_split("val")


@pytest.mark.parametrize("name", [n for n, s in DATASETS.items() if not s.builtin])
def test_prepared_datasets_cannot_be_loaded_by_name(name):
    with pytest.raises(ValueError, match="not built in"):
        DATASETS[name].load_split("train")


def test_builtin_source_matches_its_declaration():
    for spec in DATASETS.values():
        if spec.builtin:
            source = spec.source()
            assert source.dataset == spec.name and source.shape == spec.image_shape
            assert tuple(source.splits) == spec.splits


def test_prepared_sources_match_their_declaration(cifar_tarball, imagenet_dir):
    path, md5, _ = cifar_tarball
    sources = {
        "cifar10": DATASETS["cifar10"].source(path, md5=md5),
        "imagenet64": DATASETS["imagenet64"].source(imagenet_dir[0]),
    }
    for name, source in sources.items():
        spec = DATASETS[name]
        assert source.dataset == name and source.shape == spec.image_shape
        assert tuple(source.splits) == spec.splits
