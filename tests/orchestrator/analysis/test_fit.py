"""Scaling-law fits (orchestrator/analysis/fit.py and chinchilla.py): recovery of known laws,
interval coverage, degenerate data, the frontier, tables, and the vectorised multi-start
optimiser against a plain per-start scipy loop."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.analysis.chinchilla import (
    LSEObjective,
    chinchilla_bounds,
    multistart,
    reference_multistart,
)
from orchestrator.analysis.fit import (
    FORMS,
    PARAM_NAMES,
    compute_frontier,
    default_starts,
    fit_by_size,
    fit_chinchilla,
    fit_power_law,
    load_table,
    table_columns,
)

# Besiroglu et al. 2024's refit of Chinchilla (Table 1).
BESIROGLU = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
TRUE = {
    "henighan": {"L_inf": 2.0, "C0": 1e14, "alpha": 0.3},
    "power": {"C0": 1e14, "alpha": 0.3},
}
SMALL_GRID = default_starts()[::15]  # 300 of the 4500 Chinchilla starts: enough, and fast


@pytest.fixture(autouse=True)
def _quiet_fit_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="orchestrator.analysis")


def power_data(form: str, n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """L(C) with log-normal noise on C in [1e15, 1e19]."""
    p = TRUE[form]
    c = np.geomspace(1e15, 1e19, n)
    clean = p.get("L_inf", 0.0) + (p["C0"] / c) ** p["alpha"]
    return c, clean * np.exp(np.random.default_rng(seed).normal(0.0, noise, n))


def chinchilla_data(n: int, noise: float, seed: int) -> tuple[np.ndarray, ...]:
    """Besiroglu et al.'s law at log-uniform N in [7e7, 1.6e10] and D in [5e9, 5e11]."""
    rng = np.random.default_rng(seed)
    big_n = np.exp(rng.uniform(np.log(7e7), np.log(1.6e10), n))
    big_d = np.exp(rng.uniform(np.log(5e9), np.log(5e11), n))
    p = BESIROGLU
    loss = p["E"] + p["A"] / big_n ** p["alpha"] + p["B"] / big_d ** p["beta"]
    return big_n, big_d, loss * np.exp(rng.normal(0.0, noise, n))


def inside(result, truth: dict[str, float]) -> dict[str, bool]:
    return {k: result.intervals[k][0] <= v <= result.intervals[k][1] for k, v in truth.items()}


@pytest.mark.parametrize("form", ["henighan", "power"])
def test_power_law_forms_recover_known_parameters_within_intervals(form):
    c, y = power_data(form, n=30, noise=0.01, seed=1)
    result = fit_power_law(c, y, form=form, bootstrap=100, seed=0)
    assert result.form == form and list(result.params) == list(PARAM_NAMES[form])
    assert result.converged and result.n_points == 30
    assert all(inside(result, TRUE[form]).values()), (result.params, result.intervals)
    assert result.r2_log > 0.9
    assert result.bootstrap.shape == (100, len(PARAM_NAMES[form]))
    assert result.residuals.shape == (30,)
    np.testing.assert_allclose(result.predict(c), y * np.exp(-result.residuals), rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["henighan", "power"])
def test_interval_coverage_over_seeds_is_about_nominal(form):
    """40 data sets: the 90% percentile intervals should hold the truth about 90% of the time
    (the Huber fit is close to least absolute deviations, whose pairs bootstrap is valid)."""
    hits = {k: 0 for k in TRUE[form]}
    for seed in range(40):
        c, y = power_data(form, n=20, noise=0.02, seed=100 + seed)
        result = fit_power_law(c, y, form=form, bootstrap=60, level=0.9, seed=seed)
        for k, ok in inside(result, TRUE[form]).items():
            hits[k] += ok
    for k, count in hits.items():
        assert 0.8 <= count / 40 <= 1.0, (k, count)


@pytest.mark.parametrize("form", ["henighan", "power"])
def test_noiseless_power_law_is_recovered_precisely(form):
    c, y = power_data(form, n=12, noise=0.0, seed=0)
    result = fit_power_law(c, y, form=form, bootstrap=0)
    assert result.converged and result.bootstrap is None
    for k, v in TRUE[form].items():
        assert result.params[k] == pytest.approx(v, rel=1e-6), k
    assert result.loss < 1e-12
    assert all(np.isnan(lo) and np.isnan(hi) for lo, hi in result.intervals.values())


