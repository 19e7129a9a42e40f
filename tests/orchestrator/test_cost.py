"""orchestrator.cost: the FLOPs of an eval point (against a hand count, the properties of its
parts, and the FLOPs measured on a real eval point), the GPU-hours of a trial on W workers,
and the sweep's ``cost:`` section through the real CLI (no Ray)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffusion.flops import feature_flops_per_image, forward_flops_per_image, training_flops
from diffusion.metrics import get_feature_extractor
from diffusion.unet import UNet
from orchestrator.cli import main
from orchestrator.config import DEFAULT_DEVICE_TFLOPS, CostConfig, TrialConfig
from orchestrator.cost import (
    EVAL_CHUNK,
    eval_point_flops,
    eval_point_parts,
    slowest_share,
    trial_cost,
    trial_eval_flops,
)
from orchestrator.evaluate import Shard, evaluate_trial
from orchestrator.evaluate.point import TRIAL_EVAL_BATCH
from orchestrator.grid import load_plan
from tests.orchestrator.sweep_files import SMALL, write

T = 20  # the tiny process's steps


def tiny(budget: int = 30, workers: int = 1, **eval_changes) -> TrialConfig:
    return TrialConfig.from_dict(
        {
            "name": "tiny",
            "diffusion": {"num_timesteps": T, "objective": "simple", "var_type": "fixed_small"},
            "train": {"batch_size": 8},
            "budget": {"steps": budget},
            "resources": {"num_workers": workers},
            "eval": {
                "num_points": 2,
                "nll_images": 8,
                "nll_timesteps": 3,
                "fid_samples": 10,
                "grid_samples": 4,
                "sample_steps": "5",
                **eval_changes,
            },
        }
    )


FWD = forward_flops_per_image(tiny().model_config())
FEAT = feature_flops_per_image("digits")


def knn(real: int, fake: int) -> int:
    """Precision/recall by hand: real x real, fake x fake and fake x real squared distances,
    2 x 128 FLOPs per pair of the digits features."""
    return 2 * 128 * (real * real + fake * fake + fake * real)


def test_an_eval_point_is_its_hand_count():
    # 8 NLL images x 3 terms + 10 samples x 5 steps forwards; 8 real + 10 fake images of
    # features; precision/recall over 8 real and 10 fake features
    hand = (8 * 3 + 10 * 5) * FWD + (8 + 10) * FEAT + knn(8, 10)
    assert eval_point_flops(tiny(), FWD, final=False) == hand
    # the grid draws more samples than the FD: max(fid, grid) are drawn and featurised
    more = tiny(grid_samples=16)
    hand = (8 * 3 + 16 * 5) * FWD + (8 + 16) * FEAT + knn(8, 10)
    assert eval_point_flops(more, FWD, final=False) == hand
    # no FD: no features, only the grid's samples
    none = tiny(fid_samples=0)
    assert eval_point_flops(none, FWD, final=False) == (8 * 3 + 4 * 5) * FWD


@pytest.mark.parametrize("final", [False, True])
def test_doubling_fid_samples_adds_the_sampling_and_features_of_the_extra_samples(final):
    one, two = tiny(fid_samples=10), tiny(fid_samples=20)
    # sampling forwards and the feature network per extra sample; precision/recall grows
    extra = 10 * (5 * FWD + FEAT) + knn(8, 20) - knn(8, 10)
    added = eval_point_flops(two, FWD, final=final) - eval_point_flops(one, FWD, final=final)
    assert added == extra


def test_full_nll_at_end_costs_nll_images_times_T_forwards():
    cfg = tiny(full_nll_at_end=True)
    middle, end = (eval_point_flops(cfg, FWD, final=f) for f in (False, True))
    assert end - middle == 8 * (T - 3) * FWD  # T terms instead of 3; the prior needs no forward
    assert middle == eval_point_flops(tiny(), FWD, final=False)  # only the final point


def test_the_sampling_study_runs_at_the_final_point_only():
    cfg = tiny(sampling=["ddim4", "5@fixed_large", "10,5"])
    assert eval_point_flops(cfg, FWD, final=False) == eval_point_flops(tiny(), FWD, final=False)
    study = eval_point_flops(cfg, FWD, final=True) - eval_point_flops(tiny(), FWD, final=True)
    assert study == 10 * ((4 + 5 + 15) * FWD + 3 * FEAT)  # fid_samples per sampler, its steps


def test_a_trial_pays_for_every_eval_point_and_the_final_one_once():
    cfg = tiny(budget=30, at_steps=[7], full_nll_at_end=True)
    points = cfg.eval.eval_steps(30)
    assert 7 in points and points[-1] == 30 and len(points) >= 3
    middle, end = (eval_point_flops(cfg, FWD, final=f) for f in (False, True))
    assert trial_eval_flops(cfg, FWD) == (len(points) - 1) * middle + end


def test_the_count_is_what_a_real_eval_point_computes(tmp_path, monkeypatch):
    """FLOPs measured by FlopCounterMode around evaluate_trial (the UNet and the digits
    classifier, every forward) equal the plan's count, at a middle and at the final point."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    get_feature_extractor("digits")  # train and cache the classifier outside the counter
    cfg = tiny(full_nll_at_end=True, sampling=["ddim4", "3"], grid_samples=12)
    torch.manual_seed(0)
    model = UNet(cfg.model_config()).eval()
    diffusion = cfg.diffusion.build()
    for final in (False, True):
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH):
            evaluate_trial(cfg, diffusion, model, torch.device("cpu"), step=3, final=final)
        assert counter.get_total_flops() == eval_point_flops(cfg, FWD, final=final), final


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
@pytest.mark.parametrize("count", [0, 1, 64, 65, 200, 2000])
def test_the_slowest_share_is_the_busiest_rank_of_the_real_chunks(workers, count):
    assert EVAL_CHUNK == TRIAL_EVAL_BATCH  # the plan shards as the evaluation does
    ranks = [sum(map(len, Shard(r, workers).chunks(count, EVAL_CHUNK))) for r in range(workers)]
    assert slowest_share(count, workers) == max(ranks)


