"""``diffscale paper``: the paper's ablation table beside ours, then each of its findings with
our effect, a 95% interval over seeds and a verdict (Nichol & Dhariwal 2021).

A *row* is one configuration at one step: the grid cells that differ only in ``train.seed``
(:func:`config_rows`). NLL and FD are the values ``diffscale table`` shows (the full bound
where measured, else the subset estimate; FID, else the digits-feature FD). The findings:

1. T = 4000 gives a lower NLL than T = 1000 (linear schedule, L_simple; Sec. 3, Tables 1-2).
2. The cosine schedule (Sec. 3.2, Eq. 17) gives a lower NLL and a lower FD than the linear
   one, for L_simple and L_hybrid where present; both metrics must hold.
3. L_hybrid (Sec. 3.1, Eq. 16) gives a lower NLL than L_simple at a similar FD (cosine); the
   FD difference is stated, not judged.
4. L_vlb gives the lowest NLL and the worst FD among the cosine rows (Sec. 3.3, Tables 1-2);
   the L_vlb row trained with importance sampling, as published, when there is one.
5. Importance sampling (Sec. 3.3, Eq. 18) lowers the variance of the L_vlb objective: the mean
   of ``train/objective_var`` over a run's log windows, loss-second-moment vs uniform t.
6. With learned sigmas (Eq. 15), 25-50 strided steps come close to the full-step FD while fixed
   sigmas degrade more (Sec. 4, Fig. 8): FD(k steps) / FD(all T steps) of the L_hybrid row
   minus that of the L_simple row (its own fixed_small, and @fixed_large where logged).

An effect a - b is the mean over seeds of a_s - b_s, paired by seed when the rows share at
least two seeds; otherwise Welch's difference of the means when each row has two or more.
Its 95% interval uses Student's t (n - 1, or the Welch-Satterthwaite degrees of freedom).
:func:`verdict` turns an interval into holds / does not hold / inconclusive. The command is
:mod:`orchestrator.analysis.paper_command`; importing this module loads no MLflow or pyarrow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator.names import (
    SAMPLING_PREFIX,
    TRAIN_GRAD_NORM_VAR,
    TRAIN_OBJECTIVE_VAR,
    sampling_metric,
)

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "Comparison",
    "Effect",
    "Finding",
    "Row",
    "config_rows",
    "difference",
    "pairs",
    "paper_findings",
    "verdict",
]

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
DIRECTIONS = ("lower", "higher")  # the claim: the effect a - b is below / above zero
MIN_SEEDS = 2
TOO_FEW = "too few seeds (n={n}; need >= " + f"{MIN_SEEDS})"  # a verdict: TOO_FEW.format(n=1)
CONFIDENCE = 0.95
NLL, FD = "NLL", "FD"  # the table's two numbers, as row values
FEW_STEPS = (25, 50)  # finding 6: strided steps compared with all T steps
FD_FAMILIES = ("fid", "digits_fd")  # sampling/<fd>/...: Inception FID first
WINDOW_METRICS = (TRAIN_OBJECTIVE_VAR, TRAIN_GRAD_NORM_VAR)  # averaged over log windows
KEY_EXTRAS = ("var_type", "sampler")  # shown in brackets after T, schedule and objective
KEY_PARAMS = {  # a row's settings -> the MLflow params they are read from
    "T": "diffusion.num_timesteps",
    "schedule": "diffusion.schedule",
    "objective": "diffusion.objective",
    "var_type": "diffusion.var_type",
    "sampler": "train.timestep_sampler",
    "model": "model.name",
}


def verdict(low: float, high: float, direction: str) -> str:
    """The verdict on a claim that an effect is below zero (``direction="lower"``, e.g. the
    NLL of the paper's choice minus the baseline's) or above zero (``"higher"``), from the
    effect's interval ``[low, high]``: "holds" when the interval lies wholly on the claimed
    side of zero, "does not hold" when wholly on the other side, "inconclusive" when it spans
    or touches zero. Raises ValueError for another direction or an interval with low > high
    or a NaN end."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {list(DIRECTIONS)}, got {direction!r}")
    if not low <= high:
        raise ValueError(f"expected an interval with low <= high, got [{low}, {high}]")
    if direction == "lower":
        low, high = -high, -low
    return HOLDS if low > 0 else FAILS if high < 0 else INCONCLUSIVE


@dataclass(frozen=True)
class Effect:
    """A difference of two rows over seeds (or one row's level), with its interval; ``low``
    and ``high`` are None when a row has fewer than MIN_SEEDS seeds."""

    estimate: float
    low: float | None
    high: float | None
    n: int  # seeds paired; unpaired: the smaller row's seeds
    paired: bool | None  # None: one row's mean