def test_noiseless_chinchilla_is_recovered_precisely():
    result = fit_chinchilla(*chinchilla_data(60, 0.0, seed=0), bootstrap=0, starts=SMALL_GRID)
    assert result.converged
    for k, v in BESIROGLU.items():
        assert result.params[k] == pytest.approx(v, rel=1e-6), k


def test_chinchilla_recovers_besiroglu_parameters_within_intervals():
    big_n, big_d, loss = chinchilla_data(150, 0.01, seed=3)
    result = fit_chinchilla(big_n, big_d, loss, bootstrap=60, starts=SMALL_GRID, seed=1)
    assert result.converged, result.warnings
    assert list(result.params) == ["E", "A", "B", "alpha", "beta"]
    assert all(inside(result, BESIROGLU).values()), (result.params, result.intervals)
    assert result.params["E"] == pytest.approx(BESIROGLU["E"], rel=0.05)
    lo, hi = result.predict_interval(big_n, big_d)
    pred = result.predict(big_n, big_d)
    assert lo.shape == pred.shape == (150,)
    assert np.mean((lo <= pred) & (pred <= hi)) > 0.9


def _not_confident(result) -> bool:
    for k, (lo, hi) in result.intervals.items():
        est = result.params[k]
        if np.isfinite([lo, hi]).all() and hi - lo <= abs(est):
            return False
    return True


@pytest.mark.parametrize("form", ["henighan", "power"])
def test_three_flat_points_warn_and_are_not_confident(form):
    result = fit_power_law([1e15, 1e16, 1e17], [2.0, 2.0, 2.0], form=form, bootstrap=50)
    text = " ".join(result.warnings)
    assert "flat" in text and "fewer than 2 per parameter" in text
    assert _not_confident(result)
    assert np.isnan(result.r2_log)
    json.dumps(result.to_dict(), allow_nan=False)


def test_three_points_for_three_parameters_give_no_intervals():
    c, y = power_data("henighan", n=3, noise=0.01, seed=0)
    result = fit_power_law(c, y, bootstrap=50)
    assert any("no more points than parameters" in w for w in result.warnings)
    assert all(np.isnan(v).all() for v in result.intervals.values())


def test_chinchilla_on_three_flat_points_warns_and_is_not_confident():
    result = fit_chinchilla(
        [1e8, 1e9, 1e10], [1e10, 1e11, 1e12], [2.5, 2.5, 2.5], bootstrap=20, starts=SMALL_GRID
    )
    assert any("flat" in w for w in result.warnings)
    assert any("fewer than 2 per parameter" in w for w in result.warnings)
    assert _not_confident(result)


def test_a_constant_regressor_is_reported_and_gives_no_intervals():
    big_d = np.geomspace(1e10, 1e12, 12)
    loss = 2.0 + 100.0 / big_d**0.3
    result = fit_chinchilla(np.full(12, 1e9), big_d, loss, bootstrap=20, starts=SMALL_GRID)
    assert any("every point has the same N" in w for w in result.warnings)
    assert all(np.isnan(v).all() for v in result.intervals.values())
    same_c = fit_power_law(np.full(6, 1e18), [3.0, 2.9, 3.1, 3.0, 2.95, 3.05], bootstrap=20)
    assert any("every point has the same x" in w for w in same_c.warnings)


def test_vectorised_multistart_matches_a_per_start_scipy_loop():
    big_n, big_d, loss = chinchilla_data(60, 0.02, seed=7)
    ly = np.log(loss)
    objective = LSEObjective(np.log(np.stack([big_n, big_d], 1)), ly, has_e=True, delta=1e-3)
    lower, upper = chinchilla_bounds(ly)
    starts = default_starts()[::90]  # 50 starts
    ours = multistart(objective, starts, lower, upper)
    reference = reference_multistart(objective, starts, lower, upper)
    assert ours.value == pytest.approx(reference.value, rel=1e-6)
    assert ours.value <= reference.value * (1 + 1e-9)
    np.testing.assert_allclose(ours.theta, reference.theta, rtol=1e-4, atol=1e-6)
    assert ours.success


