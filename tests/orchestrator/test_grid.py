"""Sweep specs -> cells -> trials (compute-prefix sharing), and dry runs of the bundled
sweeps (no Ray)."""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import main
from orchestrator.grid import expand, load_sweep
from tests.orchestrator.sweep_files import BUNDLED, SMALL, SWEEPS, bundled_overrides, write


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
            "cell": trial.cells[0].id,
            "budget": "steps=10",
            "step": 10,
        }
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
    d = {
        **SMALL,
        "grid": {"model.channels": [32, 64], "train.lr": [1e-3, 3e-4]},
        "budget": {"steps": 10},
        "exclude": [{"model.channels": 64, "train.lr": 3e-4}],
        "include": [{"model.name": "digits-m", "train.seed": 7}],
        "size_resources": {"digits-xs-c64": {"num_workers": 2}},
    }
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
    assert "eval FLOPs" in out and "GPU-h" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("c")}
    costs = [t.cost(spec.cost) for t in plan.trials]
    for trial, cost in zip(plan.trials, costs, strict=True):
        assert cost.eval_flops > 0 and cost.gpu_hours > 0
        last = next(c.id for c in trial.cells if trial.cell_steps[c.id] == trial.steps)
        assert f" {cost.eval_flops:.3g} " in rows[last] and f" {cost.gpu_hours:.3g} " in rows[last]
    train, evals = sum(c.train_flops for c in costs), sum(c.eval_flops for c in costs)
    assert train == plan.trial_flops
    share = round(100 * evals / (train + evals))
    assert f"+ {evals:.3g} evaluation FLOPs ({share}%)" in out
    assert f"{sum(c.gpu_hours for c in costs):.3g} GPU-hours at 125 TFLOP/s" in out
    assert not ray.is_initialized() and not (tmp_path / "diffscale_runs").exists()


def test_bundled_studies_match_the_paper(tmp_path):
    name = "ablation_imagenet64.yaml"
    ablation = expand(load_sweep(SWEEPS / name, bundled_overrides(name, tmp_path)))
    rows = [
        (
            c.config.budget.steps,
            c.config.diffusion.num_timesteps,
            c.config.diffusion.schedule,
            c.config.diffusion.objective,
        )
        for c in ablation.cells
    ]
    k200, m15 = 200_000, 1_500_000
    assert rows == [
        (k200, 1000, "linear", "simple"),
        (k200, 4000, "linear", "simple"),
        (k200, 4000, "linear", "hybrid"),
        (k200, 4000, "cosine", "simple"),
        (k200, 4000, "cosine", "hybrid"),
        (k200, 4000, "cosine", "vlb"),
        (m15, 4000, "cosine", "hybrid"),
        (m15, 4000, "cosine", "vlb"),
    ]
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
