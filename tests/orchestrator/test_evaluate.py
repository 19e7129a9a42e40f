"""orchestrator.evaluate: ``diffscale eval`` on a checkpoint, the real images, a trial's
end-of-training sampling study (``eval.sampling``), and sharding over processes, without
Ray (a real gloo process group of 2 processes)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.config import DiffusionConfig
from diffusion.data import load_digits_uint8, prepare_dataset, to_model_range
from diffusion.likelihood import nll_per_image
from diffusion.metrics import feature_statistics, get_feature_extractor
from diffusion.unet import UNet, build_model, get_model_config
from orchestrator.checkpoint import save_checkpoint
from orchestrator.cli import main
from orchestrator.config import TrialConfig, parse_sampler
from orchestrator.evaluate import (
    EvalOptions,
    Shard,
    draw_samples,
    evaluate_checkpoint,
    evaluate_trial,
    load_real_images,
    sampling_study,
)


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
    meta = {
        "model": cfg.to_dict(),
        "diffusion": DiffusionConfig(num_timesteps=50).to_dict(),
        "step": 3,
    }
    return save_checkpoint(tmp_path / "ckpt", {"model": state, "ema": state}, meta)


def test_evaluate_checkpoint_on_digits(checkpoint, tmp_path):
    options = EvalOptions(
        num_images=40, num_samples=40, nll_timesteps=5, sample_steps="10", batch_size=20
    )
    stages, counts = [], []
    result = evaluate_checkpoint(
        checkpoint,
        options,
        tmp_path / "eval",
        progress=stages.append,
        count=lambda done, total: counts.append((done, total)),
    )
    assert stages[0].startswith("NLL (subset) on 40 test images")  # each stage announced
    assert counts == [(20, 40), (40, 40)]  # the NLL's images, one batch at a time
    assert result["nll_kind"].startswith("unbiased estimate from 5 of T=50")
    assert result["nll_bpd"] > 0 and result["nll_stderr"] > 0
    assert "fid" not in result and result["digits_fd"] > 0  # honest name: not Inception FID
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["step"] == 3
    with Image.open(tmp_path / "eval" / "samples.png") as im:
        assert im.size[0] > 0


def test_eval_cli_prints_a_table_or_json(checkpoint, tmp_path, capsys):
    args = [
        *("eval", str(checkpoint)),
        *("--num-images", "24", "--num-samples", "24"),
        *("--nll", "subset", "--nll-timesteps", "3", "--sample-steps", "5"),
        *("--out", str(tmp_path / "e")),
    ]
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
    uri = str(tmp_path / "digits-shards")
    prepare_dataset("digits", uri, shard_size=100)
    images = load_real_images(uri, "test", limit=150)  # spans two shards, stops early
    assert images.shape == (150, 1, 8, 8)
    test_set = {im.tobytes() for im in load_digits_uint8("test")[0]}
    assert all(im.tobytes() in test_set for im in images)  # the test split, shuffled or not
    with pytest.raises(ValueError, match="no split 'val'"):
        load_real_images(uri, "val", limit=5)


# ---------------------------------------------------------------- the sampling study
@pytest.mark.parametrize(
    ("item", "parsed"),
    [
        ("100", ("ancestral", "100", None)),
        ("ddim50", ("ddim", "ddim50", None)),
        ("10,15", ("ancestral", "10,15", None)),
        ("25@fixed_large", ("ancestral", "25", "fixed_large")),
    ],
)
def test_sampler_specs_parse(item, parsed):
    assert parse_sampler(item) == parsed


@pytest.mark.parametrize("item", ["", "ddim", "50@learned", "ddim50@fixed_small", "fifty"])
def test_bad_sampler_specs_are_refused(item):
    with pytest.raises(ValueError, match=r"expected|must be one of"):
        parse_sampler(item)


def test_learned_sigma_cannot_borrow_a_fixed_variance():
    with pytest.raises(ValueError, match="needs a fixed variance"):
        TrialConfig.from_dict(
            {
                "name": "t",
                "diffusion": {"var_type": "learned_range"},
                "eval": {"sampling": ["10@fixed_large"]},
            }
        )


def study_config(**eval_changes) -> TrialConfig:
    return TrialConfig.from_dict(
        {
            "name": "s",
            "diffusion": {"num_timesteps": 20, "objective": "simple", "var_type": "fixed_small"},
            "eval": {
                "fid_samples": 8,
                "nll_images": 16,
                "nll_timesteps": 5,
                "sample_steps": "5",
                "sampling": ["5", "ddim5", "5@fixed_large", "20"],
                **eval_changes,
            },
        }
    )


def test_sampling_study_logs_fd_per_method_and_step_count(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = study_config()
    torch.manual_seed(0)
    model = UNet(cfg.model_config()).eval()
    real_x = to_model_range(load_real_images("digits", "test", 16))
    extractor = get_feature_extractor("digits")
    out = sampling_study(
        cfg.diffusion,
        model,
        samplers=cfg.eval.sampling,
        num_samples=cfg.eval.fid_samples,
        seed=cfg.train.seed,
        image_shape=real_x.shape[1:],
        extractor=extractor,
        real_stats=feature_statistics(extractor(real_x)),
        device=torch.device("cpu"),
    )
    assert sorted(out) == [
        "sampling/digits_fd/ancestral/20",
        "sampling/digits_fd/ancestral/5",
        "sampling/digits_fd/ancestral_fixed_large/5",
        "sampling/digits_fd/ddim/5",
    ]
    assert all(v > 0 for v in out.values())
    assert len(set(out.values())) == 4  # four different samplers, four different distances


def test_a_trial_eval_point_names_its_metrics_and_keeps_its_grid(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = study_config(grid_samples=12, full_nll_at_end=True)
    torch.manual_seed(0)
    model = UNet(cfg.model_config()).eval()
    diffusion, cpu = cfg.diffusion.build(), torch.device("cpu")
    middle = evaluate_trial(cfg, diffusion, model, cpu, step=7, final=False)
    end = evaluate_trial(cfg, diffusion, model, cpu, step=7, final=True)
    point = {"eval/nll_bpd", "eval/nll_stderr", "eval/digits_fd", "eval/precision", "eval/recall"}
    assert set(middle.metrics) == point
    study = {k for k in end.metrics if k.startswith("sampling/")}
    assert set(end.metrics) == point | {"eval/nll_bpd_full"} | study and len(study) == 4
    assert end.metrics["eval/nll_bpd_full"] == end.metrics["eval/nll_bpd"]
    assert end.metrics["eval/digits_fd"] == middle.metrics["eval/digits_fd"]  # same seed, step
    assert middle.grid.shape == (12, 1, 8, 8) and torch.equal(middle.grid, end.grid)
    no_grid = evaluate_trial(
        study_config(grid_samples=0), diffusion, model, cpu, step=1, final=False
    )
    assert no_grid.grid is None


# ---------------------------------------------------------------- sharding over workers
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("count", [0, 1, 63, 64, 65, 200])
def test_shards_cover_every_index_once_in_fixed_chunks(world, count):
    ranks = [Shard(r, world).chunks(count, 64) for r in range(world)]
    chunks = [c for rank in ranks for c in rank]
    assert [i for c in chunks for i in c] == list(range(count))  # rank order = index order
    assert chunks == Shard().chunks(count, 64)  # the same chunks whatever the world size
    assert max(len(r) for r in ranks) - min(len(r) for r in ranks) <= 1


def test_shard_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="out of range"):
        Shard(2, 2)
    with pytest.raises(ValueError, match="size"):
        Shard().chunks(10, 0)


def test_samples_and_nll_of_shards_evaluated_apart_equal_the_whole(tmp_path, monkeypatch):
    """Without a process group: each rank's chunks computed separately and concatenated in
    rank order give exactly the one-worker samples and per-image bits/dim."""
    cfg = study_config()
    torch.manual_seed(0)
    model = UNet(cfg.model_config()).eval()
    diffusion, cpu = cfg.diffusion.build(), torch.device("cpu")
    real_x = to_model_range(load_real_images("digits", "test", 20))

    def samples(shard):
        chunks = shard.chunks(20, 8)
        kw = {"steps": "5", "entropy": (0, 9), "device": cpu}
        return torch.cat([draw_samples(diffusion, model, c, (1, 8, 8), **kw) for c in chunks])

    def nll(shard):
        chunks = shard.chunks(20, 8)
        return nll_per_image(
            diffusion,
            model,
            [real_x[c.start : c.stop] for c in chunks],
            kind="subset",
            timesteps_per_image=4,
            seed=3,
            image_seeds=[j for c in chunks for j in c],
        )

    for world in (2, 3):
        shards = [Shard(r, world) for r in range(world)]
        assert torch.equal(torch.cat([samples(s) for s in shards]), samples(Shard()))
        assert np.array_equal(np.concatenate([nll(s) for s in shards]), nll(Shard()))


def _eval_point_rank(rank: int, world: int, init: str, cfg_dict: dict, out: str) -> None:
    """One rank of a real gloo process group: the final eval point (NLL, FD, P/R, study)."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = TrialConfig.from_dict(cfg_dict)
        torch.manual_seed(0)
        model = UNet(cfg.model_config()).eval()
        result = evaluate_trial(
            cfg, cfg.diffusion.build(), model, torch.device("cpu"), step=5, final=True
        )
        torch.save({"metrics": result.metrics, "grid": result.grid}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_an_eval_point_on_two_processes_equals_one_process(tmp_path, monkeypatch):
    """Every metric of a final eval point (NLL, FD, precision/recall, sampling study) and
    its grid are the same on one process and on each rank of a 2-process gloo group."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = study_config(fid_samples=80, nll_images=70, grid_samples=70, sampling=["5", "ddim5"])
    get_feature_extractor("digits")  # trains and caches the classifier once, before the ranks
    init = f"file://{tmp_path / 'pg'}"
    torch.multiprocessing.spawn(
        _eval_point_rank, args=(2, init, cfg.to_dict(), str(tmp_path)), nprocs=2, join=True
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = UNet(cfg.model_config()).eval()
        one = evaluate_trial(
            cfg, cfg.diffusion.build(), model, torch.device("cpu"), step=5, final=True
        )
    finally:
        torch.set_num_threads(threads)
    assert len([k for k in one.metrics if k.startswith("sampling/")]) == 2
    assert one.model_forwards == 70 * 5 + 80 * 5 + 2 * 80 * 5
    for rank in (0, 1):
        two = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert two["metrics"] == one.metrics  # exactly equal, every metric
        assert torch.equal(two["grid"], one.grid)
