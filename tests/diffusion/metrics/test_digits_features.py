"""The offline digits feature extractor ("digits_fd", not FID): deterministic training,
file cache, accuracy, and a Frechet distance that separates real digits from noise."""

import numpy as np
import pytest
import torch

from diffusion.data.digits import load_digits_uint8
from diffusion.images import to_model_range
from diffusion.metrics import (
    FEATURE_EXTRACTORS,
    digits_features,
    feature_statistics,
    frechet_distance,
    get_feature_extractor,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("diffscale_cache")


@pytest.fixture(scope="module")
def extractor(cache_dir):
    """Trains once (into cache_dir) for the whole module."""
    return get_feature_extractor("digits", cache_dir=cache_dir)


def test_trained_classifier_is_accurate_and_labelled_honestly(extractor, cache_dir):
    assert (extractor.name, extractor.dim, extractor.fd_metric) == ("digits", 128, "digits_fd")
    assert extractor.info["test_accuracy"] > 0.9
    assert extractor.info["version"] == digits_features.DIGITS_CLASSIFIER_VERSION
    assert extractor.info["path"].startswith(str(cache_dir))


def test_training_is_deterministic(extractor):
    model, accuracy = digits_features.train_digits_classifier(seed=0)
    assert accuracy == extractor.info["test_accuracy"]
    cached = extractor.model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, cached[key]), key
    x = load_digits_uint8("test")[0][:64]
    with torch.no_grad():
        features = model.features(torch.from_numpy(x).float() / 255)  # uint8 -> [0, 1]
    np.testing.assert_array_equal(features.numpy(), extractor(x))


def test_second_call_loads_the_cache_without_training(extractor, cache_dir, monkeypatch):
    def no_training(seed=0):
        raise AssertionError("retrained despite a valid cache")

    monkeypatch.setattr(digits_features, "train_digits_classifier", no_training)
    again = get_feature_extractor("digits", cache_dir=cache_dir)
    assert again.info == extractor.info
    x = load_digits_uint8("test")[0]
    np.testing.assert_array_equal(again(x), extractor(x))


def test_stale_cache_version_is_retrained(extractor, tmp_path, monkeypatch):
    path = tmp_path / "classifier.pt"
    path.write_bytes(open(extractor.info["path"], "rb").read())
    calls = []

    def fake_training(seed=0):
        calls.append(seed)
        return digits_features.DigitsClassifier().eval(), 0.5

    monkeypatch.setattr(digits_features, "train_digits_classifier", fake_training)
    monkeypatch.setattr(digits_features, "DIGITS_CLASSIFIER_VERSION", "v-next")
    _, info = digits_features.load_or_train_digits_classifier(path)
    assert calls == [0] and info["version"] == "v-next"
    _, info = digits_features.load_or_train_digits_classifier(path)  # now cached
    assert calls == [0] and info["test_accuracy"] == 0.5


def test_digits_fd_separates_real_from_noise(extractor):
    train = extractor(to_model_range(load_digits_uint8("train")[0]))
    test = extractor(load_digits_uint8("test")[0])
    noise = np.random.default_rng(0).integers(0, 256, size=(297, 1, 8, 8), dtype=np.uint8)
    stats = feature_statistics(train)
    real_vs_real = frechet_distance(*stats, *feature_statistics(test))
    real_vs_noise = frechet_distance(*stats, *feature_statistics(extractor(noise)))
    assert real_vs_real < 0.05 * real_vs_noise, (real_vs_real, real_vs_noise)


def test_input_errors(extractor):
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        extractor(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        extractor(torch.full((2, 1, 8, 8), 255.0))
    with pytest.raises(ValueError, match="inception"):
        get_feature_extractor("clip")
    assert tuple(FEATURE_EXTRACTORS) == ("inception", "digits")