def test_gpu_hours_count_every_worker_for_the_whole_wall_time():
    cost = CostConfig(device_tflops=2.0, usd_per_gpu_hour=3.0)
    per_gpu = 2.0e12 * 3600  # FLOPs of one GPU-hour
    # balanced: 128 NLL images and 128 samples in 2 chunks, batch 8 on 2 workers
    cfg = tiny(workers=2, nll_images=128, fid_samples=128, grid_samples=0)
    c = trial_cost(cfg, FWD, cost)
    assert c.train_flops == training_flops(FWD, 30 * 8) and c.eval_flops == trial_eval_flops(
        cfg, FWD
    )
    # every rank computes precision/recall whole: the other rank's copy is charged too
    replicated = len(cfg.eval.eval_steps(30)) * knn(128, 128)
    assert c.gpu_hours * per_gpu == pytest.approx(c.train_flops + c.eval_flops + replicated)
    assert c.usd == pytest.approx(3.0 * c.gpu_hours)
    # 64 samples are one chunk: on 8 workers one rank draws them while 7 wait
    one = tiny(workers=8, nll_images=64, fid_samples=64, grid_samples=0)
    c8, c1 = trial_cost(one, FWD, cost), trial_cost(tiny(nll_images=64, fid_samples=64), FWD, cost)
    assert c8.eval_flops == c1.eval_flops
    points = len(one.eval.eval_steps(30))
    idle = 7 * points * sum(p.flops for p in eval_point_parts(one, FWD, final=False))
    assert c8.gpu_hours * per_gpu == pytest.approx(c1.gpu_hours * per_gpu + idle, rel=1e-12)
    assert trial_cost(cfg, FWD, CostConfig()).usd is None


# ---------------------------------------------------------------- the sweep's cost section
def _dry_run(tmp_path, capsys, sweep: dict, *sets: str) -> tuple[int, str, str]:
    import ray

    args = ["submit", str(write(tmp_path, sweep)), "--dry-run"]
    for item in sets:
        args += ["--set", item]
    code = main(args)
    out, err = capsys.readouterr()
    assert not ray.is_initialized() and not (tmp_path / "diffscale_runs").exists()
    return code, out, err


@pytest.mark.parametrize(
    "cost,sets,message",
    [
        ({"device_tflops": -5}, [], "cost.device_tflops: expected a number > 0, got -5"),
        ({"device_tflops": 0}, [], "cost.device_tflops: expected a number > 0, got 0"),
        ({"device_tflops": "fast"}, [], "cost.device_tflops: expected a number > 0, got 'fast'"),
        ({}, ["cost.device_tflops=true"], "cost.device_tflops: expected a number > 0, got True"),
        (
            {"usd_per_gpu_hour": -1},
            [],
            "cost.usd_per_gpu_hour: expected null or a number > 0, got -1",
        ),
        (
            {"device_flops": 100},
            [],
            "cost.device_flops: unknown key (did you mean 'device_tflops'?); "
            "allowed: ['device_tflops', 'usd_per_gpu_hour']",
        ),
        ([100], [], "cost: expected a mapping, got [100]"),
    ],
)
def test_a_bad_cost_section_names_file_key_and_allowed(tmp_path, capsys, cost, sets, message):
    code, out, err = _dry_run(tmp_path, capsys, {**SMALL, "cost": cost}, *sets)
    assert code == 2 and out == ""
    assert f"{tmp_path / 'sweep.yaml'}: {message}" in err


def test_the_dry_run_prices_the_sweep_at_its_cost(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = _dry_run(tmp_path, capsys, SMALL)
    assert code == 0 and "eval FLOPs" in out and "GPU-h" in out and " $ " not in out
    assert f"at {DEFAULT_DEVICE_TFLOPS:g} TFLOP/s sustained per GPU" in out
    cost = {"device_tflops": 50, "usd_per_gpu_hour": 4}
    code, out, _ = _dry_run(tmp_path, capsys, {**SMALL, "cost": cost}, "cost.device_tflops=25")
    assert code == 0 and "at 25 TFLOP/s sustained per GPU" in out and "at $4/GPU-hour" in out
    header = out.splitlines()[1].split()
    assert header[header.index("GPU-h") + 1] == "$"
    plan = load_plan(write(tmp_path, {**SMALL, "cost": cost}), ["cost.device_tflops=25"])
    hours = sum(t.cost(plan.spec.cost).gpu_hours for t in plan.trials)
    assert plan.spec.cost == CostConfig(device_tflops=25, usd_per_gpu_hour=4)
    assert f"{hours:.3g} GPU-hours at" in out and f"${4 * hours:.2g} at $4/GPU-hour" in out
