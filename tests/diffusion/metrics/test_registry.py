"""diffusion.metrics.registry: feature extractors by name."""

import pytest

from diffusion.metrics import FEATURE_EXTRACTORS, FeatureExtractor, get_feature_extractor


def test_registry_maps_names_to_extractor_factories():
    assert list(FEATURE_EXTRACTORS) == ["inception", "digits"]  # order of the allowed values
    for name, factory in FEATURE_EXTRACTORS.items():
        assert issubclass(factory, FeatureExtractor) and factory.name == name
    assert "digits" in FEATURE_EXTRACTORS and "clip" not in FEATURE_EXTRACTORS


def test_unknown_extractor_names_the_allowed_values():
    with pytest.raises(
        ValueError,
        match=r"feature extractor: got 'clip'; allowed values: \['inception', 'digits'\]",
    ):
        get_feature_extractor("clip")
