import json

import pytest
import torch
from PIL import Image

from diffusion.gaussian import DiffusionConfig
from diffusion.unet import build_model, get_model_config
from orchestrator.checkpoint import save_checkpoint
from orchestrator.cli import main
from orchestrator.evaluate import EvalOptions, evaluate_checkpoint


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # digits classifier cache
    torch.manual_seed(0)
    cfg = get_model_config("digits-xs")
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = model.state_dict()
    meta = {"model": cfg.to_dict(), "diffusion": DiffusionConfig(num_timesteps=50).to_dict(),
            "step": 3}  # fmt: skip
    return save_checkpoint(tmp_path / "ckpt", {"model": state, "ema": state}, meta)


def test_evaluate_checkpoint_on_digits(checkpoint, tmp_path):
    options = EvalOptions(num_images=40, num_samples=40, nll_timesteps=5, sample_steps="10",
                          batch_size=20)  # fmt: skip
    result = evaluate_checkpoint(checkpoint, options, tmp_path / "eval")
    assert result["nll_kind"].startswith("unbiased estimate from 5 of T=50")
    assert result["nll_bpd"] > 0 and result["nll_stderr"] > 0
    assert "fid" not in result and result["digits_fd"] > 0  # honest name: not Inception FID
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["step"] == 3
    with Image.open(tmp_path / "eval" / "samples.png") as im:
        assert im.size[0] > 0


def test_eval_cli_prints_a_table_or_json(checkpoint, tmp_path, capsys):
    args = ["eval", str(checkpoint), "--num-images", "24", "--num-samples", "24",
            "--nll", "subset", "--nll-timesteps", "3", "--sample-steps", "5",
            "--out", str(tmp_path / "e")]  # fmt: skip
    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"nll_bpd", "digits_fd", "precision", "recall", "samples_png"}
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out and "digits_fd" in out


def test_eval_options_are_validated():
    with pytest.raises(ValueError, match="nll"):
        EvalOptions(nll="approx")
    with pytest.raises(ValueError, match="sample_method"):
        EvalOptions(sample_method="euler")


def test_real_images_come_from_prepared_shards_too(tmp_path):
    from diffusion.data import load_digits_uint8, prepare_dataset
    from orchestrator.evaluate import load_real_images

    uri = str(tmp_path / "digits-shards")
    prepare_dataset("digits", uri, shard_size=100)
    images = load_real_images(uri, "test", limit=150)  # spans two shards, stops early
    assert images.shape == (150, 1, 8, 8)
    test_set = {im.tobytes() for im in load_digits_uint8("test")[0]}
    assert all(im.tobytes() in test_set for im in images)  # the test split, shuffled or not
    with pytest.raises(ValueError, match="no split 'val'"):
        load_real_images(uri, "val", limit=5)
