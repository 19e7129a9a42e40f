import json

from PIL import Image

from orchestrator.cli import main
from orchestrator.demo import DemoConfig, run_demo


def test_demo_trains_evaluates_and_writes_samples(tmp_path):
    config = DemoConfig(
        seconds=600,
        max_steps=150,
        num_timesteps=100,
        eval_images=8,
        num_samples=9,
        sample_steps="10",
        ema_rate=0.9,
    )
    result = run_demo(config, tmp_path, progress=False)
    assert result["steps"] == 150 and result["images_seen"] == 150 * 64
    assert result["bpd_after"] < result["bpd_before"] - 0.5  # training helps, clearly
    assert json.loads((tmp_path / "result.json").read_text())["bpd_after"] == result["bpd_after"]
    with Image.open(tmp_path / "samples.png") as im:
        assert im.size == (4 * (3 * 9 + 1), 4 * (3 * 9 + 1))


def test_cli_models_lists_the_ladder(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "cifar10-w64-b2" in out and "9.93M" in out and "3.26" in out
