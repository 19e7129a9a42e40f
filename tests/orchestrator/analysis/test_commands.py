"""`diffscale fit` and `diffscale table` through orchestrator.cli.main, on sweeps logged to a
real SQLite MLflow store in the layout of DESIGN.md."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from orchestrator.cli import main

from .mlflow_data import experiment, log_parent, log_run, trial_tags

L_INF, C0, ALPHA = 2.0, 1e13, 0.3  # the frontier of the synthetic sweep: L_inf + (C0/C)^alpha
BATCH = 128
SIZES = {  # size: (params, forward FLOPs per image, compute above which the size saturates)
    "s": (1e6, 1e7, 1e14),
    "m": (3e6, 3e7, 1e15),
    "l": (1e7, 1e8, 1e17),
}


def _law(c: np.ndarray) -> np.ndarray:
    return L_INF + (C0 / c) ** ALPHA


def _scaling_sweep(uri: str, artifacts: Path, fd: bool = False) -> str:
    """Three sizes; each follows the law up to its saturation compute and bends up beyond it,
    so the compute-efficient frontier is exactly the law."""
    client, sweep = MlflowClient(uri), f"scale-{uuid.uuid4().hex[:6]}"
    exp_id = experiment(client, sweep, str(artifacts))
    parent = log_parent(client, exp_id, sweep)
    for size, (n, fpi, cap) in SIZES.items():
        per_step = 3 * fpi * BATCH  # training FLOPs per optimizer step
        steps = np.unique(np.round(np.geomspace(1e12 / per_step, 10 * cap / per_step, 9)))
        steps = steps.astype(int)
        compute = steps * per_step
        nll = _law(compute) + 0.3 * np.log10(np.maximum(compute / cap, 1.0)) ** 2
        final = int(steps[-1])
        log_run(
            client,
            exp_id,
            f"{sweep}-{size}",
            tags=trial_tags(sweep, f"t-{size}", size, f"flops={compute[-1]:.3g}"),
            parent=parent,
            params={"model.name": size, "model.params": int(n), "model.flops_per_image": fpi},
            metrics={
                "eval/nll_bpd": dict(zip(steps.tolist(), nll.tolist(), strict=True)),
                "compute/flops": dict(zip(steps.tolist(), compute.tolist(), strict=True)),
                "compute/images": {int(s): float(s * BATCH) for s in steps},
                "train/loss": {int(s): 0.1 for s in np.linspace(1, final, 20).astype(int)},
                "sampling/digits_fd/ancestral/50": {final: 2.0},
                "sampling/digits_fd/ancestral/100": {final: 1.5},
                **(
                    {"eval/digits_fd": {int(s): 40.0 * v for s, v in zip(steps, nll, strict=True)}}
                    if fd
                    else {}
                ),
            },
        )
    return sweep


@pytest.fixture
def uri(sqlite_uri: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.chdir(tmp_path)  # default --out lands in tmp_path
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)  # as a user would set it
    return sqlite_uri


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    return json.loads(out)  # exactly one JSON document, nothing else on stdout


def test_fit_sweep_json_recovers_the_frontier_law(uri, tmp_path, capsys) -> None:
    sweep = _scaling_sweep(uri, tmp_path / "artifacts")
    doc = _json(
        capsys,
        [
            "fit",
            sweep,
            "--metric",
            "eval/nll_bpd",
            "--json",
            "--bootstrap",
            "40",
            "--predict",
            "1e18",
            "1e19",
        ],
    )
    assert doc["form"] == "henighan" and doc["metric"] == "eval/nll_bpd" and doc["converged"]
    assert doc["L_inf"] == pytest.approx(L_INF, rel=1e-3)
    assert doc["C0"] == pytest.approx(C0, rel=2e-2)
    assert doc["alpha"] == pytest.approx(ALPHA, rel=1e-2)
    lo, hi = doc["intervals"]["alpha"]
    assert lo <= doc["alpha"] <= hi
    pred = doc["predictions"]
    assert [p["x"] for p in pred] == [1e18, 1e19]
    assert pred[0]["value"] == pytest.approx(_law(np.array(1e18)), rel=1e-3)
    assert pred[0]["low"] <= pred[0]["value"] <= pred[0]["high"]
    out = tmp_path / "outputs" / "analysis" / sweep / "nll_bpd-vs-compute-henighan"
    names = {"compute.png", "params.png", "sampling.png"}
    assert {Path(p).name for p in doc["plots"]} == names
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in names)
    assert json.loads((out / "fit.json").read_text())["alpha"] == doc["alpha"]
    parent = doc["logged_to_run"]
    listed = {
        a.path
        for a in MlflowClient(uri).list_artifacts(parent, "analysis/nll_bpd-vs-compute-henighan")
    }
    assert listed == {f"analysis/nll_bpd-vs-compute-henighan/{n}" for n in (*names, "fit.json")}

    # all points, not the frontier: the saturated tails no longer fit the law
    off = _json(
        capsys,
        [
            "fit",
            sweep,
            "--no-frontier",
            "--json",
            "--no-log",
            "--bootstrap",
            "0",
            "--out",
            str(tmp_path / "o2"),
        ],
    )
    assert off["n_points"] > doc["n_points"] and off["logged_to_run"] is None
    assert off["loss"] > 10 * doc["loss"] and off["r2_log"] < doc["r2_log"]


def test_fit_sweep_text_by_params_and_bad_input(uri, tmp_path, capsys) -> None:
    sweep = _scaling_sweep(uri, tmp_path / "artifacts")
    argv = ["fit", sweep, "--x", "params", "--no-log", "--bootstrap", "20", "--predict", "3e7"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "parameters at the largest compute of each of 3 sizes" in out
    for word in ("L_inf", "C0", "alpha", "95% interval", "R^2 (log)", "prediction at x=3e+07"):
        assert word in out

    assert main(["fit", sweep, "--metric", "eval/fid", "--no-log"]) == 2
    err = capsys.readouterr().err
    assert "'eval/fid' was not logged" in err and "eval/nll_bpd" in err
    assert main(["fit", "no-such-sweep"]) == 2
    assert "'no-such-sweep' does not exist" in capsys.readouterr().err
    assert main(["fit", sweep, "--table", "x.csv"]) == 2
    assert "exactly one of NAME" in capsys.readouterr().err
    assert main(["fit", sweep, "--x", "tokens", "--no-log"]) == 2
    assert "'compute' or 'params'" in capsys.readouterr().err


def test_fit_table_chinchilla_and_power(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    E, A, B, a, b = 1.8172, 482.01, 2085.43, 0.3478, 0.3658  # Besiroglu et al. 2024's refit
    rng = np.random.default_rng(0)
    n = np.repeat(np.geomspace(1e7, 1e10, 8), 6)
    d = np.tile(np.geomspace(1e9, 1e12, 6), 8)
    loss = (E + A / n**a + B / d**b) * np.exp(rng.normal(0, 0.002, n.size))
    lines = ["N,D,L,C"] + [f"{x},{y},{z},{6 * x * y}" for x, y, z in zip(n, d, loss, strict=True)]
    (tmp_path / "synth.csv").write_text("\n".join(lines) + "\n")
    argv = [
        "fit",
        "--table",
        "synth.csv",
        "--form",
        "chinchilla",
        "--n",
        "N",
        "--d",
        "D",
        "--loss",
        "L",
        "--bootstrap",
        "8",
        "--json",
        "--predict",
        "1e9",
        "1e11",
    ]
    doc = _json(capsys, argv)
    assert doc["form"] == "chinchilla" and doc["n_points"] == n.size
    assert doc["E"] == pytest.approx(E, rel=0.05)
    assert doc["alpha"] == pytest.approx(a, rel=0.15) and doc["beta"] == pytest.approx(b, rel=0.15)
    assert doc["predictions"][0]["N"] == 1e9
    assert doc["predictions"][0]["value"] == pytest.approx(E + A / 1e9**a + B / 1e11**b, rel=0.01)

    assert main([*argv[:10], "LOSS", "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert "'LOSS'" in err and "synth.csv" in err
    assert main(["fit", "--table", "synth.csv", "--form", "power", "--x", "C"]) == 2
    assert "needs --y" in capsys.readouterr().err
    assert main(["fit", "--table", "nope.csv", "--x", "C", "--y", "L"]) == 2
    assert "nope.csv" in capsys.readouterr().err

    assert (
        main(
            [
                "fit",
                "--table",
                "synth.csv",
                "--form",
                "power",
                "--x",
                "C",
                "--y",
                "L",
                "--bootstrap",
                "10",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "C0" in out and "alpha" in out
    assert (tmp_path / "outputs" / "analysis" / "synth" / "L-vs-C-power" / "fit.png").is_file()


def test_fits_of_two_metrics_keep_both_sets_of_files(uri, tmp_path, capsys) -> None:
    """The demo's own hint, `fit NAME --metric fid` after the NLL fit, must not overwrite it:
    each fit has its folder, on disk and on the parent run; re-running one replaces only it."""
    sweep = _scaling_sweep(uri, tmp_path / "artifacts", fd=True)
    root = tmp_path / "outputs" / "analysis" / sweep
    nll = _json(capsys, ["fit", sweep, "--metric", "nll", "--json", "--bootstrap", "5"])
    fd = _json(capsys, ["fit", sweep, "--metric", "fid", "--json", "--bootstrap", "5"])
    assert fd["metric"] == "eval/digits_fd" and nll["metric"] == "eval/nll_bpd"
    folders = {"nll_bpd-vs-compute-henighan", "digits_fd-vs-compute-henighan"}
    assert {p.name for p in root.iterdir()} == folders
    for name, doc in (("nll_bpd", nll), ("digits_fd", fd)):
        stored = json.loads((root / f"{name}-vs-compute-henighan" / "fit.json").read_text())
        assert stored["metric"] == doc["metric"] and stored["alpha"] == doc["alpha"]
        assert all(Path(p).parent.name == f"{name}-vs-compute-henighan" for p in doc["plots"])
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(nll["logged_to_run"], "analysis")}
    assert logged == {f"analysis/{f}" for f in folders}
    for folder in folders:
        files = {a.path for a in client.list_artifacts(nll["logged_to_run"], f"analysis/{folder}")}
        assert f"analysis/{folder}/fit.json" in files and f"analysis/{folder}/compute.png" in files
    fd_files = {p: p.stat().st_mtime_ns for p in (root / "digits_fd-vs-compute-henighan").iterdir()}
    again = _json(capsys, ["fit", sweep, "--metric", "nll", "--json", "--bootstrap", "5"])
    assert again["alpha"] == nll["alpha"]
    assert {p: p.stat().st_mtime_ns for p in fd_files} == fd_files  # the other fit untouched


def test_fit_text_output_names_every_file_and_each_warning_once(uri, tmp_path, capfd) -> None:
    sweep = _scaling_sweep(uri, tmp_path / "artifacts")
    # 3 sizes above 1e16 FLOPs: too few frontier points for 3 parameters, so warnings
    assert main(["fit", sweep, "--metric", "nll", "--min-compute", "3e16", "--bootstrap", "5"]) == 0
    captured = capfd.readouterr()
    text = captured.out + captured.err
    warnings = [line for line in text.splitlines() if "warning" in line.lower()]
    assert warnings, text
    assert len(warnings) == len(set(warnings)), text  # printed by the CLI only, once each
    assert "ABNORMAL" not in text
    folder = Path("outputs") / "analysis" / sweep / "nll_bpd-vs-compute-henighan"  # in cwd
    for name in ("compute.png", "params.png", "fit.json"):
        assert str(folder / name) in text and (tmp_path / folder / name).is_file(), text
    assert "under analysis/nll_bpd-vs-compute-henighan/" in text


def _ablation_sweep(uri: str, artifacts: Path) -> str:
    """The paper's cosine/hybrid T=4000 run with cells at 200K and 1.5M steps (full NLL only
    at 1.5M), a linear/simple T=1000 digits run (FD of digits features), and a run with an
    unpublished setting."""
    client, sweep = MlflowClient(uri), f"abl-{uuid.uuid4().hex[:6]}"
    exp_id = experiment(client, sweep, str(artifacts))
    parent = log_parent(client, exp_id, sweep)

    def trial(name, T, schedule, objective, metrics, cells):
        log_run(
            client,
            exp_id,
            name,
            tags=trial_tags(sweep, name, "in64", "steps"),
            parent=parent,
            params={
                "diffusion.num_timesteps": T,
                "diffusion.schedule": schedule,
                "diffusion.objective": objective,
                "budget.steps": cells[-1]["step"],
            },
            metrics=metrics,
            cells=cells,
        )

    k2, m15 = 200_000, 1_500_000
    trial(
        "cos-hyb",
        4000,
        "cosine",
        "hybrid",
        {
            "eval/nll_bpd": {100_000: 3.9, k2: 3.70, m15: 3.60},
            "eval/nll_bpd_full": {m15: 3.58},
            "eval/fid": {k2: 29.0, m15: 20.0},
            "compute/flops": {k2: 1.0, m15: 7.5},
        },
        [
            {"cell": "c00", "budget": "steps=200000", "step": k2},
            {"cell": "c01", "budget": "steps=1500000", "step": m15},
        ],
    )
    trial(
        "lin-simple",
        1000,
        "linear",
        "simple",
        {"eval/nll_bpd": {k2: 4.1}, "eval/digits_fd": {k2: 1.25}},
        [{"cell": "c02", "budget": "steps=200000", "step": k2}],
    )
    trial(
        "cos-vlb-t500",
        500,
        "cosine",
        "vlb",
        {"eval/nll_bpd": {k2: 3.9}},
        [{"cell": "c03", "budget": "steps=200000", "step": k2}],
    )
    return sweep


def test_table_reproduces_the_paper_layout(uri, tmp_path, capsys) -> None:
    sweep = _ablation_sweep(uri, tmp_path / "artifacts")
    doc = _json(capsys, ["table", sweep, "--json", "--tracking-uri", uri])
    assert doc["columns"][:8] == [
        "Iters",
        "T",
        "Schedule",
        "Objective",
        "NLL",
        "FID",
        "paper NLL",
        "paper FID",
    ]
    rows = {(r["trial"], r["Iters"]): r for r in doc["rows"]}
    assert [(r["Iters"], r["T"], r["Schedule"], r["Objective"]) for r in doc["rows"]] == [
        (200_000, 500, "cosine", "L_vlb"),
        (200_000, 1000, "linear", "L_simple"),
        (200_000, 4000, "cosine", "L_hybrid"),
        (1_500_000, 4000, "cosine", "L_hybrid"),
    ]
    r = rows[("cos-hyb", 200_000)]
    assert (r["NLL"], r["FID"], r["paper NLL"], r["paper FID"]) == (3.70, 29.0, 3.62, 28.0)
    assert r["NLL metric"] == "eval/nll_bpd"  # the full bound was not measured at 200K
    r = rows[("cos-hyb", 1_500_000)]
    assert (r["NLL"], r["FID"], r["paper NLL"], r["paper FID"]) == (3.58, 20.0, 3.57, 19.2)
    assert r["NLL metric"] == "eval/nll_bpd_full"
    r = rows[("lin-simple", 200_000)]
    assert (r["FID"], r["FID metric"], r["paper NLL"]) == (1.25, "eval/digits_fd", 3.99)
    r = rows[("cos-vlb-t500", 200_000)]
    assert r["paper NLL"] is None and r["FID"] is None

    assert main(["table", sweep]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("Iters"))
    # one cell shows a digits-feature FD, the others FID: the column names both
    assert "NLL    digits FD / FID    paper NLL" in header, header
    assert "eval/digits_fd, eval/fid" in lines[-1], lines[-1]
    row = next(line for line in lines if line.startswith("1.5M"))
    assert row.split() == [
        "1.5M",
        "4K",
        "cosine",
        "L_hybrid",
        "3.580",
        "20.00",
        "3.57",
        "19.2",
        "cos-hyb",
    ]
    assert main(["table", "missing-sweep"]) == 2
    assert "'missing-sweep' does not exist" in capsys.readouterr().err


def test_table_names_the_fd_column_after_the_metric_it_shows(uri, tmp_path, capsys) -> None:
    """A digits sweep logs eval/digits_fd (digits-classifier features), not FID: the column
    says so; the paper's values keep their own name (paper FID)."""
    sweep = _scaling_sweep(uri, tmp_path / "artifacts", fd=True)
    assert main(["table", sweep, "--tracking-uri", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("Iters")).split()
    assert header[4:9] == ["NLL", "digits", "FD", "paper", "NLL"], header
    assert "FID" not in header[:-2] and header[-3:] == ["paper", "FID", "trial"], header
    assert "digits FD from: eval/digits_fd" in lines[-1], lines[-1]
