"""A sweep YAML -> its grid cells -> the trials that serve them (with compute-prefix sharing).

A sweep file is a trial config (every section of :class:`~orchestrator.config.TrialConfig`:
the base of every cell) plus::

    name: demo                         # the MLflow experiment, Ray Tune run and storage folder
    grid:                              # axes: dotted key -> values; cells = their product
      model.name: [digits-xs, digits-s]
      budget.flops: [1.0e12, 2.0e12]
    include: [{model.name: digits-m, budget.flops: 1.0e12}]   # extra cells
    exclude: [{model.name: digits-s, budget.flops: 2.0e12}]   # drop matching cells
    max_concurrent_trials: 2
    share_compute_prefix: true         # one trial per size serves every budget (constant LR)
    size_resources: {digits-s: {num_workers: 2}}               # per-size resources

Axis keys are ``section.field`` (``train.lr``, ``diffusion.schedule``) or, for the model,
``model.name`` and any UNet field (``model.model_channels``, alias ``model.channels``),
which becomes a model override. :func:`load_sweep` checks every key and value before any Ray
resource is taken and raises one :class:`~orchestrator.validation.ConfigError` with every
problem (file, key, allowed values).

Compute-prefix sharing: cells that differ only in their compute budget train the same
model on the same data with the same constant learning rate (as in the paper), so the
smaller budgets are prefixes of the largest one. One trial per group runs to the largest
budget and evaluates (and checkpoints) at each smaller budget's step on the way; the cell
of a smaller budget is read at its step. A schedule that depended on the budget (decay,
warm-up to the end) would break this; the trainer's learning rate is constant.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diffusion.flops import forward_flops_per_image, training_flops
from diffusion.unet import UNetConfig
from orchestrator.config import (
    _BUDGET_KINDS,
    _SECTIONS,
    NAME_PATTERN,
    ResourcesConfig,
    TrialConfig,
)
from orchestrator.validation import ConfigError, Problem, build_section, load_yaml, unknown_key

__all__ = ["Cell", "SweepPlan", "SweepSpec", "TrialPlan", "expand", "load_plan", "load_sweep"]

SWEEP_KEYS = ("name", "description", "grid", "include", "exclude", "max_concurrent_trials",
              "share_compute_prefix", "size_resources")  # fmt: skip
_ALIASES = {"model.channels": "model.overrides.model_channels"}
_UNET_FIELDS = [f.name for f in dataclasses.fields(UNetConfig)]
_RESOURCE_KEYS = ("num_workers", "use_gpu", "cpus_per_worker")


def canonical_key(key: str) -> str:
    """``model.channels`` / ``model.<UNet field>`` -> ``model.overrides.<field>``."""
    key = _ALIASES.get(key, key)
    section, _, rest = key.partition(".")
    if section == "model" and rest in _UNET_FIELDS:
        return f"model.overrides.{rest}"
    return key


def _key_problem(where: str, key: Any) -> Problem | None:
    """The problem of an axis/include/exclude key that names no config field."""
    if not isinstance(key, str):
        return where, f"expected a dotted key such as 'train.lr', got {key!r}"
    key = canonical_key(key)
    section, _, rest = key.partition(".")
    if section not in _SECTIONS:
        return unknown_key(f"{where}.{section}".strip("."), list(_SECTIONS))
    if section == "model" and rest.startswith("overrides."):
        field = rest.split(".", 1)[1]
        if field in _UNET_FIELDS:
            return None
        return unknown_key(f"{where}: model.{field}", ["name", *_UNET_FIELDS])
    allowed = [f.name for f in dataclasses.fields(_SECTIONS[section])]
    if section == "model":
        allowed = ["name", *_UNET_FIELDS, "channels"]
    if rest not in allowed:
        return unknown_key(f"{where}: {section}.{rest}", allowed)
    return None


def _set(d: dict[str, Any], key: str, value: Any) -> None:
    """Set a canonical dotted key in a nested trial dict (a budget kind clears the others)."""
    *parents, last = key.split(".")
    node = d
    for part in parents:
        node = node.setdefault(part, {})
    if parents == ["budget"]:
        node.update(dict.fromkeys(_BUDGET_KINDS))
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


@dataclass(frozen=True)
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

    def tags(self, sweep: str) -> dict[str, str]:
        """MLflow tags of the trial's child run."""
        cells = [{"cell": c.id, "budget": c.budget_label, "step": self.cell_steps[c.id]}
                 for c in self.cells]  # fmt: skip
        return {"diffscale.role": "trial", "sweep": sweep, "trial": self.name,
                "size": self.size, "budget": budget_label(self.config),
                "cells": json.dumps(cells)}  # fmt: skip


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
        return (f"{len(self.cells)} cells in {len(self.trials)} trials: {trials:.3g} training "
                f"FLOPs instead of {cells:.3g} ({pct:.0f}% saved by compute-prefix "
                "sharing)")  # fmt: skip


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file; its tracking URI and storage path are absolute (pinned at
    load time, so a later command from another directory finds the same sweep)."""

    name: str
    base: dict[str, Any]  # the trial sections as given, with the sweep's defaults and pins
    grid: dict[str, list[Any]]  # canonical key -> values, in file order
    include: list[dict[str, Any]]
    exclude: list[dict[str, Any]]
    max_concurrent_trials: int
    share_compute_prefix: bool
    size_resources: dict[str, dict[str, Any]]
    description: str
    source: str
    text: str  # the file as given (logged as an artifact)
    overrides: tuple[str, ...]  # --set items, then the pins: load_sweep(source, overrides, text)

    @property
    def tracking_uri(self) -> str:
        return self.base["tracking"]["uri"]

    @property
    def experiment(self) -> str:
        return self.base["tracking"]["experiment"]

    @property
    def storage_path(self) -> str:
        """Absolute storage root of the sweep (a local path or s3:// URI)."""
        return self.base["storage"]["path"].rstrip("/") + "/" + self.name

    @property
    def storage_endpoint(self) -> str | None:
        return self.base["storage"].get("endpoint_url")

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for comparing a resubmitted sweep with the stored one."""
        return json.loads(json.dumps({
            "name": self.name, "base": self.base, "grid": self.grid, "include": self.include,
            "exclude": self.exclude, "share_compute_prefix": self.share_compute_prefix,
            "size_resources": self.size_resources,
        }))  # fmt: skip


def _read(path: str | Path, text: str | None = None) -> tuple[dict, str]:
    if text is None:
        try:
            text = Path(path).read_text()
        except OSError as error:
            msg = f"cannot read the sweep file: {error.strerror}"
            raise ConfigError([("", msg)], str(path)) from None
    try:
        data = load_yaml(text, unique_keys=True)
    except yaml.YAMLError as error:
        raise ConfigError([("", f"invalid YAML: {error}")], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([("", f"expected a mapping of keys, got {data!r}")], str(path))
    return data, text


def _apply_overrides(data: dict, overrides: Sequence[str]) -> list[Problem]:
    """``--set key=value``: a trial key (``train.lr=3e-4``), a sweep key
    (``max_concurrent_trials=1``) or an axis (``grid.budget.steps=[100,200]``)."""
    problems: list[Problem] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append((f"--set {item}", "expected dotted.key=value"))
            continue
        try:
            value = load_yaml(text)
        except yaml.YAMLError as error:
            problems.append((f"--set {key}", f"cannot parse {text!r}: {error}"))
            continue
        if key.startswith("grid."):
            data.setdefault("grid", {})
            if not isinstance(data["grid"], dict):
                problems.append(("--set grid", "the file's grid is not a mapping"))
                continue
            data["grid"][key[5:]] = value
        elif "." not in key:
            data[key] = value
        else:
            *parents, last = canonical_key(key).split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    problems.append((f"--set {key}", f"{part} holds no keys"))
                    break
            else:
                if parents == ["budget"] and last in _BUDGET_KINDS:
                    node.update(dict.fromkeys(_BUDGET_KINDS))
                node[last] = value
    return problems


def _path_pins(data: dict) -> list[str]:
    """Overrides that make the tracking URI and the storage path absolute (the default
    SQLite file and storage folder live in the working directory)."""
    pins = []
    for section, key, resolve in (("tracking", "uri", lambda c: c.resolve_uri()),
                                  ("storage", "path", lambda c: c.resolve_path())):  # fmt: skip
        given = data.get(section, {})
        if not isinstance(given, dict):
            continue  # validation reports it
        try:
            value = resolve(_SECTIONS[section](**({key: given[key]} if key in given else {})))
        except ConfigError:
            continue
        pins.append(f"{section}.{key}={json.dumps(value)}")
    return pins


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
    source = str(path)
    data, text = _read(path, text)
    problems = _apply_overrides(data, overrides)
    pins = [] if problems else _path_pins(data)
    _apply_overrides(data, pins)
    problems += [unknown_key(k, [*SWEEP_KEYS, *_SECTIONS]) for k in data
                 if k not in SWEEP_KEYS and k not in _SECTIONS]  # fmt: skip
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        problems.append(("name", f"required: a name matching {NAME_PATTERN}, got {name!r}"))
    base = {k: v for k, v in data.items() if k in _SECTIONS}
    if isinstance(name, str):
        tracking = base.setdefault("tracking", {})
        if isinstance(tracking, dict):
            tracking.setdefault("experiment", name)  # experiment = sweep

    grid_in = data.get("grid") or {}
    grid: dict[str, list[Any]] = {}
    if not isinstance(grid_in, dict):
        problems.append(("grid", f"expected a mapping of dotted key -> list, got {grid_in!r}"))
        grid_in = {}
    for key, values in grid_in.items():
        if problem := _key_problem("grid", key):
            problems.append(problem)
            continue
        canon = canonical_key(key)
        if canon in grid:
            first = next(k for k in grid_in if canonical_key(k) == canon and k != key)
            problems.append((f"grid.{key}", f"duplicate axis: the same key as grid.{first}"))
            continue
        if not isinstance(values, list) or not values:
            problems.append((f"grid.{key}", f"expected a non-empty list of values, got {values!r}"))
            continue
        dupes = sorted({repr(v) for v in values if values.count(v) > 1})
        if dupes:
            problems.append((f"grid.{key}", f"duplicate values {', '.join(dupes)}"))
        grid[canon] = values
    if len([k for k in grid if k.startswith("budget.")]) > 1:
        axes = [k for k in grid if k.startswith("budget.")]
        problems.append(("grid", f"at most one budget axis (steps, images or flops), got {axes}"))

    cells_extra: dict[str, list[dict[str, Any]]] = {}
    for kind in ("include", "exclude"):
        items = data.get(kind) or []
        cells_extra[kind] = []
        if not isinstance(items, list):
            problems.append(
                (kind, f"expected a list of mappings of dotted key -> value, got {items!r}")
            )
            continue
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not item:
                problems.append(
                    (f"{kind}[{i}]", f"expected a mapping of dotted key -> value, got {item!r}")
                )
                continue
            bad = [p for k in item if (p := _key_problem(f"{kind}[{i}]", k))]
            problems += bad
            if not bad:
                cells_extra[kind].append({canonical_key(k): v for k, v in item.items()})

    mct = data.get("max_concurrent_trials", 2)
    if isinstance(mct, bool) or not isinstance(mct, int) or mct < 1:
        problems.append(("max_concurrent_trials", f"expected an integer >= 1, got {mct!r}"))
    share = data.get("share_compute_prefix", True)
    if not isinstance(share, bool):
        problems.append(("share_compute_prefix", f"expected true or false, got {share!r}"))
    size_resources = data.get("size_resources") or {}
    if not isinstance(size_resources, dict):
        problems.append(
            ("size_resources", f"expected a mapping of size -> resources, got {size_resources!r}")
        )
        size_resources = {}
    for size, res in size_resources.items():
        if not isinstance(res, dict):
            problems.append((f"size_resources.{size}", f"expected a mapping, got {res!r}"))
            continue
        problems += [unknown_key(f"size_resources.{size}.{k}", list(_RESOURCE_KEYS))
                     for k in res if k not in _RESOURCE_KEYS]  # fmt: skip
        base_res = data.get("resources") if isinstance(data.get("resources"), dict) else {}
        try:
            build_section(ResourcesConfig, "resources", {**base_res, **res},
                          ResourcesConfig().to_dict())  # fmt: skip
        except ConfigError as error:
            problems += [(f"size_resources.{size}: {k}", m) for k, m in error.problems]
    description = data.get("description", "")
    if problems:
        raise ConfigError(problems, source)
    spec = SweepSpec(
        name=name, base=base, grid=grid, include=cells_extra["include"],
        exclude=cells_extra["exclude"], max_concurrent_trials=mct, share_compute_prefix=share,
        size_resources=size_resources, description=str(description), source=source, text=text,
        overrides=(*overrides, *pins),
    )  # fmt: skip
    plan = expand(spec)  # every cell validates, or one ConfigError lists what does not
    sizes = {t.size for t in plan.trials} | {t.config.model.name for t in plan.trials}
    widths = {str(t.config.model_config().model_channels) for t in plan.trials}
    if unknown := [k for k in size_resources if str(k) not in sizes | widths]:
        raise ConfigError([(f"size_resources.{k}", f"no such size in the sweep; sizes: "
                            f"{sorted(sizes)} or widths {sorted(widths)}") for k in unknown],
                          source)  # fmt: skip
    if check_data and (problems := dataset_problems(plan.cells)):
        raise ConfigError(problems, source)
    return plan


def dataset_problems(cells: Sequence[Cell]) -> list[Problem]:
    """A prepared dataset must exist, with the splits the trials read."""
    from diffusion.data import storage
    from diffusion.data.shards import read_manifest

    problems: list[Problem] = []
    seen: set[tuple] = set()
    for cell in cells:
        data, unet = cell.config.data, cell.config.model_config()
        want = (unet.in_channels, unet.image_size, unet.image_size)
        key = (data.dataset, data.train_split, data.eval_split, want)
        if data.dataset == "digits" or key in seen:
            continue
        seen.add(key)
        try:
            fs, root = storage.resolve(data.dataset, endpoint_url=data.endpoint_url)
            manifest = read_manifest(fs, root, data.dataset)
        except (OSError, ValueError) as error:
            problems.append(("data.dataset", f"{error}"))
            continue
        for split_key in ("train_split", "eval_split"):
            split = getattr(data, split_key)
            if split not in manifest.splits:
                msg = f"{data.dataset} has no split {split!r}; it has {sorted(manifest.splits)}"
                problems.append((f"data.{split_key}", msg))
            elif tuple(manifest.splits[split].shape) != want:
                got = "x".join(map(str, manifest.splits[split].shape))
                msg = (f"{data.dataset} holds {got} images; model {cell.config.model.name!r} "
                       f"takes {'x'.join(map(str, want))}")  # fmt: skip
                problems.append(("model", msg))
    return problems


def _trial_dict(spec: SweepSpec, values: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps({"name": spec.name, **spec.base}))
    for key, value in values.items():
        _set(d, key, value)
    return d


def _size_label(cfg: TrialConfig) -> str:
    width = cfg.model.overrides.get("model_channels")
    return f"{cfg.model.name}-c{width}" if width is not None else cfg.model.name


def _resources_for(spec: SweepSpec, size: str, model_name: str, width: Any) -> dict[str, Any]:
    for key in (size, model_name, str(width)):
        if key in spec.size_resources:
            return spec.size_resources[key]
    return {}


_MISSING = object()


def _cell_values(spec: SweepSpec) -> list[dict[str, Any]]:
    keys = list(spec.grid)
    cells = [
        dict(zip(keys, combo, strict=True)) for combo in itertools.product(*spec.grid.values())
    ]
    if not keys:
        cells = [] if spec.include else [{}]
    cells = [c for c in cells if not any(all(c.get(k, _MISSING) == v for k, v in ex.items())
                                         for ex in spec.exclude)]  # fmt: skip
    for extra in spec.include:
        if extra not in cells:
            cells.append(dict(extra))
    return cells


def expand(spec: SweepSpec) -> SweepPlan:
    """The cells of the sweep and the trials that serve them (see the module docstring)."""
    problems: list[Problem] = []
    # Each axis value on its own first: a bad value is reported once, under its axis.
    for key, values in spec.grid.items():
        for i, value in enumerate(values):
            try:
                cfg = TrialConfig.from_dict(_trial_dict(spec, {key: value}))
                _apply_size_resources(spec, cfg)
            except ConfigError as error:
                problems += [(f"grid.{key}[{i}] = {value!r}: {k}", m) for k, m in error.problems]
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
        steps = cell_steps[biggest.id]
        extra_keys = sorted({k for c in members for k in c.values} - set(spec.grid))
        slug = "-".join(_slug(members[0].values.get(k, "")) for k in axes + extra_keys
                        if k in members[0].values)  # fmt: skip
        name = f"{spec.name}-t{i:02d}" + (f"-{slug}" if slug else "")
        at_steps = sorted(set(biggest.config.eval.at_steps) | set(cell_steps.values()))
        cfg = biggest.config.with_overrides(
            [f"name={name[:100]}", f"eval.at_steps={json.dumps(at_steps)}",
             f"storage.path={spec.storage_path}/trials"], source=spec.source,
        )  # fmt: skip
        params = _count_params(unet)
        trials.append(TrialPlan(cfg, tuple(members), cell_steps, _size_label(cfg), params, fwd,
                                steps))  # fmt: skip
    return SweepPlan(spec, tuple(cells), tuple(trials))


def _apply_size_resources(spec: SweepSpec, cfg: TrialConfig) -> TrialConfig:
    res = _resources_for(spec, _size_label(cfg), cfg.model.name,
                         cfg.model.overrides.get("model_channels"))  # fmt: skip
    if not res:
        return cfg
    return cfg.with_overrides([f"resources.{k}={json.dumps(v)}" for k, v in res.items()],
                              source=f"{spec.source}: size_resources")  # fmt: skip


def _count_params(unet: UNetConfig) -> int:
    import torch

    from diffusion.unet import build_model, count_parameters

    with torch.device("meta"):
        return count_parameters(build_model(unet))


def trial_table(plan: SweepPlan) -> tuple[list[list[Any]], list[str]]:
    """Rows and headers of the dry-run table: one row per cell."""
    rows = []
    for t in plan.trials:
        res = t.config.resources
        for c in t.cells:
            step = t.cell_steps[c.id]
            flops = training_flops(t.forward_flops, step * t.config.train.batch_size)
            axes = ", ".join(f"{k.split('.')[-1]}={_slug(v)}" for k, v in c.values.items()
                             if not k.startswith(("budget.", "model.name")))  # fmt: skip
            rows.append([
                c.id, t.size, f"{t.params / 1e6:.2f}M", f"{t.forward_flops / 1e9:.3g}",
                c.budget_label, step, f"{res.num_workers}{' GPU' if res.use_gpu else ''}",
                f"{flops:.3g}", axes or "-", t.name + ("" if step == t.steps else f" @ {step}"),
            ])  # fmt: skip
    headers = ["cell", "size", "params", "GFLOP/img", "budget", "steps", "workers",
               "train FLOPs", "other axes", "trial"]  # fmt: skip
    return rows, headers
