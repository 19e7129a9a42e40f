"""orchestrator.analysis.report: tables, PNG plots, and artifacts on the sweep's parent run."""

from __future__ import annotations

import itertools
import re
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread
from mlflow import MlflowClient

from orchestrator.analysis import report
from orchestrator.analysis.fit import fit_power_law
from orchestrator.analysis.isoflop import fit_isoflop
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


TICK = re.compile(r"^\d+(\.\d+)?[kMGTPE]?$")  # 0.7M, 1M, 50k, 0.22T: engineering units


def _x_tick_labels(fig: Figure) -> list[str]:
    """The x axis's visible tick labels, left to right, after drawing with Agg; asserts that
    no two of them overlap."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    ax = fig.axes[0]
    lo, hi = sorted(ax.get_xlim())
    shown = [
        t
        for t in [*ax.get_xticklabels(), *ax.get_xticklabels(minor=True)]
        if t.get_text() and lo <= t.get_position()[0] <= hi
    ]
    extents = [(t.get_window_extent(renderer), t.get_text()) for t in shown]
    boxes = sorted((b.x0, b.x1, text) for b, text in extents)
    for (_, right, left_text), (left, _, right_text) in itertools.pairwise(boxes):
        assert left > right, f"tick labels {left_text!r} and {right_text!r} overlap"
    return [text for _, _, text in boxes]


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ([7.2e5, 2.9e6, 4.1e6], ["0.72M", "2.9M", "4.1M"]),  # the digits ladder
        ([5e4, 1e5, 2e5, 4e5, 1e6], ["50k", "0.1M", "0.2M", "0.4M", "1M"]),
        ([7e5, 1.2e6, 2e6, 4e6], ["0.7M", "1.2M", "2M", "4M"]),
        ([7e5, 8e5, 9e5], ["0.7M", "0.8M", "0.9M"]),  # once "700000800000900000"
        ([1e5, 1.1e5, 1e9], None),  # two sizes too close for a label each: round values
        (np.geomspace(1e5, 1e9, 12), None),  # too many sizes for a label each
    ],
)
def test_params_axes_label_sizes_readably(sizes, expected) -> None:
    sizes = np.asarray(sizes, float)
    metric = 3.0 - 0.1 * np.log(sizes / sizes[0])
    labels = _x_tick_labels(report.metric_vs_params_figure(sizes, metric))
    assert len(labels) >= 2 and all(TICK.match(t) for t in labels), labels
    if expected is not None:
        assert labels == expected
    budgets = np.repeat([1e12, 2e12, 4e12], len(sizes))
    n = np.tile(sizes, 3)
    loss = 2.0 + 0.05 * (np.log(n) - np.log(np.sqrt(budgets) / 3)) ** 2
    result = fit_isoflop(budgets, n, loss, bootstrap=10, seed=0)
    iso = _x_tick_labels(report.isoflop_figure(result))
    assert len(iso) >= 2 and all(TICK.match(t) for t in iso), iso
    if expected is not None:
        assert iso == expected


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(5e11, 4e12), (1e12, 2.5e13), (1e12, 1e17), (1e10, 1e20), (2e11, 3e11), (2.1e11, 2.6e11)],
)
def test_compute_axes_label_every_range_readably(lo: float, hi: float) -> None:
    compute = np.geomspace(lo, hi, 8)
    group = np.array(["s"] * 4 + ["m"] * 4, dtype=object)
    fig = report.metric_vs_compute_figure(compute, 2.0 + (1e11 / compute) ** 0.3, group)
    labels = _x_tick_labels(fig)
    assert 2 <= len(labels) <= report.MAX_TICK_LABELS, labels
    assert all(TICK.match(t) for t in labels), labels
    if (lo, hi) == (5e11, 4e12):  # the demo's budgets
        assert labels == ["0.5T", "0.7T", "1T", "2T", "3T"]
