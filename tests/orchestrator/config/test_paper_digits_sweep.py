"""The paper's ablation in miniature (sweeps/paper_digits.yaml) passes validation and its dry
run, has every row at one step budget with 3 seeds, and feeds every finding of `diffscale
paper`: its cells, read as the rows the findings compare, leave no finding missing a row or a
metric. Training it is not part of the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusion.schedules import space_timesteps
from orchestrator.analysis.findings import FD, NLL, Row, paper_findings
from orchestrator.cli import main
from orchestrator.config import parse_sampler
from orchestrator.grid import load_plan
from orchestrator.names import TRAIN_OBJECTIVE_VAR, sampling_metric

SWEEP = Path(__file__).resolve().parents[3] / "sweeps" / "paper_digits.yaml"
ROWS = {  # (T, schedule, objective, var_type, timestep sampler): the paper's ablation rows
    (1000, "linear", "simple", "fixed_small", "uniform"),
    (4000, "linear", "simple", "fixed_small", "uniform"),
    (1000, "linear", "hybrid", "learned_range", "uniform"),
    (1000, "cosine", "simple", "fixed_small", "uniform"),
    (1000, "cosine", "hybrid", "learned_range", "uniform"),
    (1000, "cosine", "vlb", "learned_range", "uniform"),
    (1000, "cosine", "vlb", "learned_range", "loss-second-moment"),
}


@pytest.fixture(scope="module")
def plan():
    return load_plan(SWEEP)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default storage and MLflow land in the test's directory


def test_paper_digits_validates_and_dry_runs(capsys, tmp_path):
    assert main(["submit", str(SWEEP), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sweep paper-digits: 21 cells, 21 trials"), out[:200]
    assert not (tmp_path / "diffscale_runs").exists()  # a dry run starts nothing
    assert not (tmp_path / "mlflow.db").exists()


def _key(cell) -> tuple:
    d, t = cell.config.diffusion, cell.config.train
    return (d.num_timesteps, d.schedule, d.objective, d.var_type, t.timestep_sampler)


def test_every_row_has_three_seeds_at_one_budget(plan):
    seeds: dict[tuple, set[int]] = {}
    for cell in plan.cells:
        seeds.setdefault(_key(cell), set()).add(cell.config.train.seed)
        cfg = cell.config
        assert (cfg.model.name, cfg.train.batch_size, cfg.train.lr) == ("digits-xs", 64, 1e-3)
        assert cfg.data.dataset == "digits" and cfg.budget.steps == 500
    assert set(seeds) == ROWS
    assert all(s == {0, 1, 2} for s in seeds.values()), seeds
    studies = {_key(c): c.config.eval.sampling for c in plan.cells if c.config.eval.sampling}
    assert set(studies) == {
        (1000, "cosine", "simple", "fixed_small", "uniform"),
        (1000, "cosine", "hybrid", "learned_range", "uniform"),
    }
    for key, samplers in studies.items():
        assert {"10", "25", "50", "100", "1000", "ddim25", "ddim50"} <= set(samplers)
        fixed_large = {s for s in samplers if s.endswith("@fixed_large")}
        wanted = {f"{k}@fixed_large" for k in (10, 25, 50, 100, 1000)}
        assert fixed_large == (wanted if key[2] == "simple" else set()), key


def _metrics(cell) -> dict[str, float]:
    """The names of what the cell's trial logs that the findings read (values made up)."""
    cfg = cell.config
    names = {NLL: 3.0, FD: 1.0}
    if cfg.diffusion.objective == "vlb":
        names[TRAIN_OBJECTIVE_VAR] = 1.0
    for item in cfg.eval.sampling:
        method, spacing, var = parse_sampler(item)
        steps = len(space_timesteps(cfg.diffusion.num_timesteps, spacing))
        names[sampling_metric("digits_fd", f"{method}_{var}" if var else method, steps)] = 1.0
    return names


def test_the_sweep_feeds_every_finding(plan):
    groups: dict[tuple, list] = {}
    for cell in plan.cells:
        groups.setdefault(_key(cell), []).append(cell)
    rows = []
    for (T, schedule, objective, var_type, sampler), cells in groups.items():
        values: dict[str, dict[int, float]] = {}
        for cell in cells:  # a seed-dependent value, so that every effect has an interval
            for name, v in _metrics(cell).items():
                values.setdefault(name, {})[cell.config.train.seed] = v + cell.config.train.seed
        rows.append(Row(1000, T, schedule, objective, var_type, sampler, "digits-xs", values, ()))
    findings = paper_findings(rows)
    assert [f.number for f in findings] == [1, 2, 3, 4, 5, 6]
    for f in findings:
        assert not f.verdict.startswith(("missing", "too few")), (f.number, f.verdict)
        assert f.judged and all(c.effect and c.effect.n == 3 for c in f.judged), f
