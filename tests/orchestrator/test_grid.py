"""Sweep files -> cells -> trials, validation, and dry runs of the bundled sweeps (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffusion.data import storage
from diffusion.data.shards import Manifest, write_manifest, write_split
from orchestrator.cli import main
from orchestrator.grid import expand, load_sweep
from orchestrator.validation import ConfigError

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"
BUNDLED = sorted(p.name for p in SWEEPS.glob("*.yaml"))

SMALL = {
    "name": "g",
    "model": {"name": "digits-xs"},
    "diffusion": {"num_timesteps": 100},
    "train": {"batch_size": 32},
    "eval": {"num_points": 1, "fid_samples": 16, "sample_steps": "10"},
    "grid": {"model.name": ["digits-xs", "digits-s"], "budget.steps": [10, 20, 40]},
}


def write(tmp_path: Path, d: dict | str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(d if isinstance(d, str) else yaml.safe_dump(d, sort_keys=False))
    return path


def fake_dataset(root: Path, shape: tuple[int, int, int], splits=("train", "test")) -> str:
    """A tiny prepared dataset (random uint8 images) in the Parquet shard format."""
    fs, path = storage.resolve(str(root))
    rng = np.random.default_rng(0)
    infos = {}
    for split in splits:
        images = rng.integers(0, 256, (8, *shape), dtype=np.uint8)
        infos[split] = write_split(fs, path, "fake", split, shape, [(images, np.zeros(8))])
    write_manifest(fs, path, Manifest(dataset="fake", splits=infos))
    return str(root)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default storage and MLflow land in the test's directory


def test_grid_is_the_product_and_prefix_sharing_serves_every_budget(tmp_path):
    spec = load_sweep(write(tmp_path, SMALL))
    plan = expand(spec)
    assert [c.id for c in plan.cells] == [f"c{i:02d}" for i in range(6)]
    assert len(plan.trials) == 2  # one per size, to the largest budget
    for trial in plan.trials:
        assert trial.steps == 40 and trial.config.budget.steps == 40
        assert sorted(trial.cell_steps.values()) == [10, 20, 40]
        assert trial.config.eval.eval_steps(40)[-3:] == [10, 20, 40]
        assert trial.config.storage.path.endswith("/g/trials")
        assert json.loads(trial.tags("g")["cells"])[0] == {
            "cell": trial.cells[0].id, "budget": "steps=10", "step": 10}  # fmt: skip
    # 70 steps of cells served by 40 steps of trial, per size
    assert plan.cell_flops * 40 == plan.trial_flops * 70
    assert "43% saved" in plan.saving()
    unshared = expand(load_sweep(write(tmp_path, {**SMALL, "share_compute_prefix": False})))
    assert len(unshared.trials) == 6 and unshared.trial_flops == unshared.cell_flops


def test_flops_budgets_become_steps_per_size(tmp_path):
    d = {**SMALL, "grid": {"model.name": ["digits-xs", "digits-m"], "budget.flops": [1e11, 4e11]}}
    plan = expand(load_sweep(write(tmp_path, d)))
    small, big = plan.trials
    assert small.forward_flops < big.forward_flops and small.steps > big.steps
    for trial in plan.trials:  # each cell's compute is its budget, rounded up to a whole step
        for cell in trial.cells:
            spent = 3 * trial.forward_flops * trial.cell_steps[cell.id] * 32
            assert (
                cell.config.budget.flops
                <= spent
                < cell.config.budget.flops + 3 * trial.forward_flops * 32
            )


def test_include_exclude_aliases_size_resources_and_overrides(tmp_path):
    d = {**SMALL, "grid": {"model.channels": [32, 64], "train.lr": [1e-3, 3e-4]},
         "budget": {"steps": 10},
         "exclude": [{"model.channels": 64, "train.lr": 3e-4}],
         "include": [{"model.name": "digits-m", "train.seed": 7}],
         "size_resources": {"digits-xs-c64": {"num_workers": 2}}}  # fmt: skip
    path = write(tmp_path, d)
    plan = expand(load_sweep(path))
    values = [c.values for c in plan.cells]
    assert {"model.overrides.model_channels": 64, "train.lr": 3e-4} not in values
    assert values[-1] == {"model.name": "digits-m", "train.seed": 7}
    assert len(plan.trials) == 4  # 3 grid cells + 1 include, budgets all equal
    workers = {t.size: t.config.resources.num_workers for t in plan.trials}
    assert workers == {"digits-xs-c32": 1, "digits-xs-c64": 2, "digits-m": 1}
    spec = load_sweep(
        path, ["train.batch_size=64", "grid.train.lr=[0.01]", "max_concurrent_trials=1"]
    )
    assert spec.max_concurrent_trials == 1 and spec.grid["train.lr"] == [0.01]
    assert {t.config.train.batch_size for t in expand(spec).trials} == {64}


BAD = [
    ("unknown key", {"trian": {}}, "trian: unknown key (did you mean 'train'?)"),
    ("unknown axis", {"grid": {"train.lrr": [1e-3]}},
     "grid: train.lrr: unknown key (did you mean 'lr'?)"),
    ("wrong type", {"grid": {"train.batch_size": ["big"]}},
     "grid.train.batch_size[0] = 'big': train.batch_size: expected an integer >= 1, got 'big'"),
    ("negative budget", {"grid": {"budget.flops": [1e12, -5.0]}},
     "grid.budget.flops[1] = -5.0: budget.flops: expected null or a number > 0, got -5.0"),
    ("unknown size", {"grid": {"model.name": ["digits-xs", "digits-xxl"]}},
     "grid.model.name[1] = 'digits-xxl': model.name: expected one of ["),
    ("impossible workers", {"resources": {"num_workers": 3}},
     "train.batch_size: expected a multiple of resources.num_workers=3, got 32"),
    ("zero workers", {"size_resources": {"digits-xs": {"num_workers": 0}}},
     "size_resources.digits-xs: resources.num_workers: expected an integer >= 1, got 0"),
    ("unknown size", {"size_resources": {"digits-s": {"num_workers": 2}}},
     "size_resources.digits-s: no such size in the sweep"),
    ("missing dataset", {"data": {"dataset": "./nowhere/cifar10"}},
     "data.dataset: ./nowhere/cifar10: no manifest.json"),
    ("duplicate axis", {"grid": {"model.channels": [32], "model.model_channels": [64]}},
     "grid.model.model_channels: duplicate axis: the same key as grid.model.channels"),
    ("duplicate value", {"grid": {"train.seed": [1, 1]}}, "grid.train.seed: duplicate values 1"),
    ("two budget axes", {"grid": {"budget.steps": [1], "budget.flops": [1e9]}},
     "grid: at most one budget axis"),
    ("bad sampler", {"eval": {"sampling": ["ddim50@fixed_large"]}},
     "eval.sampling: 'ddim50@fixed_large'"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "change", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_sweeps_exit_2_with_file_key_and_allowed_values(
    tmp_path, capsys, case, change, message
):
    import ray

    d = {k: v for k, v in SMALL.items() if k != "grid"} | {"grid": {"model.name": ["digits-xs"]}}
    for key, value in change.items():
        d[key] = {**d[key], **value} if isinstance(d.get(key), dict) and key != "grid" else value
    path = write(tmp_path, d)
    assert main(["submit", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: " in err and message in err, err
    assert not ray.is_initialized() and not (tmp_path / "diffscale_runs").exists()


def test_duplicate_yaml_key_and_every_problem_at_once(tmp_path, capsys):
    text = "name: g\ngrid:\n  train.lr: [0.1]\n  train.lr: [0.2]\n"
    assert main(["submit", str(write(tmp_path, text))]) == 2
    assert "duplicate key 'train.lr'" in capsys.readouterr().err
    d = {
        **SMALL,
        "trian": {},
        "grid": {"train.lrr": [1], "budget.steps": [0]},
        "max_concurrent_trials": 0,
    }
    with pytest.raises(ConfigError) as error:
        load_sweep(write(tmp_path, d))
    keys = [k for k, _ in error.value.problems]
    assert {"trian", "max_concurrent_trials"} <= set(keys) and any("train.lrr" in k for k in keys)


def test_dataset_shape_and_splits_are_checked(tmp_path):
    data = fake_dataset(tmp_path / "rgb", (3, 8, 8), splits=("train",))
    d = {**SMALL, "data": {"dataset": data, "eval_split": "test"}}
    with pytest.raises(ConfigError) as error:
        load_sweep(write(tmp_path, d))
    text = str(error.value)
    assert "has no split 'test'; it has ['train']" in text and "holds 3x8x8 images" in text


def bundled_overrides(name: str, tmp_path: Path) -> list[str]:
    """Point a bundled sweep at a fake prepared dataset of the right shape."""
    d = yaml.safe_load((SWEEPS / name).read_text())
    dataset = d.get("data", {}).get("dataset", "digits")
    if dataset == "digits":
        return []
    size = 64 if "imagenet64" in name else 32
    splits = (d["data"].get("train_split", "train"), d["data"].get("eval_split", "test"))
    return [f"data.dataset={fake_dataset(tmp_path / 'data', (3, size, size), splits)}"]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_sweeps_validate_and_dry_run(tmp_path, capsys, name):
    import ray

    args = ["submit", str(SWEEPS / name), "--dry-run"]
    for item in bundled_overrides(name, tmp_path):
        args += ["--set", item]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    spec = load_sweep(SWEEPS / name, bundled_overrides(name, tmp_path))
    plan = expand(spec)
    assert f"{len(plan.cells)} cells in {len(plan.trials)} trials" in out
    assert all(c.id in out for c in plan.cells) and "train FLOPs" in out
    assert not ray.is_initialized() and not (tmp_path / "diffscale_runs").exists()


def test_bundled_studies_match_the_paper(tmp_path):
    name = "ablation_imagenet64.yaml"
    ablation = expand(load_sweep(SWEEPS / name, bundled_overrides(name, tmp_path)))
    rows = [(c.config.budget.steps, c.config.diffusion.num_timesteps, c.config.diffusion.schedule,
             c.config.diffusion.objective) for c in ablation.cells]  # fmt: skip
    k200, m15 = 200_000, 1_500_000
    assert rows == [(k200, 1000, "linear", "simple"), (k200, 4000, "linear", "simple"),
                    (k200, 4000, "linear", "hybrid"), (k200, 4000, "cosine", "simple"),
                    (k200, 4000, "cosine", "hybrid"), (k200, 4000, "cosine", "vlb"),
                    (m15, 4000, "cosine", "hybrid"), (m15, 4000, "cosine", "vlb")]  # fmt: skip
    assert len(ablation.trials) == 6  # the 1.5M-step rows continue their 200K-step rows
    assert {c.config.train.lr for c in ablation.cells} == {1e-4}
    name = "scaling_imagenet64.yaml"
    scaling = expand(load_sweep(SWEEPS / name, bundled_overrides(name, tmp_path)))
    assert [t.params for t in scaling.trials] == [30303494, 68126598, 121063942, 272281350]
    assert {c.config.diffusion.objective for c in scaling.cells} == {"hybrid"}


def test_cli_dry_run_shows_the_plan(tmp_path, capsys):
    assert main(["submit", str(write(tmp_path, SMALL)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 cells in 2 trials" in out and "43% saved by compute-prefix sharing" in out
    assert "g-t00-digits-xs @ 10" in out and "g-t01-digits-s" in out
