"""The end-of-training sampling study of a trial (``eval.sampling``), without Ray."""

from __future__ import annotations

import pytest
import torch

from diffusion.data import to_model_range
from diffusion.metrics import feature_statistics, get_feature_extractor
from diffusion.unet import UNet
from orchestrator.config import TrialConfig, parse_sampler
from orchestrator.evaluate import load_real_images
from orchestrator.train import _sampling_study


@pytest.mark.parametrize(
    ("item", "parsed"),
    [("100", ("ancestral", "100", None)), ("ddim50", ("ddim", "ddim50", None)),
     ("10,15", ("ancestral", "10,15", None)),
     ("25@fixed_large", ("ancestral", "25", "fixed_large"))],
)  # fmt: skip
def test_sampler_specs_parse(item, parsed):
    assert parse_sampler(item) == parsed


@pytest.mark.parametrize("item", ["", "ddim", "50@learned", "ddim50@fixed_small", "fifty"])
def test_bad_sampler_specs_are_refused(item):
    with pytest.raises(ValueError, match=r"expected|must be one of"):
        parse_sampler(item)


def test_learned_sigma_cannot_borrow_a_fixed_variance():
    with pytest.raises(ValueError, match="needs a fixed variance"):
        TrialConfig.from_dict({"name": "t", "diffusion": {"var_type": "learned_range"},
                               "eval": {"sampling": ["10@fixed_large"]}})  # fmt: skip


def test_sampling_study_logs_fd_per_method_and_step_count(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = TrialConfig.from_dict({
        "name": "s", "diffusion": {"num_timesteps": 20, "objective": "simple",
                                   "var_type": "fixed_small"},
        "eval": {"fid_samples": 8, "nll_images": 16, "nll_timesteps": 5, "sample_steps": "5",
                 "sampling": ["5", "ddim5", "5@fixed_large", "20"]},
    })  # fmt: skip
    torch.manual_seed(0)
    model = UNet(cfg.model_config()).eval()
    real_x = to_model_range(load_real_images("digits", "test", 16))
    extractor = get_feature_extractor("digits")
    out = _sampling_study(cfg, model, torch.device("cpu"), real_x.shape[1:], extractor,
                          feature_statistics(extractor(real_x)))  # fmt: skip
    assert sorted(out) == [
        "sampling/digits_fd/ancestral/20", "sampling/digits_fd/ancestral/5",
        "sampling/digits_fd/ancestral_fixed_large/5", "sampling/digits_fd/ddim/5",
    ]  # fmt: skip
    assert all(v > 0 for v in out.values())
    assert len(set(out.values())) == 4  # four different samplers, four different distances