def test_objective_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    big_n, big_d, loss = chinchilla_data(40, 0.05, seed=2)
    weights = rng.integers(0, 3, size=(3, 40)).astype(float)
    objective = LSEObjective(
        np.log(np.stack([big_n, big_d], 1)), np.log(loss), has_e=True, delta=1e-3, weights=weights
    )
    theta = np.array([[0.6, 6.0, 7.5, 0.35, 0.37], [0.2, 3.0, 9.0, 0.2, 0.5], [1.0, 5, 5, 1, 1]])
    _, grad = objective.value_grad(theta)
    eps = 1e-7
    for j in range(5):
        step = np.zeros(5)
        step[j] = eps
        fd = (objective.value_grad(theta + step)[0] - objective.value_grad(theta - step)[0]) / (
            2 * eps
        )
        np.testing.assert_allclose(grad[:, j], fd, rtol=1e-5, atol=1e-6)


def test_default_starts_are_the_chinchilla_grid():
    starts = default_starts()
    assert starts.shape == (4500, 5)
    e, a, b, alpha, beta = starts.T
    assert set(e) == {-1.0, -0.5, 0.0, 0.5, 1.0} and set(a) == set(b) == {0, 5, 10, 15, 20, 25}
    assert set(alpha) == set(beta) == {0.0, 0.5, 1.0, 1.5, 2.0}
    assert len(np.unique(starts, axis=0)) == 4500


def test_frontier_of_two_crossing_curves_is_their_envelope():
    compute = [1, 2, 4, 8, 16, 2, 4, 8, 16, 32]
    metric = [5.0, 3.0, 2.0, 1.5, 1.4, 6.0, 3.5, 1.8, 1.2, 1.0]
    group = ["small"] * 5 + ["big"] * 5  # big starts worse and crosses below between 8 and 16
    frontier = compute_frontier(compute, metric, group)
    np.testing.assert_array_equal(frontier.compute, [1, 2, 4, 8, 16, 32])
    np.testing.assert_array_equal(frontier.metric, [5.0, 3.0, 2.0, 1.5, 1.2, 1.0])
    assert frontier.group.tolist() == ["small"] * 4 + ["big"] * 2
    result = frontier.fit(form="power", bootstrap=0)
    assert result.n_points == 6 and result.form == "power"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 6), st.integers(0, 5), st.integers(0, 2)), min_size=1, max_size=25
    )
)
def test_frontier_is_the_pareto_set(points):
    c, m, g = (np.array(v) for v in zip(*points, strict=True))
    frontier = compute_frontier(c, m, g)
    on = [not ((c <= c[i]) & (m < m[i])).any() for i in range(len(c))]
    expected = sorted((c[i], m[i], g[i]) for i in range(len(c)) if on[i])
    got = list(zip(frontier.compute, frontier.metric, frontier.group, strict=True))
    assert sorted(got) == expected
    assert np.all(np.diff(frontier.compute) >= 0)
    assert np.all(np.diff(frontier.metric) <= 0)  # an envelope only goes down


def test_fit_by_size_takes_the_largest_compute_of_each_size():
    sizes = np.geomspace(1e6, 1e9, 7)
    final = 2.0 + (1e5 / sizes) ** 0.3  # L(N) at the end of training
    params, compute, metric = [], [], []
    for n_params, loss in zip(sizes, final, strict=True):
        for frac, excess in ((0.25, 0.5), (0.5, 0.2), (1.0, 0.0)):  # earlier: higher loss
            params.append(n_params)
            compute.append(frac * 6 * n_params * 1e9)
            metric.append(loss + excess)
    order = np.random.default_rng(0).permutation(len(params))
    result = fit_by_size(
        np.array(params)[order], np.array(compute)[order], np.array(metric)[order], bootstrap=0
    )
    assert result.n_points == 7 and result.variable == "N"
    assert result.params["L_inf"] == pytest.approx(2.0, rel=1e-6)
    assert result.params["C0"] == pytest.approx(1e5, rel=1e-5)
    assert result.params["alpha"] == pytest.approx(0.3, rel=1e-6)
    assert result.to_dict()["formula"] == "L(N) = L_inf + (C0/N)^alpha"
    with pytest.raises(ValueError, match="params: must be > 0"):
        fit_by_size([0.0, 1e6], [1e15, 1e16], [3.0, 2.0])


