"""The demo's sweep file (`make demo`) passes validation and its dry run, and keeps the shape
a scaling study needs: budgets about 2x apart, sizes ordered by parameters, one trial per
size (compute-prefix sharing). The demo itself trains for minutes: not part of the tests."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.grid import expand, load_sweep

DEMO = Path(__file__).resolve().parents[3] / "sweeps" / "demo.yaml"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default storage and MLflow land in the test's directory


def test_demo_sweep_validates_and_dry_runs(capsys, tmp_path):
    assert main(["submit", str(DEMO), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "digits-xs" in out, out
    assert not (tmp_path / "diffscale_runs").exists()  # a dry run starts nothing


def test_demo_grid_is_a_scaling_grid():
    plan = expand(load_sweep(DEMO))
    budgets = sorted(plan.spec.grid["budget.flops"])
    assert len(budgets) >= 5
    ratios = [b / a for a, b in itertools.pairwise(budgets)]
    assert all(math.isclose(r, 2.0, rel_tol=0.25) for r in ratios), ratios
    sizes = plan.spec.grid["model.name"]
    assert len(plan.trials) == len(sizes)  # one trial per size serves every budget
    params = [t.params for t in plan.trials]
    assert params == sorted(params) and len(set(params)) == len(params), params
    ratios = [b / a for a, b in itertools.pairwise(params)]  # a geometric ladder, ~2x apart
    assert all(1.4 <= r <= 2.8 for r in ratios), ratios