def _finite(values: Mapping[Any, float | None]) -> dict[Any, float]:
    return {s: float(v) for s, v in values.items() if v is not None and math.isfinite(v)}


def _t_half(se: float, df: float, confidence: float) -> float:
    from scipy import stats

    return 0.0 if se == 0 else float(stats.t.ppf((1 + confidence) / 2, df)) * se


def level(values: Mapping[Any, float | None], confidence: float = CONFIDENCE) -> Effect | None:
    """The mean over seeds with its Student-t interval; None without a finite value."""
    x = np.array(list(_finite(values).values()))
    if not len(x):
        return None
    mean = float(x.mean())
    if len(x) < MIN_SEEDS:
        return Effect(mean, None, None, len(x), None)
    half = _t_half(float(x.std(ddof=1)) / math.sqrt(len(x)), len(x) - 1, confidence)
    return Effect(mean, mean - half, mean + half, len(x), None)


def difference(
    a: Mapping[Any, float | None], b: Mapping[Any, float | None], confidence: float = CONFIDENCE
) -> Effect | None:
    """The effect a - b of two rows given as ``{seed: value}``: paired by seed over the seeds
    both have when they share at least MIN_SEEDS, else Welch's unpaired difference; no
    interval when a row has fewer than MIN_SEEDS seeds. None when a row has no finite value."""
    a, b = _finite(a), _finite(b)
    if not a or not b:
        return None
    shared = sorted(set(a) & set(b), key=str)
    if len(shared) >= MIN_SEEDS:
        paired = level({s: a[s] - b[s] for s in shared}, confidence)
        return Effect(paired.estimate, paired.low, paired.high, paired.n, True) if paired else None
    xa, xb = np.array(list(a.values())), np.array(list(b.values()))
    mean = float(xa.mean() - xb.mean())
    if min(len(xa), len(xb)) < MIN_SEEDS:
        return Effect(mean, None, None, min(len(xa), len(xb)), False)
    va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1)) if se else 1.0
    half = _t_half(se, df, confidence)
    return Effect(mean, mean - half, mean + half, min(len(xa), len(xb)), False)


@dataclass(frozen=True)
class Comparison:
    """One effect of a finding: ``label`` (a - b) of ``metric``; judged against ``direction``,
    or only stated when ``direction`` is None. ``missing`` names what was not logged."""

    label: str
    metric: str
    direction: str | None
    effect: Effect | None = None
    missing: str | None = None

    @property
    def verdict(self) -> str | None:
        if self.missing or self.effect is None:
            return f"missing: {self.missing or self.metric}"
        if self.effect.low is None or self.effect.high is None:
            return TOO_FEW.format(n=self.effect.n)
        effect, direction = self.effect, self.direction
        return verdict(effect.low, effect.high, direction) if direction else None


def combine(parts: Sequence[Comparison]) -> str:
    """A finding's verdict from its judged comparisons: missing, then too few seeds, else
    holds only if every part holds, does not hold if any part does not, else inconclusive."""
    found = [c.verdict or "" for c in parts]
    missing = [v.removeprefix("missing: ") for v in found if v.startswith("missing: ")]
    if missing or not found:
        return "missing: " + ("; ".join(dict.fromkeys(missing)) or "every compared row")
    few = [c.effect.n for c in parts if c.effect and c.effect.low is None]
    if few:
        return TOO_FEW.format(n=min(few))
    return HOLDS if all(v == HOLDS for v in found) else FAILS if FAILS in found else INCONCLUSIVE


@dataclass(frozen=True)
class Finding:
    """One claim of the paper with the comparisons its verdict rests on (``judged``) and the
    effects stated beside them; ``missing`` names the rows that were not found."""

    number: int
    claim: str
    reference: str
    judged: tuple[Comparison, ...] = ()
    stated: tuple[Comparison, ...] = ()
    missing: str | None = None

    @property
    def verdict(self) -> str:
        if self.missing:
            return f"missing: {self.missing}"
        return combine(self.judged)


@dataclass(frozen=True, eq=False)
class Row:
    """One configuration at one step: its settings (KEY_PARAMS), ``values`` as
    ``{metric: {seed: value}}`` and the trials it was read from."""

    step: int
    T: int | None
    schedule: str | None
    objective: str | None
    var_type: str | None
    sampler: str | None
    model: str | None
    values: dict[str, dict[Any, float]]
    trials: tuple[str, ...]

    def name(self, fields: Sequence[str] = tuple(KEY_PARAMS)) -> str:
        return describe({f: getattr(self, f) for f in fields})


