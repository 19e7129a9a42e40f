"""`diffscale isoflop` through orchestrator.cli.main, on a sweep logged to real SQLite MLflow
whose cells follow a known Chinchilla law L(N, D) (D = images seen, C = 6 N D)."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from orchestrator.cli import main

from .mlflow_data import experiment, log_parent, log_run, trial_tags

E, A, B, ALPHA, BETA = 1.8172, 482.01, 2085.43, 0.3478, 0.3658
TRUE_A = BETA / (ALPHA + BETA)
BATCH = 128
LADDER = np.geomspace(2e5, 3e9, 15)
BUDGETS = (1e15, 1e16, 1e17, 1e18)


def _n_opt(c: float) -> float:
    return (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA)) * (c / 6) ** TRUE_A


def _isoflop_sweep(uri: str, artifacts: Path, budget_kind: str = "flops") -> str:
    """One prefix-shared trial per size; each size runs the budgets whose optimum lies near
    it (the 7 sizes nearest each N_opt), as an IsoFLOP design does."""
    client, sweep = MlflowClient(uri), f"iso-{uuid.uuid4().hex[:6]}"
    exp_id = experiment(client, sweep, str(artifacts))
    parent = log_parent(client, exp_id, sweep)
    rng = np.random.default_rng(0)
    plan: dict[int, list[float]] = {}
    for c in BUDGETS:
        for i in np.argsort(np.abs(np.log(LADDER / _n_opt(c))))[:7]:
            plan.setdefault(int(i), []).append(c)
    for i, budgets in sorted(plan.items()):
        n = float(LADDER[i])
        per_step = 6 * n * BATCH
        cells, nll, flops, images = [], {}, {}, {}
        for j, c in enumerate(sorted(budgets)):
            step = max(1, round(c / per_step))
            label = f"flops={c:g}" if budget_kind == "flops" else f"steps={step}"
            cells.append({"cell": f"c{i:02d}{j}", "budget": label, "step": step})
            d = step * BATCH
            nll[step] = (E + A / n**ALPHA + B / d**BETA) * math.exp(rng.normal(0, 0.003))
            flops[step], images[step] = float(step * per_step), float(d)
        log_run(
            client,
            exp_id,
            f"{sweep}-s{i}",
            tags=trial_tags(sweep, f"t{i}", f"s{i}", cells[-1]["budget"]),
            parent=parent,
            params={"model.name": f"s{i}", "model.params": int(n)},
            metrics={"eval/nll_bpd": nll, "compute/flops": flops, "compute/images": images},
            cells=cells,
        )
    return sweep


@pytest.fixture
def uri(sqlite_uri: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    return sqlite_uri


def test_isoflop_recovers_the_allocation_exponent_both_ways(uri, tmp_path, capsys) -> None:
    sweep = _isoflop_sweep(uri, tmp_path / "artifacts")
    assert main(["isoflop", sweep, "--json", "--bootstrap", "100"]) == 0
    doc = json.loads(capsys.readouterr().out)
    iso = doc["isoflop"]
    assert [p["compute"] for p in iso["profiles"]] == list(BUDGETS)
    assert all(p["n_opt"] is not None for p in iso["profiles"]), iso["warnings"]
    lo, hi = iso["interval"]
    assert lo < TRUE_A < hi and abs(iso["a"] - TRUE_A) < 0.05
    chin = doc["chinchilla"]
    assert chin["interval"][0] <= chin["a"] <= chin["interval"][1]
    assert abs(chin["a"] - TRUE_A) < 0.05
    out = tmp_path / "outputs" / "analysis" / sweep / "nll_bpd-vs-params-isoflop"
    assert (out / "isoflop.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "fit.json").read_text())["isoflop"]["a"] == iso["a"]
    artifacts = MlflowClient(uri).list_artifacts(
        doc["logged_to_run"], f"analysis/{doc['fit_name']}"
    )
    listed = {a.path for a in artifacts}
    assert listed == {f"analysis/{doc['fit_name']}/{f}" for f in ("isoflop.png", "fit.json")}

    # the table form prints both estimates in plain words
    assert main(["isoflop", sweep, "--bootstrap", "50", "--no-log"]) == 0
    text = capsys.readouterr().out
    assert "IsoFLOP profiles (approach 2)" in text and "beta/(alpha+beta)" in text
    assert "N_opt = k C^a" in text


def test_isoflop_refuses_a_sweep_without_a_flops_budget(uri, tmp_path, capsys) -> None:
    sweep = _isoflop_sweep(uri, tmp_path / "artifacts", budget_kind="steps")
    assert main(["isoflop", sweep, "--no-log"]) == 2
    err = capsys.readouterr().err
    assert "need a budget.flops grid axis" in err and "steps=" in err
    assert "Traceback" not in err


def test_summary_says_in_words_what_the_fits_found(uri, tmp_path, capsys) -> None:
    sweep = _isoflop_sweep(uri, tmp_path / "artifacts")
    assert main(["summary", sweep]) == 0  # before any fit: the cells, and what to run
    text = capsys.readouterr().out
    assert f"not fitted yet (run: diffscale isoflop {sweep})" in text
    assert f"not fitted yet (run: diffscale fit {sweep})" in text

    assert main(["isoflop", sweep, "--bootstrap", "50", "--no-log", "--json"]) == 0
    iso = json.loads(capsys.readouterr().out)["isoflop"]
    assert main(["fit", sweep, "--form", "power", "--bootstrap", "50", "--no-log"]) == 0
    capsys.readouterr()
    assert main(["summary", sweep, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    # the winner at each budget is the size of lowest loss among those trained to it
    for w in doc["winners"]:
        profile = next(p for p in iso["profiles"] if p["compute"] == w["compute"])
        assert w["params"] == profile["params"][int(np.argmin(profile["metric"]))]
    assert len(doc["frontier"]) >= 3
    assert all(
        b["params"] > a["params"]
        for a, b in zip(doc["frontier"], doc["frontier"][1:], strict=False)
    )
    assert doc["isoflop"]["isoflop"]["a"] == iso["a"]
    assert doc["compute_fit"]["form"] == "power"

    assert main(["summary", sweep]) == 0
    text = capsys.readouterr().out
    last = doc["winners"][-1]
    assert f"the best size is {last['size']}" in text
    assert "larger sizes win at larger budgets" in text
    lo, hi = iso["interval"]
    assert f"a = {iso['a']:.3g} [{lo:.3g}, {hi:.3g}] (95%)" in text
    assert "Frontier law" in text and "alpha = " in text
    assert f"mlflow ui --backend-store-uri {uri}" in text


def test_summary_of_an_unknown_sweep_is_bad_input(uri, capsys) -> None:
    assert main(["summary", "no-such-sweep"]) == 2
    err = capsys.readouterr().err
    assert "diffscale summary: error:" in err and "no-such-sweep" in err
    assert "Traceback" not in err
