"""diffusion.config: DiffusionConfig builds, validates and round-trips."""

import numpy as np
import pytest

from diffusion.config import DiffusionConfig
from diffusion.schedules import get_beta_schedule


def test_diffusion_config_builds_validates_and_round_trips():
    cfg = DiffusionConfig(num_timesteps=100, schedule="linear", objective="vlb")
    d = cfg.build()
    assert d.num_timesteps == 100 and d.objective == "vlb" and d.rescale_timesteps
    assert np.array_equal(d.betas, get_beta_schedule("linear", 100))
    assert DiffusionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="schedule"):
        DiffusionConfig(schedule="sigmoid")
    with pytest.raises(ValueError, match="var_type"):
        DiffusionConfig(var_type="fixed_large")  # hybrid needs a learned variance
    with pytest.raises(ValueError, match=r"unknown keys \['T'\]"):
        DiffusionConfig.from_dict({"T": 10})