def test_to_dict_is_json_with_parameters_at_top_level():
    c, y = power_data("henighan", n=15, noise=0.01, seed=2)
    result = fit_power_law(c, y, bootstrap=50)
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["form"] == "henighan" and d["formula"] == "L(C) = L_inf + (C0/C)^alpha"
    for k in PARAM_NAMES["henighan"]:
        assert d[k] == d["params"][k] == result.params[k]
        assert d["intervals"][k] == list(result.intervals[k])
    for key in ("level", "n_points", "loss", "converged", "r2_log", "warnings"):
        assert key in d
    chin = fit_chinchilla(*chinchilla_data(30, 0.01, seed=0), bootstrap=0, starts=SMALL_GRID)
    d = json.loads(json.dumps(chin.to_dict(), allow_nan=False))
    assert d["formula"] == "L(N, D) = E + A/N^alpha + B/D^beta"
    assert {k: d[k] for k in BESIROGLU} == chin.params
    assert d["intervals"]["E"] == [None, None]  # no bootstrap: no intervals


def test_fits_are_deterministic_for_a_seed():
    c, y = power_data("henighan", n=15, noise=0.02, seed=5)
    a = fit_power_law(c, y, bootstrap=40, seed=3)
    b = fit_power_law(c, y, bootstrap=40, seed=3)
    other = fit_power_law(c, y, bootstrap=40, seed=4)
    np.testing.assert_array_equal(a.bootstrap, b.bootstrap)
    assert a.intervals == b.intervals and a.params == b.params
    assert not np.array_equal(a.bootstrap, other.bootstrap)


def test_predict_checks_its_arguments():
    c, y = power_data("power", n=10, noise=0.01, seed=0)
    result = fit_power_law(c, y, form="power", bootstrap=30)
    lo, hi = result.predict_interval(c, level=0.5)
    assert lo.shape == hi.shape == (10,) and np.all(lo <= hi)
    with pytest.raises(ValueError, match="takes 1 array"):
        result.predict(c, c)


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "match"),
    [
        ([1, 2, -3], [1, 2, 3], {}, "x: must be > 0"),
        ([1, 2, 3], [1, 0, 3], {}, "y: must be > 0"),
        ([1, 2, np.nan], [1, 2, 3], {}, "x: contains NaN"),
        ([1, 2, 3], [1, 2], {}, "length mismatch"),
        ([1, 2, 3], [3, 2, 1], {"form": "cubic"}, "form: got 'cubic'"),
        ([1, 2, 3], [3, 2, 1], {"form": "chinchilla"}, "fit_chinchilla"),
        ([1, 2, 3], [3, 2, 1], {"level": 1.5}, "level"),
        ([1], [1], {}, "at least 2 points"),
    ],
)
def test_invalid_input_raises_value_error(x, y, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(x, y, **kwargs)


def test_chinchilla_rejects_bad_starts_and_lengths():
    with pytest.raises(ValueError, match="starts"):
        fit_chinchilla([1e8, 1e9], [1e10, 1e11], [3, 2], starts=np.zeros((4, 3)))
    with pytest.raises(ValueError, match="length mismatch"):
        fit_chinchilla([1e8, 1e9], [1e10], [3, 2])


def test_forms_are_the_contract():
    assert FORMS == ("henighan", "power", "chinchilla")


def test_load_table_reads_csv_tsv_and_parquet(tmp_path):
    table = pa.table({"compute": [1e15, 1e16, 1e17], "loss": [3.0, 2.5, None], "name": list("abc")})
    pacsv.write_csv(table, tmp_path / "runs.csv")
    pq.write_table(table, tmp_path / "runs.parquet")
    (tmp_path / "runs.tsv").write_text("compute\tloss\n1e15\t3.0\n1e16\t2.5\n1e17\t\n")
    for name in ("runs.csv", "runs.parquet", "runs.tsv"):
        compute, loss = table_columns(load_table(tmp_path / name), "compute", "loss")
        assert compute.dtype == np.float64
        np.testing.assert_array_equal(compute, [1e15, 1e16, 1e17])
        np.testing.assert_array_equal(loss, [3.0, 2.5, np.nan])


def test_table_errors_name_the_file_or_column(tmp_path):
    table = pa.table({"compute": [1.0, 2.0], "name": ["a", "b"]})
    with pytest.raises(ValueError, match=r"column 'loss' not in table; available: \['compute'"):
        table_columns(table, "compute", "loss")
    with pytest.raises(ValueError, match="column 'name' is not numeric"):
        table_columns(table, "name")
    with pytest.raises(ValueError, match=r"missing\.csv: no such file"):
        load_table(tmp_path / "missing.csv")
    (tmp_path / "runs.json").write_text("{}")
    with pytest.raises(ValueError, match=r"runs\.json: unsupported table format '.json'"):
        load_table(tmp_path / "runs.json")
