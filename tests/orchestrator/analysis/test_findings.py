"""`diffscale paper` and the findings behind it (orchestrator.analysis.findings): verdicts on
hand-made sweeps logged to a real SQLite MLflow store in the layout of DESIGN.md, and the
statistics (paired and Welch Student-t intervals, the verdict rule) against scipy."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient
from scipy import stats

from orchestrator.analysis.findings import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    difference,
    level,
    verdict,
)
from orchestrator.cli import main

from .mlflow_data import experiment, log_parent, log_run, trial_tags

STEP = 1000
SIMPLE = {"objective": "simple", "var_type": "fixed_small", "sampler": "uniform"}
HYBRID = {"objective": "hybrid", "var_type": "learned_range", "sampler": "uniform"}
VLB = {"objective": "vlb", "var_type": "learned_range"}
ROWS: dict[str, tuple[dict[str, object], float, float]] = {  # settings, NLL, FD (as published)
    "lin1k": ({"T": 1000, "schedule": "linear", **SIMPLE}, 3.99, 32.5),
    "lin4k": ({"T": 4000, "schedule": "linear", **SIMPLE}, 3.77, 31.3),
    "linhyb": ({"T": 4000, "schedule": "linear", **HYBRID}, 3.66, 32.2),
    "cossim": ({"T": 4000, "schedule": "cosine", **SIMPLE}, 3.68, 27.0),
    "coshyb": ({"T": 4000, "schedule": "cosine", **HYBRID}, 3.62, 28.0),
    "vlbuni": ({"T": 4000, "schedule": "cosine", **VLB, "sampler": "uniform"}, 3.60, 58.0),
    "vlblsm": (
        {"T": 4000, "schedule": "cosine", **VLB, "sampler": "loss-second-moment"},
        3.57,
        56.7,
    ),
}
PARAMS = {
    "T": "diffusion.num_timesteps",
    "schedule": "diffusion.schedule",
    "objective": "diffusion.objective",
    "var_type": "diffusion.var_type",
    "sampler": "train.timestep_sampler",
}
# sampling/digits_fd/<method>/<steps> at the end: learned sigmas barely degrade with few steps
STUDY = {
    "coshyb": {"ancestral": {25: 1.10, 50: 1.05, 4000: 1.0}},
    "cossim": {
        "ancestral": {25: 2.5, 50: 1.6, 4000: 1.0},
        "ancestral_fixed_large": {25: 1.6, 50: 1.3, 4000: 1.1},
    },
}
OBJECTIVE_VAR = {"vlbuni": 2.0, "vlblsm": 0.5}  # per-example variance of the L_vlb terms


def _sweep(
    uri: str,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    row_seeds: Mapping[str, Sequence[int]] | None = None,
    nll: Mapping[str, float] | None = None,
    fd: Mapping[str, float] | None = None,
    spread: Mapping[str, Sequence[float]] | None = None,
    objective_var: Mapping[str, float] | None = None,
    drop: Sequence[str] = (),
    sampling: bool = True,
    windows: bool = True,
) -> str:
    """One trial run per (row, seed), each with one cell at STEP. A seed shifts every row
    alike (paired designs remove it); each value carries a small jitter, and ``spread`` adds
    a row's own per-seed NLL deviations."""
    client, sweep = MlflowClient(uri), f"paper-{uuid.uuid4().hex[:6]}"
    exp_id = experiment(client, sweep)
    parent = log_parent(client, exp_id, sweep)
    rng = np.random.default_rng(7)
    variance = {**OBJECTIVE_VAR, **(objective_var or {})}
    for name, (setting, base_nll, base_fd) in ROWS.items():
        if name in drop:
            continue
        for seed in (row_seeds or {}).get(name, seeds):
            trial = f"{sweep}-{name}-{seed}"
            shift = 0.02 * seed
            value = (nll or {}).get(name, base_nll) + shift + rng.normal(0, 0.003)
            value += (spread or {}).get(name, (0.0,) * 3)[seed]
            metrics = {
                "eval/nll_bpd": {STEP // 2: value + 0.4, STEP: value},
                "eval/digits_fd": {
                    STEP: (fd or {}).get(name, base_fd) + 5 * shift + rng.normal(0, 0.1)
                },
                "compute/flops": {STEP // 2: 1e12, STEP: 2e12},
            }
            if windows and name in variance:
                windows = range(10, STEP + 1, 10)
                jitter = rng.normal(0, 0.05, len(windows))
                metrics["train/objective_var"] = {
                    s: variance[name] * (1 + 0.1 * seed) + j
                    for s, j in zip(windows, jitter, strict=True)
                }
                metrics["train/grad_norm_var"] = {s: variance[name] / 10 for s in windows}
            for method, by_steps in STUDY.get(name, {}).items() if sampling else ():
                for k, ratio in by_steps.items():
                    fd_k = ratio * (2.0 + 0.1 * seed) * (1 + rng.normal(0, 0.005))
                    metrics[f"sampling/digits_fd/{method}/{k}"] = {STEP: fd_k}
            log_run(
                client,
                exp_id,
                trial,
                tags=trial_tags(sweep, trial, "digits-xs", f"steps={STEP}"),
                parent=parent,
                params={
                    **{PARAMS[k]: v for k, v in setting.items()},
                    "model.name": "digits-xs",
                    "train.seed": seed,
                    "budget.steps": STEP,
                },
                metrics=metrics,
                cells=[{"cell": f"c{seed}", "budget": f"steps={STEP}", "step": STEP}],
            )
    return sweep


def _paper_json(capsys: pytest.CaptureFixture[str], sweep: str, uri: str) -> dict:
    assert main(["paper", sweep, "--json", "--tracking-uri", uri]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _verdicts(doc: dict) -> dict[int, str]:
    return {f["number"]: f["verdict"] for f in doc["findings"]}


def test_a_sweep_like_the_paper_holds_every_finding(sqlite_uri, capsys) -> None:
    sweep = _sweep(sqlite_uri)
    doc = _paper_json(capsys, sweep, sqlite_uri)
    assert doc["step"] == STEP and doc["steps"] == [STEP] and doc["confidence"] == 0.95
    assert _verdicts(doc) == dict.fromkeys(range(1, 7), HOLDS), doc["findings"]
    assert len(doc["table"]["rows"]) == 21 and doc["table"]["columns"][:2] == ["Iters", "T"]
    assert len(doc["rows"]) == 7 and all(len(r["trials"]) == 3 for r in doc["rows"])
    one, two, three, four, five, six = doc["findings"]
    (t4k,) = one["judged"]
    # paired by seed: the shared seed shift cancels; the effect is the published gap
    assert t4k["estimate"] == pytest.approx(3.77 - 3.99, abs=0.01)
    assert t4k["paired"] and t4k["n"] == 3 and t4k["low"] < t4k["estimate"] < t4k["high"] < 0
    assert [c["label"] for c in two["judged"]] == [
        "NLL L_simple cosine - linear",
        "FD L_simple cosine - linear",
        "NLL L_hybrid cosine - linear",
        "FD L_hybrid cosine - linear",
    ]
    (fd_gap,) = three["stated"]  # "at similar FID": stated with its interval, not judged
    assert fd_gap["estimate"] == pytest.approx(1.0, abs=0.3) and fd_gap["verdict"] is None
    assert len(four["judged"]) == 4  # L_vlb (importance-sampled) vs L_simple and L_hybrid
    assert all("loss-second-moment" in c["label"] for c in four["judged"])
    (var,) = five["judged"]
    assert var["metric"] == "train/objective_var"
    assert var["estimate"] == pytest.approx((0.5 - 2.0) * 1.1, rel=0.05)  # mean over windows
    assert [c["metric"] for c in five["stated"]] == ["train/grad_norm_var"]
    labels = [c["label"] for c in six["judged"]]
    assert labels == [
        f"FD({k})/FD(all) L_hybrid - L_simple ({v})"
        for k in (25, 50)
        for v in ("fixed_small", "fixed_large")
    ]
    assert six["judged"][0]["estimate"] == pytest.approx(1.10 - 2.5, abs=0.05)
    assert six["stated"][0]["estimate"] == pytest.approx(1.10, abs=0.02)  # FD(25)/FD(all)

    assert main(["paper", sweep, "--tracking-uri", sqlite_uri]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"diffscale table: {sweep} (21 cells)"  # the table command's own layout
    header = next(line for line in lines if line.startswith("Iters"))
    assert "digits FD" in header and "paper NLL" in header
    findings = [line for line in lines if line.startswith("(")]
    assert [line[:3] for line in findings] == [f"({n})" for n in range(1, 7)]
    assert all(line.endswith("=> holds") for line in findings), findings
    assert findings[0].startswith(
        "(1) T=4K gives lower NLL than T=1K (linear schedule, L_simple) [Sec. 3, Tables 1-2]: "
        "NLL T=4K - T=1K = -0.2"
    ), findings[0]
    assert "(n=3, paired)" in findings[0]
    assert "; also FD L_hybrid (learned_range) - L_simple (fixed_small) = " in findings[2]
    assert "also FD(25)/FD(all) cosine L_hybrid = 1.1" in findings[5] and "(n=3) => " in out
    assert f"findings at step {STEP} (7 rows)" in out


def test_contrary_data_does_not_hold_or_is_inconclusive(sqlite_uri, capsys) -> None:
    sweep = _sweep(
        sqlite_uri,
        nll={"lin1k": 3.57, "coshyb": 3.68},  # (1) reversed; (3) no NLL gap ...
        spread={"coshyb": (0.02, -0.02, 0.0)},  # ... and seed-to-seed noise: inconclusive
        fd={"cossim": 35.0},  # (2) cosine L_simple's FD worse than linear's: NLL alone holds
        objective_var={"vlblsm": 3.0},  # (5) importance sampling noisier
    )
    doc = _paper_json(capsys, sweep, sqlite_uri)
    assert _verdicts(doc) == {
        1: FAILS,
        2: FAILS,
        3: INCONCLUSIVE,
        4: HOLDS,
        5: FAILS,
        6: HOLDS,
    }, doc["findings"]
    two = {c["label"]: c["verdict"] for c in doc["findings"][1]["judged"]}
    assert two["NLL L_simple cosine - linear"] == HOLDS
    assert two["FD L_simple cosine - linear"] == FAILS
    (three,) = doc["findings"][2]["judged"]
    assert three["low"] < 0 < three["high"]


def test_missing_rows_metrics_and_too_few_seeds(sqlite_uri, capsys) -> None:
    sweep = _sweep(
        sqlite_uri,
        drop=("lin1k", "vlbuni"),
        row_seeds={"linhyb": (1,)},
        sampling=False,
    )
    doc = _paper_json(capsys, sweep, sqlite_uri)
    verdicts = _verdicts(doc)
    assert verdicts[1] == "missing: a T=1K linear L_simple row"
    assert verdicts[2] == "too few seeds (n=1; need >= 2)"  # the L_hybrid pair has 1 seed
    assert verdicts[3] == HOLDS and verdicts[4] == HOLDS
    assert verdicts[5] == "missing: a cosine L_vlb (t~uniform) row"
    assert verdicts[6].startswith("missing: sampling/<fd>/ancestral/")
    few = [c for c in doc["findings"][1]["judged"] if c["n"] == 1]
    assert len(few) == 2 and all(c["low"] is None and c["estimate"] is not None for c in few)

    assert main(["paper", sweep, "--tracking-uri", sqlite_uri]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("(")]
    assert lines[1].endswith("=> too few seeds (n=1; need >= 2)"), lines[1]
    assert "NLL L_hybrid cosine - linear = " in lines[1] and "(n=1; no interval)" in lines[1]
    assert lines[0].endswith(": - => missing: a T=1K linear L_simple row"), lines[0]

    # the L_vlb rows are there but their runs logged no train/objective_var
    vlb_only = _sweep(sqlite_uri, drop=tuple(ROWS)[:5], windows=False)
    verdicts = _verdicts(_paper_json(capsys, vlb_only, sqlite_uri))
    assert verdicts[5] == (
        "missing: train/objective_var of T=4K cosine L_vlb (learned_range, "
        "t~loss-second-moment) and T=4K cosine L_vlb (learned_range, t~uniform)"
    )
    assert verdicts[1].startswith("missing: a T=4K linear L_simple row and a T=1K")


def test_bad_input_exits_2_naming_what_was_looked_up(sqlite_uri, capsys) -> None:
    assert main(["paper", "no-such-sweep", "--tracking-uri", sqlite_uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffscale paper: error: ") and "'no-such-sweep' does not exist" in err
    sweep = _sweep(sqlite_uri, drop=tuple(ROWS)[1:], seeds=(0,))
    assert main(["paper", sweep, "--step", "7", "--tracking-uri", sqlite_uri]) == 2
    assert (
        "--step 7: no grid cell is at that step; the cells are at [1000]" in capsys.readouterr().err
    )


# -- the statistics -------------------------------------------------------------------------


def test_paired_and_welch_intervals_match_scipy() -> None:
    a = {0: 3.1, 1: 3.4, 2: 2.9, 3: 3.3}
    b = {0: 3.0, 1: 3.1, 2: 2.95, 3: 3.0}
    paired = difference(a, b)
    ref = stats.ttest_rel(list(a.values()), list(b.values())).confidence_interval(0.95)
    assert paired.paired and paired.n == 4
    assert (paired.low, paired.high) == pytest.approx((ref.low, ref.high))
    unpaired = difference({0: 1.0, 1: 2.0, 2: 1.5}, {5: 0.0, 6: 1.0})  # no shared seed
    ref = stats.ttest_ind([1.0, 2.0, 1.5], [0.0, 1.0], equal_var=False).confidence_interval()
    assert not unpaired.paired and unpaired.estimate == pytest.approx(1.0)
    assert (unpaired.low, unpaired.high) == pytest.approx((ref.low, ref.high))
    one = difference({0: 1.0}, {0: 0.5, 1: 0.7})
    assert one.estimate == pytest.approx(1.0 - 0.6) and one.low is None and one.n == 1
    assert difference({}, {0: 1.0}) is None and difference({0: float("nan")}, {0: 1.0}) is None
    mean = level({0: 1.0, 1: 2.0, 2: 3.0})
    assert mean.estimate == 2.0 and mean.low == pytest.approx(2.0 - stats.t.ppf(0.975, 2) / 3**0.5)


finite = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(finite, finite)
def test_verdict_is_symmetric_and_needs_the_interval_off_zero(x: float, y: float) -> None:
    low, high = min(x, y), max(x, y)
    lower = verdict(low, high, "lower")
    assert lower == verdict(-high, -low, "higher")
    if low <= 0 <= high:
        assert lower == INCONCLUSIVE
    else:
        assert lower == (HOLDS if high < 0 else FAILS)
        assert verdict(low, high, "higher") == (FAILS if high < 0 else HOLDS)


def test_verdict_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="direction"):
        verdict(-1.0, 1.0, "less")
    with pytest.raises(ValueError, match="low <= high"):
        verdict(1.0, -1.0, "lower")
    with pytest.raises(ValueError, match="low <= high"):
        verdict(float("nan"), 1.0, "lower")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=6),
    st.lists(st.floats(-100, 100, allow_nan=False), min_size=6, max_size=6),
    st.floats(-50, 50, allow_nan=False),
)
def test_a_paired_effect_moves_with_a_shift_and_brackets_its_estimate(
    b: list[float], noise: list[float], shift: float
) -> None:
    seeds = range(len(b))
    a = {s: b[s] + noise[s] for s in seeds}
    e = difference(a, dict(zip(seeds, b, strict=True)))
    moved = difference({s: v + shift for s, v in a.items()}, dict(zip(seeds, b, strict=True)))
    assert e.paired and e.low <= e.estimate <= e.high
    assert moved.estimate == pytest.approx(e.estimate + shift, abs=1e-6)
    assert moved.high - moved.low == pytest.approx(e.high - e.low, abs=1e-6)
    reversed_ = difference(dict(zip(seeds, b, strict=True)), a)
    assert reversed_.low == pytest.approx(-e.high, abs=1e-9)
