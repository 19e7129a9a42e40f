"""`diffscale status` and `--help` stay light: building the parser, and the status of a sweep
folder, import no torch, Ray, MLflow, scipy, matplotlib, pyarrow (parser) or pandas. A guard
on what gets imported (in a fresh interpreter), not a timing: every subcommand module that
orchestrator.cli registers keeps its heavy imports inside its handlers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from diffusion.data.registry import DATASETS
from diffusion.likelihood import NLL_KINDS
from diffusion.metrics.registry import FEATURE_EXTRACTORS
from diffusion.sampling import SAMPLING_METHODS
from orchestrator import choices
from orchestrator.analysis.fit import FORMS
from orchestrator.names import SWEEP_DRIVER, SWEEP_RECORD
from orchestrator.sweep.store import store_for

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "mlflow", "scipy", "matplotlib", "pyarrow", "pandas", "sklearn")


def heavy_modules_after(code: str) -> list[str]:
    """The top-level packages of HEAVY that a fresh interpreter has loaded after ``code``."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_building_the_parser_imports_nothing_heavy() -> None:
    code = (
        "from orchestrator.cli import build_parser\n"
        "parser = build_parser()\n"
        "parser.format_help()\n"
        "parser.parse_args(['status', 'demo'])\n"
        "parser.parse_args(['eval', 'ckpt', '--nll', 'full', '--features', 'digits'])"
    )
    assert heavy_modules_after(code) == []


def test_the_checker_sees_a_heavy_import() -> None:
    assert heavy_modules_after("import orchestrator.analysis.report") != []


def test_status_reads_the_sweep_folder_without_torch_ray_or_mlflow(tmp_path: Path) -> None:
    store = store_for("light", str(tmp_path))
    trial = "light-t00-digits-xs"
    store.write(
        SWEEP_RECORD,
        {
            "name": "light",
            "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "experiment": "light",
            "trials": {trial: {"size": "digits-xs", "steps": 40, "cells": {"c00": 40}}},
        },
    )
    store.write(SWEEP_DRIVER, {"state": "finished", "heartbeat": time.time()})
    store.update_trial(
        trial, status="FINISHED", step=40, metrics={"eval/nll_bpd": 4.5123}, metrics_step=40
    )
    code = (
        "from orchestrator.cli import main\n"
        f"assert main(['status', 'light', '--storage', {str(tmp_path)!r}]) == 0"
    )
    loaded = heavy_modules_after(code)
    assert set(loaded) <= {"pyarrow"}, loaded  # the store reads through pyarrow.fs
    shown = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "status", "light", "--storage", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "MLflow run" not in shown.stdout and "--mlflow" in shown.stdout
    row = rf"{trial}\s+digits-xs\s+FINISHED\s+40/40\s+1\s+40\s+4.5123\s+-\n"
    assert re.search(row, shown.stdout), shown.stdout


def test_the_light_choices_match_the_registries() -> None:
    assert choices.DATASET_NAMES == tuple(DATASETS)
    assert choices.NLL_KINDS == NLL_KINDS
    assert choices.SAMPLING_METHODS == SAMPLING_METHODS
    assert choices.FEATURE_EXTRACTOR_NAMES == tuple(sorted(FEATURE_EXTRACTORS))
    assert choices.FIT_FORMS == FORMS