def describe(settings: Mapping[str, Any]) -> str:
    """``{"T": 4000, "objective": "vlb", "sampler": "uniform"}`` -> "T=4K L_vlb (t~uniform)"."""
    from orchestrator.analysis.paper import OBJECTIVE_LABELS, human_count

    given = {k: v for k, v in settings.items() if v is not None and k != "model"}
    main = {"T": f"T={human_count(given.get('T'))}", "schedule": given.get("schedule")}
    main["objective"] = OBJECTIVE_LABELS.get(given.get("objective", ""), given.get("objective"))
    words = [main[k] for k in given if k in main]
    extras = [f"t~{v}" if k == "sampler" else v for k, v in given.items() if k in KEY_EXTRAS]
    if words and extras:
        return f"{' '.join(words)} ({', '.join(extras)})"
    return " ".join(words) or ", ".join(extras) or "-"


def _int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None


def _window_series(table: pa.Table, metric: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """run id -> (steps [S], values [S]) of a metric logged once per log window."""
    if metric not in table.column_names:
        return {}
    runs = np.array(table.column("run_id").to_pylist(), dtype=object)
    steps = table.column("step").fill_null(-1).to_numpy()
    values = table.column(metric).to_numpy(zero_copy_only=False).astype(float)
    keep = np.isfinite(values) & (steps >= 0)
    return {r: (steps[keep & (runs == r)], values[keep & (runs == r)]) for r in set(runs[keep])}


def config_rows(table: pa.Table) -> list[Row]:
    """The rows of a :func:`orchestrator.analysis.query.load_runs` table: cells grouped by
    (step, KEY_PARAMS), seeds from ``params.train.seed`` (a run without it counts as its own
    seed; two cells of one seed are averaged). Values: NLL and FD as ``diffscale table``
    shows them, every ``sampling/*`` metric at the cell's step, and the mean over the log
    windows up to the cell's step of ``train/objective_var`` and ``train/grad_norm_var``."""
    from orchestrator.analysis.paper import ablation_rows
    from orchestrator.analysis.query import cell_rows, metric_columns

    sampling = [m for m in metric_columns(table) if m.startswith(SAMPLING_PREFIX)]
    table_rows: dict[tuple, list[dict[str, Any]]] = {}
    for r in ablation_rows(table):  # sorted; equal keys keep the cells' order (stable sort)
        table_rows.setdefault((r["trial"], r["cell"], r["Iters"]), []).append(r)
    windows = {m: _window_series(table, m) for m in WINDOW_METRICS}
    grouped: dict[tuple, dict[str, Any]] = {}
    for c in cell_rows(table, sampling).to_pylist():
        shown = table_rows[(c.get("trial") or c.get("run_name"), c["cell"], c["step"])].pop(0)
        if c["step"] is None:
            continue
        key = {f: c.get(f"params.{p}") for f, p in KEY_PARAMS.items()}
        key["T"] = _int(key["T"])
        seed = _int(c.get("params.train.seed"))
        seed = seed if seed is not None else f"run {c['run_id']}"
        values: dict[str, float | None] = {NLL: shown["NLL"], FD: shown["FID"]}
        values.update({m: c[m] for m in sampling})
        for m, series in windows.items():
            steps, v = series.get(c["run_id"], (np.zeros(0), np.zeros(0)))
            upto = v[steps <= c["step"]]
            values[m] = float(upto.mean()) if len(upto) else None
        row = grouped.setdefault(
            (c["step"], *key.values()), {"key": key, "values": {}, "trials": []}
        )
        row["trials"].append(c.get("trial") or c.get("run_name") or c["run_id"])
        for m, v in values.items():
            if v is not None and math.isfinite(v):
                row["values"].setdefault(m, {}).setdefault(seed, []).append(v)
    return [
        Row(
            step=k[0],
            **g["key"],
            values={
                m: {s: float(np.mean(v)) for s, v in by.items()} for m, by in g["values"].items()
            },
            trials=tuple(g["trials"]),
        )
        for k, g in grouped.items()
    ]


def _matches(row: Row, want: Mapping[str, Any]) -> bool:
    return all(getattr(row, k) == v for k, v in want.items())


def pairs(
    rows: Sequence[Row], a: Mapping[str, Any], b: Mapping[str, Any], free: Sequence[str] = ()
) -> list[tuple[Row, Row]]:
    """Each row matching ``a`` with each row matching ``b`` that has the same step and the
    same value of every setting neither names, except the ``free`` ones."""
    same = [f for f in ("step", *KEY_PARAMS) if f not in a and f not in b and f not in free]
    return [
        (x, y)
        for x in rows
        if _matches(x, a)
        for y in rows
        if y is not x and _matches(y, b) and all(getattr(x, f) == getattr(y, f) for f in same)
    ]


def _pairs_or_missing(
    rows: Sequence[Row], a: Mapping[str, Any], b: Mapping[str, Any], free: Sequence[str] = ()
) -> tuple[list[tuple[Row, Row]], str | None]:
    found = pairs(rows, a, b, free)
    if found:
        return found, None
    absent = [f"a {describe(w)} row" for w in (a, b) if not any(_matches(r, w) for r in rows)]
    return [], " and ".join(absent) or f"{describe(a)} and {describe(b)} rows that agree otherwise"


def compare(
    x: Row,
    y: Row,
    metric: str,
    direction: str | None,
    of: Callable[[Row], Mapping[Any, float]] | None = None,
    of_y: Callable[[Row], Mapping[Any, float]] | None = None,
    label: str | None = None,
) -> Comparison:
    """``metric`` of x minus y, or the per-seed values ``of(x)`` minus ``of_y(y)`` (default
    ``of``), judged against ``direction`` (None: stated only)."""
    of = of or (lambda row: row.values.get(metric, {}))
    of_y = of_y or of
    differ = [f for f in KEY_PARAMS if getattr(x, f) != getattr(y, f)]
    label = label or f"{metric} {x.name(differ)} - {y.name(differ)}"
    values = of(x), of_y(y)
    lacking = [row.name() for row, v in zip((x, y), values, strict=True) if not v]
    if lacking:
        return Comparison(label, metric, direction, missing=f"{metric} of {' and '.join(lacking)}")
    return Comparison(label, metric, direction, difference(*values))


# -- the findings -------------------------------------------------------------------------------


def finding_steps(rows: Sequence[Row]) -> Finding:
    """(1) T = 4000 vs T = 1000, linear schedule, L_simple (Sec. 3, Tables 1-2)."""
    claim = "T=4K gives lower NLL than T=1K (linear schedule, L_simple)"
    common = {"schedule": "linear", "objective": "simple"}
    found, missing = _pairs_or_missing(rows, {"T": 4000, **common}, {"T": 1000, **common})
    judged = tuple(compare(x, y, NLL, "lower") for x, y in found)
    return Finding(1, claim, "Sec. 3, Tables 1-2", judged, missing=missing)


def finding_schedule(rows: Sequence[Row]) -> Finding:
    """(2) Cosine (Eq. 17) vs linear: lower NLL and lower FD, L_simple and L_hybrid rows."""
    claim = "the cosine schedule gives lower NLL and lower FID than the linear one"
    judged: list[Comparison] = []
    for objective in ("simple", "hybrid"):
        for x, y in pairs(
            rows,
            {"schedule": "cosine", "objective": objective},
            {"schedule": "linear", "objective": objective},
        ):
            label = f"{describe({'objective': objective})} cosine - linear"
            judged += [compare(x, y, m, "lower", label=f"{m} {label}") for m in (NLL, FD)]
    missing = None if judged else "cosine and linear rows of one objective (L_simple/L_hybrid)"
    return Finding(2, claim, "Sec. 3.2, Eq. 17, Tables 1-2", tuple(judged), missing=missing)


def finding_hybrid(rows: Sequence[Row]) -> Finding:
    """(3) L_hybrid (Eq. 16) vs L_simple, cosine: lower NLL; the FD difference is stated."""
    claim = "L_hybrid gives lower NLL than L_simple at similar FID (cosine schedule)"
    cosine = {"schedule": "cosine"}
    found, missing = _pairs_or_missing(
        rows, {**cosine, "objective": "hybrid"}, {**cosine, "objective": "simple"}, ("var_type",)
    )
    judged = tuple(compare(x, y, NLL, "lower") for x, y in found)
    stated = tuple(compare(x, y, FD, None) for x, y in found)
    return Finding(3, claim, "Sec. 3.1, Eq. 16, Tables 1-2", judged, stated, missing)


def finding_vlb(rows: Sequence[Row]) -> Finding:
    """(4) L_vlb (importance-sampled when such a row exists) against every other cosine
    objective: lower NLL and higher FD."""
    claim = "L_vlb gives the lowest NLL and the worst FID among the cosine rows"
    vlb = {"schedule": "cosine", "objective": "vlb", "sampler": "loss-second-moment"}
    if not any(_matches(r, vlb) for r in rows):
        vlb = {"schedule": "cosine", "objective": "vlb"}
    judged: list[Comparison] = []
    for other in ("simple", "hybrid"):
        b = {"schedule": "cosine", "objective": other}
        for x, y in pairs(rows, vlb, b, free=("var_type", "sampler")):
            judged += [compare(x, y, NLL, "lower"), compare(x, y, FD, "higher")]
    missing = _pairs_or_missing(rows, vlb, {"schedule": "cosine", "objective": "simple"})[1]
    return Finding(
        4, claim, "Sec. 3.3, Tables 1-2", tuple(judged), missing=None if judged else missing
    )


def finding_importance(rows: Sequence[Row]) -> Finding:
    """(5) Importance sampling (Eq. 18) vs uniform t for L_vlb, cosine: a lower mean of
    ``train/objective_var``; ``train/grad_norm_var`` stated where logged."""
    claim = "importance sampling lowers the variance of the L_vlb objective"
    vlb = {"schedule": "cosine", "objective": "vlb"}
    found, missing = _pairs_or_missing(
        rows, {**vlb, "sampler": "loss-second-moment"}, {**vlb, "sampler": "uniform"}
    )
    judged = tuple(compare(x, y, TRAIN_OBJECTIVE_VAR, "lower") for x, y in found)
    stated = tuple(
        compare(x, y, TRAIN_GRAD_NORM_VAR, None)
        for x, y in found
        if x.values.get(TRAIN_GRAD_NORM_VAR) or y.values.get(TRAIN_GRAD_NORM_VAR)
    )
    return Finding(5, claim, "Sec. 3.3, Eq. 18", judged, stated, missing)


def _study(row: Row) -> str | None:
    """The FD family (fid, digits_fd) of a row's sampling-steps study at all T steps."""
    if row.T is None:
        return None
    return next(
        (f for f in FD_FAMILIES if row.values.get(sampling_metric(f, "ancestral", row.T))), None
    )


def _ratio(fd: str, method: str, steps: int) -> Callable[[Row], dict[Any, float]]:
    """Per seed, FD with ``steps`` strided steps over FD with all T steps (same method)."""

    def of(row: Row) -> dict[Any, float]:
        few = row.values.get(sampling_metric(fd, method, steps), {})
        full = row.values.get(sampling_metric(fd, method, row.T or 0), {})
        return {s: few[s] / full[s] for s in few if full.get(s, 0) > 0}

    return of


def finding_sampling(rows: Sequence[Row]) -> Finding:
    """(6) FD(k) / FD(all T) for k in FEW_STEPS: learned sigmas (L_hybrid) degrade less than
    fixed sigmas (L_simple, fixed_small and @fixed_large; Sec. 4, Fig. 8)."""
    claim = (
        "with learned sigmas 25-50 strided steps come close to the full-step FID; "
        "fixed sigmas degrade more"
    )
    found = [
        (x, y)
        for x, y in pairs(rows, {"objective": "hybrid"}, {"objective": "simple"}, ("var_type",))
        if _study(x) and _study(x) == _study(y)
    ]
    judged: list[Comparison] = []
    stated: list[Comparison] = []
    for x, y in found:
        fd = _study(x) or ""
        for k in FEW_STEPS:
            if not any(sampling_metric(fd, "ancestral", k) in r.values for r in (x, y)):
                continue
            ratio, hybrid = f"FD({k})/FD(all)", _ratio(fd, "ancestral", k)
            lacking = None if hybrid(x) else f"{ratio} of {x.name()}"
            name = f"{ratio} {x.name(('schedule', 'objective'))}"
            stated.append(Comparison(name, ratio, None, level(hybrid(x)), lacking))
            for method in ("ancestral", "ancestral_fixed_large"):
                fixed = _ratio(fd, method, k)
                if method != "ancestral" and not fixed(y):
                    continue  # @fixed_large is optional
                var = "fixed_large" if method != "ancestral" else y.var_type or "fixed"
                label = f"{ratio} L_hybrid - L_simple ({var})"
                judged.append(compare(x, y, ratio, "lower", of=hybrid, of_y=fixed, label=label))
    missing = None if judged else "sampling/<fd>/ancestral/<25, 50, T> of L_hybrid, L_simple"
    return Finding(6, claim, "Sec. 4, Fig. 8", tuple(judged), tuple(stated), missing)


FINDINGS: tuple[Callable[[Sequence[Row]], Finding], ...] = (
    finding_steps,
    finding_schedule,
    finding_hybrid,
    finding_vlb,
    finding_importance,
    finding_sampling,
)


def paper_findings(rows: Sequence[Row]) -> list[Finding]:
    """The six findings over the rows of one step."""
    return [f(rows) for f in FINDINGS]
