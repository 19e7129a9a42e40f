import json

import pytest
import torch

from diffusion.config import DiffusionConfig
from diffusion.unet import build_model, get_model_config
from orchestrator.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_checkpoint,
    save_checkpoint,
)


def make(tmp_path, name="ckpt"):
    torch.manual_seed(0)
    cfg = get_model_config("digits-xs")
    model = build_model(cfg)
    ema = build_model(cfg)
    meta = {
        "model": cfg.to_dict(),
        "diffusion": DiffusionConfig(num_timesteps=50).to_dict(),
        "step": 7,
    }
    tensors = {"model": model.state_dict(), "ema": ema.state_dict()}
    path = save_checkpoint(tmp_path / name, tensors, meta)
    return path, model


def test_round_trip_rebuilds_the_model_and_process(tmp_path):
    path, model = make(tmp_path)
    ckpt = load_model_checkpoint(path)
    for a, b in zip(model.state_dict().values(), ckpt.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert ckpt.diffusion.num_timesteps == 50 and ckpt.meta["step"] == 7
    assert not ckpt.ema_model.training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left over


def test_replacing_a_checkpoint_is_atomic_and_leaves_no_debris(tmp_path):
    make(tmp_path)
    path, _ = make(tmp_path)
    tensors, meta = load_checkpoint(path)
    assert set(tensors) == {"model", "ema"} and meta["step"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_truncated_file_and_missing_manifest_are_detected(tmp_path):
    path, _ = make(tmp_path)
    data = (path / "ema.pt").read_bytes()
    (path / "ema.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"no manifest\.json"):
        load_checkpoint(path)


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path):
    path, _ = make(tmp_path)
    with pytest.raises(TypeError):
        save_checkpoint(path, {"model": {"x": torch.zeros(1)}}, {"bad": object()})
    _, meta = load_checkpoint(path)
    assert meta["step"] == 7 and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert json.loads((path / "manifest.json").read_text())["format_version"] == 1
