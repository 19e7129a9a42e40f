"""A sweep YAML, read and validated: :class:`SweepSpec` (before its grid is expanded).

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
    cost: {device_tflops: 125, usd_per_gpu_hour: 2.0}          # the dry run's GPU-hours and $

Axis keys are ``section.field`` (``train.lr``, ``diffusion.schedule``) or, for the model,
``model.name`` and any UNet field (``model.model_channels``, alias ``model.channels``),
which becomes a model override. :func:`read_sweep` checks every key and value it can
without expanding the grid and raises one :class:`~orchestrator.config.ConfigError` with
every problem (file, key, allowed values); :func:`orchestrator.grid.load_plan` then checks
every cell and the datasets (:func:`dataset_problems`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from diffusion.data import storage
from diffusion.data.registry import builtin_dataset
from diffusion.data.shards import read_manifest
from diffusion.unet import UNetConfig
from orchestrator.config.sections import BUDGET_KINDS, ResourcesConfig, mask_passwords
from orchestrator.config.trial import NAME_PATTERN, SECTIONS, TrialConfig
from orchestrator.config.validation import (
    ConfigError,
    Problem,
    Section,
    build_section,
    load_yaml,
    prepare_command,
    spec,
    unknown_key,
)

__all__ = [
    "DEFAULT_DEVICE_TFLOPS",
    "KEY_ALIASES",
    "RESOURCE_KEYS",
    "SWEEP_KEYS",
    "UNET_FIELDS",
    "CostConfig",
    "SweepSpec",
    "canonical_key",
    "dataset_problems",
    "read_sweep",
]

SWEEP_KEYS = (
    "name",
    "description",
    "grid",
    "include",
    "exclude",
    "max_concurrent_trials",
    "share_compute_prefix",
    "size_resources",
    "cost",
)
KEY_ALIASES = {"model.channels": "model.overrides.model_channels"}
UNET_FIELDS = [f.name for f in dataclasses.fields(UNetConfig)]
RESOURCE_KEYS = tuple(f.name for f in dataclasses.fields(ResourcesConfig))
# Sustained TFLOP/s per GPU when the sweep names none: 40% of an A100's 312 TFLOP/s dense
# bf16 peak. Conservative for these UNets (convolutions and attention at <= 64x64 with
# GroupNorm between them rarely sustain more); measure yours (benchmarks/gpu.sh) and set it.
DEFAULT_DEVICE_TFLOPS = 125.0


@dataclass(frozen=True, kw_only=True)
class CostConfig(Section):
    """The sweep's ``cost:`` section: what the dry run's GPU-hours (and $) assume."""

    section: ClassVar[str] = "cost"
    device_tflops: float = spec(DEFAULT_DEVICE_TFLOPS, gt=0)  # sustained TFLOP/s per GPU
    usd_per_gpu_hour: float | None = spec(None, gt=0)  # null: no $ column


def canonical_key(key: str) -> str:
    """``model.channels`` / ``model.<UNet field>`` -> ``model.overrides.<field>``."""
    key = KEY_ALIASES.get(key, key)
    section, _, rest = key.partition(".")
    if section == "model" and rest in UNET_FIELDS:
        return f"model.overrides.{rest}"
    return key


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
    cost: CostConfig = dataclasses.field(default_factory=CostConfig)  # not part of to_dict
    sets: tuple[str, ...] = ()  # the --set items alone (without the pins): where keys came from

    def origin(self, key: str) -> str:
        """Where the base config's ``key`` (a problem's dotted key) came from: ``--set item``
        for the last ``--set`` that wrote it or a key above it, else ``key`` (the file's)."""
        for item in reversed(self.sets):
            given = canonical_key(item.partition("=")[0].strip())
            if key == given or key.startswith(given + ".") or given.startswith(key + "."):
                return f"--set {mask_passwords(item)}"
        return key

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
        definition = {
            "name": self.name,
            "base": self.base,
            "grid": self.grid,
            "include": self.include,
            "exclude": self.exclude,
            "share_compute_prefix": self.share_compute_prefix,
            "size_resources": self.size_resources,
        }
        return json.loads(json.dumps(definition))


def _key_problem(where: str, key: Any) -> Problem | None:
    """The problem of an axis/include/exclude key that names no config field."""
    if not isinstance(key, str):
        return where, f"expected a dotted key such as 'train.lr', got {key!r}"
    key = canonical_key(key)
    section, _, rest = key.partition(".")
    if section not in SECTIONS:
        return unknown_key(f"{where}.{section}".strip("."), list(SECTIONS))
    if section == "model" and rest.startswith("overrides."):
        field = rest.split(".", 1)[1]
        if field in UNET_FIELDS:
            return None
        return unknown_key(f"{where}: model.{field}", ["name", *UNET_FIELDS])
    allowed = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if section == "model":
        allowed = ["name", *UNET_FIELDS, "channels"]
    if rest not in allowed:
        return unknown_key(f"{where}: {section}.{rest}", allowed)
    return None


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
                if parents == ["budget"] and last in BUDGET_KINDS:
                    node.update(dict.fromkeys(BUDGET_KINDS))
                node[last] = value
    return problems


def _path_pins(data: dict) -> list[str]:
    """Overrides that make the tracking URI and the storage path absolute (the default
    SQLite file and storage folder live in the working directory)."""
    pins = []
    resolvers = (
        ("tracking", "uri", lambda c: c.resolve_uri()),
        ("storage", "path", lambda c: c.resolve_path()),
    )
    for section, key, resolve in resolvers:
        given = data.get(section, {})
        if not isinstance(given, dict):
            continue  # validation reports it
        try:
            value = resolve(SECTIONS[section](**({key: given[key]} if key in given else {})))
        except ConfigError:
            continue
        pins.append(f"{section}.{key}={json.dumps(value)}")
    return pins


def _grid_problems(grid_in: Any, grid: dict[str, list[Any]]) -> list[Problem]:
    """Check the axes of ``grid_in``; the valid ones go into ``grid`` under canonical keys."""
    if not isinstance(grid_in, dict):
        return [("grid", f"expected a mapping of dotted key -> list, got {grid_in!r}")]
    problems: list[Problem] = []
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
    return problems


def _cells_problems(kind: str, items: Any, cells: list[dict[str, Any]]) -> list[Problem]:
    """Check the ``include`` or ``exclude`` list; the valid cells go into ``cells``."""
    if not isinstance(items, list):
        return [(kind, f"expected a list of mappings of dotted key -> value, got {items!r}")]
    problems: list[Problem] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not item:
            problems.append(
                (f"{kind}[{i}]", f"expected a mapping of dotted key -> value, got {item!r}")
            )
            continue
        bad = [p for k in item if (p := _key_problem(f"{kind}[{i}]", k))]
        problems += bad
        if not bad:
            cells.append({canonical_key(k): v for k, v in item.items()})
    return problems


def _size_resources_problems(size_resources: dict, base_resources: Any) -> list[Problem]:
    problems: list[Problem] = []
    base = base_resources if isinstance(base_resources, dict) else {}
    for size, res in size_resources.items():
        if not isinstance(res, dict):
            problems.append((f"size_resources.{size}", f"expected a mapping, got {res!r}"))
            continue
        problems += [
            unknown_key(f"size_resources.{size}.{k}", list(RESOURCE_KEYS))
            for k in res
            if k not in RESOURCE_KEYS
        ]
        try:
            build_section(
                ResourcesConfig, "resources", {**base, **res}, ResourcesConfig().to_dict()
            )
        except ConfigError as error:
            problems += [(f"size_resources.{size}: {k}", m) for k, m in error.problems]
    return problems


def _or_empty(value: Any) -> Any:
    return {} if value is None else value


def read_sweep(
    path: str | Path, overrides: Sequence[str] = (), *, text: str | None = None
) -> SweepSpec:
    """Read a sweep file and check everything but its cells (``overrides``: ``--set
    key=value`` items; ``text``: the file's content, when it is not read from ``path``).

    Checks the keys, the axes, include/exclude, the sweep's own settings and the per-size
    resources; raises one ConfigError with every problem. The tracking URI and storage path
    are pinned as absolute overrides (``SweepSpec.overrides`` ends with them).
    """
    source = str(path)
    data, text = _read(path, text)
    problems = _apply_overrides(data, overrides)
    pins = [] if problems else _path_pins(data)
    _apply_overrides(data, pins)
    problems += [
        unknown_key(k, [*SWEEP_KEYS, *SECTIONS])
        for k in data
        if k not in SWEEP_KEYS and k not in SECTIONS
    ]
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        problems.append(("name", f"required: a name matching {NAME_PATTERN}, got {name!r}"))
    base = {k: v for k, v in data.items() if k in SECTIONS}
    if isinstance(name, str):
        tracking = base.setdefault("tracking", {})
        if isinstance(tracking, dict):
            tracking.setdefault("experiment", name)  # experiment = sweep

    grid: dict[str, list[Any]] = {}
    problems += _grid_problems(data.get("grid") or {}, grid)
    cells: dict[str, list[dict[str, Any]]] = {"include": [], "exclude": []}
    for kind, found in cells.items():
        problems += _cells_problems(kind, data.get(kind) or [], found)

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
    problems += _size_resources_problems(size_resources, data.get("resources"))
    cost = CostConfig()
    try:
        cost = build_section(CostConfig, "cost", _or_empty(data.get("cost")), {})
    except ConfigError as error:
        problems += error.problems
    if problems:
        raise ConfigError(problems, source)
    return SweepSpec(
        name=name,
        base=base,
        grid=grid,
        include=cells["include"],
        exclude=cells["exclude"],
        max_concurrent_trials=mct,
        share_compute_prefix=share,
        size_resources=size_resources,
        description=str(data.get("description", "")),
        source=source,
        text=text,
        overrides=(*overrides, *pins),
        cost=cost,
        sets=tuple(overrides),
    )


def dataset_problems(configs: Iterable[TrialConfig]) -> list[Problem]:
    """A prepared dataset must exist, with the splits the trials read and the image shape
    their models take (a built-in dataset is checked by ``DataConfig`` itself)."""
    problems: list[Problem] = []
    seen: set[tuple] = set()
    for cfg in configs:
        data, unet = cfg.data, cfg.model_config()
        want = (unet.in_channels, unet.image_size, unet.image_size)
        key = (data.dataset, data.train_split, data.eval_split, want)
        if builtin_dataset(data.dataset) or key in seen:
            continue
        seen.add(key)
        try:
            fs, root = storage.resolve(data.dataset, endpoint_url=data.endpoint_url)
            manifest = read_manifest(fs, root, data.dataset)
        except (OSError, ValueError) as error:
            msg = f"{error}"
            if isinstance(error.__cause__, FileNotFoundError):  # no manifest: never prepared
                msg = (
                    f"{data.dataset}: no manifest.json: the dataset was never prepared (or its "
                    f"preparer did not finish); run {prepare_command(data.dataset)}"
                )
            problems.append(("data.dataset", msg))
            continue
        for split_key in ("train_split", "eval_split"):
            split = getattr(data, split_key)
            if split not in manifest.splits:
                msg = f"{data.dataset} has no split {split!r}; it has {sorted(manifest.splits)}"
                problems.append((f"data.{split_key}", msg))
            elif tuple(manifest.splits[split].shape) != want:
                got = "x".join(map(str, manifest.splits[split].shape))
                msg = (
                    f"{data.dataset} holds {got} images; model {cfg.model.name!r} "
                    f"takes {'x'.join(map(str, want))}"
                )
                problems.append(("model", msg))
    return problems
