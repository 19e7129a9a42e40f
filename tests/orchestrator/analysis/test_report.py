"""orchestrator.analysis.report: tables, PNG plots, and artifacts on the sweep's parent run."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from matplotlib.image import imread
from mlflow import MlflowClient

from orchestrator.analysis import report
from orchestrator.analysis.fit import fit_power_law
from orchestrator.analysis.query import QueryError
from orchestrator.names import ROLE_TAG, ROLE_TRIAL

from .mlflow_data import experiment, log_parent, log_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path | None) -> None:
    assert path is not None and path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)  # decodes the whole file
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def _curves() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three sizes, loss 2 + (1e12 / C)^0.3 shifted up for the smaller sizes."""
    compute, metric, group = [], [], []
    for k, size in enumerate(["s", "m", "l"]):
        c = np.geomspace(1e12, 1e15 * 10**k, 8)
        compute += list(c)
        metric += list(2.0 + (1e12 / c) ** 0.3 + 0.05 * (2 - k) * np.log10(c / 1e12) / 3)
        group += [size] * len(c)
    return np.array(compute), np.array(metric), np.array(group, dtype=object)


def test_plots_are_valid_pngs(tmp_path: Path) -> None:
    compute, metric, group = _curves()
    fit = fit_power_law(compute, metric, form="henighan", bootstrap=50, seed=0)
    frontier = (np.geomspace(1e12, 1e17, 5), 2.0 + (1e12 / np.geomspace(1e12, 1e17, 5)) ** 0.3)
    _assert_png(
        report.plot_metric_vs_compute(
            compute,
            metric,
            group,
            tmp_path / "a" / "compute.png",
            fit=fit,
            frontier=frontier,
            metric_name="eval/nll_bpd",
        )
    )
    _assert_png(report.plot_metric_vs_compute(compute, metric, group, tmp_path / "bare.png"))
    _assert_png(
        report.plot_metric_vs_params(
            np.array([1e6, 3e6, 1e7]),
            np.array([3.0, 2.7, 2.5]),
            tmp_path / "params.png",
            labels=["s", "m", "l"],
        )
    )

    table = pa.table(
        {
            "run_id": ["r1", "r1", "r2", "r3"],
            "run_name": ["a", "a", "b", "c"],
            "tags.trial": ["t1", "t1", "t2", "t3"],
            "step": pa.array([5, 10, 10, 10], pa.int64()),
            "sampling/fid/ancestral/50": [None, 30.0, 20.0, None],
            "sampling/fid/ancestral/100": [None, 25.0, 18.0, None],
            "sampling/fid/ddim/50": [None, 28.0, None, None],
            "sampling/digits_fd/ancestral/50": [None, 1.0, None, 2.0],
            "eval/fid": [40.0, 35.0, 30.0, None],
        }
    )
    curves = report.sampling_curves(table)
    assert sorted(curves) == [
        ("t1", "fid", "ancestral"),
        ("t1", "fid", "ddim"),
        ("t2", "fid", "ancestral"),
        ("t3", "digits_fd", "ancestral"),  # a trial without FID shows its digits FD
    ]
    steps, values = curves[("t1", "fid", "ancestral")]
    assert steps.tolist() == [50, 100] and values.tolist() == [30.0, 25.0]
    _assert_png(report.plot_sampling_steps(table, tmp_path / "sampling.png"))
    assert (
        report.plot_sampling_steps(
            table.drop_columns(["sampling/fid/ddim/50"]).select(["run_id", "step", "eval/fid"]),
            tmp_path / "none.png",
        )
        is None
    )
    assert not (tmp_path / "none.png").exists()


def test_tables() -> None:
    compute, metric, _ = _curves()
    fit = fit_power_law(compute, metric, form="henighan", bootstrap=30, seed=1)
    text = report.fit_table(fit)
    assert "95% interval" in text
    for name in ("L_inf", "C0", "alpha"):
        assert name in text
    assert f"{fit.n_points} points" in report.fit_summary(fit)
    rows = [{"a": 1.23456, "b": None}, {"a": 2.0, "b": "x"}]
    cells = report.rows_table(rows, ["a", "b"])
    assert "1.235" in cells and "-" in cells.splitlines()[2]


@pytest.mark.parametrize("backend", ["sqlite", "server"])
def test_log_report_puts_files_on_the_parent_run(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    uri = request.getfixturevalue("sqlite_uri" if backend == "sqlite" else "mlflow_server")
    client, sweep = MlflowClient(uri), f"rep-{uuid.uuid4().hex[:6]}"
    artifacts = str(tmp_path / "artifacts") if backend == "sqlite" else None
    exp_id = experiment(client, sweep, artifacts)
    log_run(client, exp_id, "t0", tags={ROLE_TAG: ROLE_TRIAL})
    with pytest.raises(QueryError, match="no sweep parent run"):
        report.log_report(sweep, uri, [])
    parent = log_parent(client, exp_id, sweep)
    compute, metric, group = _curves()
    png = report.plot_metric_vs_compute(compute, metric, group, tmp_path / "compute.png")
    (tmp_path / "fit.json").write_text('{"alpha": 0.3}')
    assert report.log_report(sweep, uri, [png, tmp_path / "fit.json"]) == parent
    listed = {a.path for a in client.list_artifacts(parent, "analysis")}
    assert listed == {"analysis/compute.png", "analysis/fit.json"}
    local = client.download_artifacts(parent, "analysis/compute.png", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == png.read_bytes()
