"""The FID Inception extractor, run on a weights file this test makes: pytorch-fid's FID
architecture with random weights, saved under pytorch-fid's file name in a temporary torch
hub cache. No download ever happens."""

import numpy as np
import pytest
import torch
from pytorch_fid import inception as pytorch_fid_inception

from diffusion.metrics import get_feature_extractor
from diffusion.metrics.inception import (
    build_fid_inception,
    fid_inception_weights_path,
    load_fid_inception,
)

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds random FID Inception weights."""
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_fid_inception()
        for m in net.modules():  # non-trivial batch-norm statistics, so they are tested too
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), home / "hub" / "checkpoints" / WEIGHTS_NAME)
    return home


@pytest.fixture
def hub_cache(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    assert torch.hub.get_dir() == str(torch_home / "hub"), "torch.hub.set_dir was called"
    return torch_home / "hub"


def images(n=2, channels=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


def test_features_from_hub_cache_match_pytorch_fid(hub_cache):
    extractor = get_feature_extractor("inception", batch_size=1)
    assert (extractor.name, extractor.dim, extractor.fd_metric) == ("inception", 2048, "fid")
    assert extractor.info["weights"] == str(hub_cache / "checkpoints" / WEIGHTS_NAME)
    x = images()
    feats = extractor(x)
    assert feats.shape == (2, 2048) and feats.dtype == np.float32
    assert np.all(np.isfinite(feats)) and feats.std() > 0
    # pytorch-fid's own model finds the same cached file (no download) and must agree
    reference = pytorch_fid_inception.InceptionV3([3]).eval()
    with torch.no_grad():
        expected = reference((x + 1) / 2)[0].squeeze(-1).squeeze(-1).numpy()  # [2, 2048]
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_uint8_grey_digits_equal_their_rgb_float_version(torch_home):
    weights = torch_home / "hub" / "checkpoints" / WEIGHTS_NAME
    extractor = get_feature_extractor("inception", weights_path=weights)
    grey = torch.randint(0, 256, (2, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    rgb = (grey.float() / 127.5 - 1).expand(-1, 3, -1, -1)
    np.testing.assert_allclose(
        extractor(grey.to(torch.uint8)), extractor(rgb), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="channels"):
        extractor(images(channels=2))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        extractor(images() * 255)


def test_missing_weights_error_names_url_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected_path = tmp_path / "hub" / "checkpoints" / WEIGHTS_NAME
    assert fid_inception_weights_path() == expected_path
    with pytest.raises(FileNotFoundError) as info:
        get_feature_extractor("inception")
    message = str(info.value)
    assert pytorch_fid_inception.FID_WEIGHTS_URL in message
    assert str(expected_path) in message and "allow_download=True" in message
    with pytest.raises(FileNotFoundError, match=r"elsewhere\.pth"):
        get_feature_extractor("inception", weights_path=tmp_path / "elsewhere.pth")


def test_download_only_through_pytorch_fid_when_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []

    def fake_download():
        calls.append(1)
        return torch.nn.Identity()

    monkeypatch.setattr(pytorch_fid_inception, "fid_inception_v3", fake_download)
    with pytest.raises(FileNotFoundError):
        load_fid_inception()
    assert calls == []
    assert isinstance(load_fid_inception(allow_download=True), torch.nn.Identity)
    assert calls == [1]
