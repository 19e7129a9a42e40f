"""``diffscale eval --workers N`` on real Ray Train workers (a local Ray cluster for the
module, CPU): the same numbers on 1 and 2 workers, the sampling study included."""

import dataclasses
import json
import os

import pytest
import ray
import torch

from diffusion.config import DiffusionConfig
from diffusion.unet import build_model, get_model_config
from orchestrator.checkpoint import save_checkpoint
from orchestrator.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-workers")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["XDG_CACHE_HOME"] = str(root / "cache")  # the digits classifier, shared
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_model_config("digits-xs"), learn_sigma=False)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = model.state_dict()
    diffusion = DiffusionConfig(num_timesteps=40, var_type="fixed_small", objective="simple")
    meta = {"model": cfg.to_dict(), "diffusion": diffusion.to_dict(), "step": 3}
    path = save_checkpoint(root / "ckpt", {"model": state, "ema": state}, meta)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield path
    ray.shutdown()


def evaluate(checkpoint, out, capsys, *extra):
    args = [
        *("eval", str(checkpoint), "--json", "--out", str(out)),
        *("--num-images", "40", "--num-samples", "40", "--batch-size", "16"),
        *("--nll-timesteps", "4", "--sample-steps", "5"),
        *("--sampling", "5", "ddim5", "5@fixed_large"),
        *("--threads", "1"),  # CPU kernels may round differently at other thread counts
        *extra,
    ]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_two_workers_give_the_numbers_of_one(checkpoint, tmp_path, capsys):
    one = evaluate(checkpoint, tmp_path / "one", capsys)
    two = evaluate(checkpoint, tmp_path / "two", capsys, "--workers", "2")
    assert (one["workers"], two["workers"]) == (1, 2)
    assert one["seconds"] > 0 and two["seconds"] > 0
    for key in ("nll_bpd", "nll_stderr", "digits_fd", "precision", "recall"):
        assert two[key] == one[key], key  # bit-identical on the CPU
    assert len(one["sampling"]) == 3 and two["sampling"] == one["sampling"]
    assert (tmp_path / "two" / "eval.json").is_file() and (
        tmp_path / "two" / "samples.png"
    ).is_file()
    assert json.loads((tmp_path / "two" / "eval.json").read_text())["workers"] == 2


def test_a_bad_worker_count_names_the_flag(checkpoint, tmp_path, capsys):
    assert main(["eval", str(checkpoint), "--workers", "0", "--out", str(tmp_path)]) == 2
    assert "--workers: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["eval", str(checkpoint), "--threads", "-2", "--out", str(tmp_path)]) == 2
    assert "--threads: must be >= 1, got -2" in capsys.readouterr().err
