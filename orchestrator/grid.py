"""A validated sweep -> its grid cells -> the trials that serve them (compute-prefix sharing),
the plan's cost (training and evaluation FLOPs, GPU-hours: :mod:`orchestrator.cost`), and the
dry-run table.

Reading and validating the sweep file is :mod:`orchestrator.config.sweep_spec`;
:func:`load_plan` reads it, expands it (every cell is a full trial config, validated) and
checks the per-size resources and the datasets against the cells.

Compute-prefix sharing: cells that differ only in their compute budget train the same
model on the same data with the same constant learning rate (as in the paper), so the
smaller budgets are prefixes of the largest one. One trial per group runs to the largest
budget and evaluates (and checkpoints) at each smaller budget's step on the way; the cell
of a smaller budget is read at its step. A schedule that depended on the budget (decay,
warm-up to the end) would break this; the trainer's learning rate is constant.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion.flops import forward_flops_per_image, training_flops
from diffusion.unet import UNetConfig
from orchestrator.config import (
    BUDGET_KINDS,
    ConfigError,
    CostConfig,
    Problem,
    SweepSpec,
    TrialConfig,
    dataset_problems,
    read_sweep,
)
from orchestrator.cost import TrialCost, trial_cost
from orchestrator.names import (
    BUDGET_TAG,
    CELLS_TAG,
    ROLE_TAG,
    ROLE_TRIAL,
    SIZE_TAG,
    SWEEP_TAG,
    SWEEP_TRIALS_DIR,
    TRIAL_TAG,
)

__all__ = [
    "Cell",
    "SweepPlan",
    "SweepSpec",
    "TrialPlan",
    "budget_label",
    "expand",
    "load_plan",
    "load_sweep",
    "trial_table",
]

TABLE_HEADERS = [
    "cell",
    "size",
    "params",
    "GFLOP/img",
    "budget",
    "steps",
    "workers",
    "train FLOPs",
    "eval FLOPs",
    "GPU-h",
    "other axes",
    "trial",
]
PRICE_HEADER = "$"  # after GPU-h, when the sweep's cost section gives usd_per_gpu_hour


def _set(d: dict[str, Any], key: str, value: Any) -> None:
    """Set a canonical dotted key in a nested trial dict (a budget kind clears the others)."""
    *parents, last = key.split(".")
    node = d
    for part in parents:
        node = node.setdefault(part, {})
    if parents == ["budget"]:
        node.update(dict.fromkeys(BUDGET_KINDS))
    node[last] = value


def _slug(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-.") or "x"


@dataclass(frozen=True)
class Cell:
    """One point of the study: axis values and the trial config they give."""

    id: str  # "c00", in grid order then include order
    values: dict[str, Any]  # canonical dotted key -> value
    config: TrialConfig

    @property
    def budget_label(self) -> str:
        return budget_label(self.config)


def budget_label(cfg: TrialConfig) -> str:
    """``steps=200`` / ``images=64000`` / ``flops=1e+12``."""
    kind = cfg.budget.kind
    value = getattr(cfg.budget, kind)
    return f"{kind}={value:g}" if isinstance(value, float) else f"{kind}={value}"


@dataclass(frozen=True, kw_only=True)
class TrialPlan:
    """One trial to run and the cells it serves (at each cell's step)."""

    config: TrialConfig  # runs to the largest budget of its cells
    cells: tuple[Cell, ...]
    cell_steps: dict[str, int]  # cell id -> the step at which the cell's budget is spent
    size: str  # model size label: the model name, plus the width when overridden
    params: int
    forward_flops: int  # per image
    steps: int

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def flops(self) -> int:
        """Training FLOPs of the trial (3 x forward x images)."""
        return training_flops(self.forward_flops, self.steps * self.config.train.batch_size)

    def cost(self, cost: CostConfig) -> TrialCost:
        """Training and evaluation FLOPs, GPU-hours (and $) of the trial on its workers."""
        return trial_cost(self.config, self.forward_flops, cost)

    def tags(self, sweep: str) -> dict[str, str]:
        """MLflow tags of the trial's child run."""
        cells = [
            {"cell": c.id, "budget": c.budget_label, "step": self.cell_steps[c.id]}
            for c in self.cells
        ]
        return {
            ROLE_TAG: ROLE_TRIAL,
            SWEEP_TAG: sweep,
            TRIAL_TAG: self.name,
            SIZE_TAG: self.size,
            BUDGET_TAG: budget_label(self.config),
            CELLS_TAG: json.dumps(cells),
        }


@dataclass(frozen=True)
class SweepPlan:
    """The expanded sweep: cells, trials, and what prefix sharing saved."""

    spec: SweepSpec
    cells: tuple[Cell, ...]
    trials: tuple[TrialPlan, ...]

    @property
    def cell_flops(self) -> int:
        """Training FLOPs if every cell ran as its own trial."""
        out = 0
        for t in self.trials:
            for c in t.cells:
                out += training_flops(
                    t.forward_flops, t.cell_steps[c.id] * t.config.train.batch_size
                )
        return out

    @property
    def trial_flops(self) -> int:
        return sum(t.flops for t in self.trials)

    def saving(self) -> str:
        """One line: compute of the cells run separately vs the shared trials."""
        cells, trials = self.cell_flops, self.trial_flops
        pct = 100.0 * (1 - trials / cells) if cells else 0.0
        return (
            f"{len(self.cells)} cells in {len(self.trials)} trials: {trials:.3g} training "
            f"FLOPs instead of {cells:.3g} ({pct:.0f}% saved by compute-prefix sharing)"
        )

    def totals(self) -> str:
        """One line: training vs evaluation FLOPs of the trials, their shares, the GPU-hours
        (and $) at the sweep's ``cost:`` (every worker of a trial counted for its whole wall
        time, idle or not: :mod:`orchestrator.cost`)."""
        cost = self.spec.cost
        costs = [t.cost(cost) for t in self.trials]
        train = sum(c.train_flops for c in costs)
        evals = sum(c.eval_flops for c in costs)
        hours = sum(c.gpu_hours for c in costs)
        share = 100.0 / (train + evals) if train + evals else 0.0
        line = (
            f"total: {train:.3g} training FLOPs ({train * share:.0f}%) + {evals:.3g} "
            f"evaluation FLOPs ({evals * share:.0f}%); {hours:.3g} GPU-hours at "
            f"{cost.device_tflops:g} TFLOP/s sustained per GPU (cost.device_tflops; every "
            "worker of a trial counted for its whole wall time)"
        )
        if cost.usd_per_gpu_hour is not None:
            price = cost.usd_per_gpu_hour
            line += f"; ${_usd(hours * price)} at ${price:g}/GPU-hour"
        return line


def load_sweep(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    text: str | None = None,
    check_data: bool = True,
) -> SweepSpec:
    """The validated spec of a sweep file: ``load_plan(...).spec``."""
    return load_plan(path, overrides, text=text, check_data=check_data).spec


def load_plan(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    text: str | None = None,
    check_data: bool = True,
) -> SweepPlan:
    """Read, validate and expand a sweep file (``overrides``: ``--set key=value`` items;
    ``text``: the file's content, when it is not read from ``path``).

    Checks the keys, every axis value on its own, every cell's full trial config, the
    per-size resources and (``check_data``) that the datasets exist with the splits and image
    shape the models take; raises one ConfigError with every problem.
    """
    spec = read_sweep(path, overrides, text=text)
    plan = expand(spec)  # every cell validates, or one ConfigError lists what does not
    sizes = {t.size for t in plan.trials} | {t.config.model.name for t in plan.trials}
    widths = {str(t.config.model_config().model_channels) for t in plan.trials}
    if unknown := [k for k in spec.size_resources if str(k) not in sizes | widths]:
        known = f"sizes: {sorted(sizes)} or widths {sorted(widths)}"
        problems = [(f"size_resources.{k}", f"no such size in the sweep; {known}") for k in unknown]
        raise ConfigError(problems, spec.source)
    if check_data and (problems := dataset_problems(c.config for c in plan.cells)):
        raise ConfigError(problems, spec.source)
    return plan


def _trial_dict(spec: SweepSpec, values: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps({"name": spec.name, **spec.base}))
    for key, value in values.items():
        _set(d, key, value)
    return d


def _size_label(cfg: TrialConfig) -> str:
    width = cfg.model.overrides.get("model_channels")
    return f"{cfg.model.name}-c{width}" if width is not None else cfg.model.name


def _apply_size_resources(spec: SweepSpec, cfg: TrialConfig) -> TrialConfig:
    """``cfg`` with the resources of its size (by size label, model name or width)."""
    width = cfg.model.overrides.get("model_channels")
    keys = (_size_label(cfg), cfg.model.name, str(width))
    res = next((spec.size_resources[k] for k in keys if k in spec.size_resources), {})
    if not res:
        return cfg
    return cfg.with_overrides(
        [f"resources.{k}={json.dumps(v)}" for k, v in res.items()],
        source=f"{spec.source}: size_resources",
    )


_MISSING = object()


def _cell_values(spec: SweepSpec) -> list[dict[str, Any]]:
    keys = list(spec.grid)
    cells = [
        dict(zip(keys, combo, strict=True)) for combo in itertools.product(*spec.grid.values())
    ]
    if not keys:
        cells = [] if spec.include else [{}]

    def excluded(cell: dict[str, Any]) -> bool:
        return any(all(cell.get(k, _MISSING) == v for k, v in ex.items()) for ex in spec.exclude)

    cells = [c for c in cells if not excluded(c)]
    for extra in spec.include:
        if extra not in cells:
            cells.append(dict(extra))
    return cells


def _axis_problems(spec: SweepSpec) -> list[Problem]:
    """Each axis value on its own (the base config plus that value): a bad value is reported
    once, under its axis; a problem every value shares is the base config's, reported once
    under the YAML key or the ``--set`` it came from (``SweepSpec.origin``)."""
    found: list[tuple[str, int, Any, list[Problem]]] = []  # axis values may be unhashable
    checks = [
        (key, i, value) for key, values in spec.grid.items() for i, value in enumerate(values)
    ]
    for key, i, value in checks or [("", 0, None)]:
        try:
            cfg = TrialConfig.from_dict(_trial_dict(spec, {key: value} if key else {}))
            _apply_size_resources(spec, cfg)
            found.append((key, i, value, []))
        except ConfigError as error:
            found.append((key, i, value, error.problems))

    def on_axis(key: str) -> bool:  # an axis sets this key: its problem is the axis value's
        return any(
            key == a or key.startswith(a + ".") or a.startswith(key + ".") for a in spec.grid
        )

    every = set.intersection(*(set(f[3]) for f in found))
    shared = {p for p in every if not on_axis(p[0])}
    problems = [(spec.origin(k), m) for k, m in dict.fromkeys(found[0][3]) if (k, m) in shared]
    for key, i, value, found_here in found:
        problems += [
            (f"grid.{key}[{i}] = {value!r}: {k}", m) for k, m in found_here if (k, m) not in shared
        ]
    return problems


def _cells(spec: SweepSpec) -> list[Cell]:
    """Every cell as a validated trial config; one ConfigError lists every bad one."""
    problems = _axis_problems(spec)
    if problems:
        raise ConfigError(problems, spec.source)
    cells: list[Cell] = []
    for i, values in enumerate(_cell_values(spec)):
        cell_id = f"c{i:02d}"
        try:
            cfg = _apply_size_resources(spec, TrialConfig.from_dict(_trial_dict(spec, values)))
        except ConfigError as error:
            label = ", ".join(f"{k}={v}" for k, v in values.items())
            problems += [(f"cell {cell_id} ({label}): {k}", m) for k, m in error.problems]
            continue
        cells.append(Cell(cell_id, values, cfg))
    if problems:
        raise ConfigError(problems, spec.source)
    if not cells:
        raise ConfigError([("exclude", "every cell of the grid is excluded")], spec.source)
    return cells


def expand(spec: SweepSpec) -> SweepPlan:
    """The cells of the sweep and the trials that serve them (see the module docstring)."""
    cells = _cells(spec)
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        d = cell.config.to_dict()
        shared = {k: v for k, v in d.items() if k not in ("name", "budget")}
        key = json.dumps(shared if spec.share_compute_prefix else {"cell": cell.id}, sort_keys=True)
        groups.setdefault(key, []).append(cell)
    axes = [k for k in spec.grid if not (spec.share_compute_prefix and k.startswith("budget."))]
    trials = []
    for i, members in enumerate(groups.values()):
        base = members[0].config
        unet = base.model_config()
        fwd = forward_flops_per_image(unet)
        batch = base.train.batch_size
        cell_steps = {c.id: c.config.budget.total_steps(batch, fwd) for c in members}
        biggest = max(members, key=lambda c: cell_steps[c.id])
        extra_keys = sorted({k for c in members for k in c.values} - set(spec.grid))
        first = members[0].values
        slug = "-".join(_slug(first.get(k, "")) for k in axes + extra_keys if k in first)
        name = f"{spec.name}-t{i:02d}" + (f"-{slug}" if slug else "")
        at_steps = sorted(set(biggest.config.eval.at_steps) | set(cell_steps.values()))
        cfg = biggest.config.with_overrides(
            [
                f"name={name[:100]}",
                f"eval.at_steps={json.dumps(at_steps)}",
                f"storage.path={spec.storage_path}/{SWEEP_TRIALS_DIR}",
            ],
            source=spec.source,
        )
        trials.append(
            TrialPlan(
                config=cfg,
                cells=tuple(members),
                cell_steps=cell_steps,
                size=_size_label(cfg),
                params=_count_params(unet),
                forward_flops=fwd,
                steps=cell_steps[biggest.id],
            )
        )
    return SweepPlan(spec, tuple(cells), tuple(trials))


def _count_params(unet: UNetConfig) -> int:
    import torch

    from diffusion.unet import build_model, count_parameters

    with torch.device("meta"):
        return count_parameters(build_model(unet))


def _usd(amount: float | None) -> str:
    if amount is None:
        return "-"
    return f"{amount:,.0f}" if amount >= 100 else f"{amount:.2g}"


def trial_table(plan: SweepPlan) -> tuple[list[list[Any]], list[str]]:
    """Rows and headers of the dry-run table: one row per cell. Eval FLOPs, GPU-hours (and $)
    are the trial's, on the row of its largest cell (its other cells are read on the way)."""
    rows = []
    priced = plan.spec.cost.usd_per_gpu_hour is not None
    for t in plan.trials:
        res = t.config.resources
        cost = t.cost(plan.spec.cost)
        last = next(c.id for c in t.cells if t.cell_steps[c.id] == t.steps)
        for c in t.cells:
            step = t.cell_steps[c.id]
            flops = training_flops(t.forward_flops, step * t.config.train.batch_size)
            axes = ", ".join(
                f"{k.split('.')[-1]}={_slug(v)}"
                for k, v in c.values.items()
                if not k.startswith(("budget.", "model.name"))
            )
            rows.append(
                [
                    c.id,
                    t.size,
                    f"{t.params / 1e6:.2f}M",
                    f"{t.forward_flops / 1e9:.3g}",
                    c.budget_label,
                    step,
                    f"{res.num_workers}{' GPU' if res.use_gpu else ''}",
                    f"{flops:.3g}",
                    f"{cost.eval_flops:.3g}" if c.id == last else "-",
                    f"{cost.gpu_hours:.3g}" if c.id == last else "-",
                    *([_usd(cost.usd) if c.id == last else "-"] if priced else []),
                    axes or "-",
                    t.name + ("" if step == t.steps else f" @ {step}"),
                ]
            )
    headers = list(TABLE_HEADERS)
    if priced:
        headers.insert(headers.index("GPU-h") + 1, PRICE_HEADER)
    return rows, headers
