"""The typed, frozen config of one training trial, validated at the boundary.

A trial is data + model + diffusion + train + budget + eval + resources + tracking +
storage (:mod:`orchestrator.config.sections`), each a frozen dataclass whose defaults make a
~1-minute CPU trial on the offline digits. ``TrialConfig.from_dict`` (and ``from_yaml``,
``with_overrides``) check everything at once and raise one ``ConfigError`` listing every
problem as ``{source}: {dotted.key}: {what was expected}, got {value}``, with the allowed keys
or values.

A missing section or key takes the trial default (except ``budget``: one choice among
steps, images and flops, a given budget replaces the default one). Ints must be ints (a
bool is not), floats accept ints, optional fields accept null.

Values are read as YAML (``orchestrator.config.validation.load_yaml``: ``yaml.safe_load``
that also reads ``3e-4`` as a number).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffusion.config import DiffusionConfig
from diffusion.data.registry import builtin_dataset
from diffusion.gaussian import MEAN_TYPES, OBJECTIVES, VAR_TYPES
from diffusion.schedules import BETA_SCHEDULES, space_timesteps
from diffusion.unet import UNetConfig
from orchestrator.config.sections import (
    BUDGET_KINDS,
    BudgetConfig,
    DataConfig,
    EvalConfig,
    ModelSection,
    ResourcesConfig,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
    parse_sampler,
)
from orchestrator.config.validation import (
    ConfigError,
    Problem,
    build_section,
    flatten,
    load_yaml,
    unknown_key,
)

__all__ = ["DIFFUSION_RULES", "NAME_PATTERN", "SECTIONS", "TrialConfig", "name_problems"]

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # a Ray run name and a directory name

# the field rules of DiffusionConfig (a plain dataclass of the diffusion package)
DIFFUSION_RULES = {
    "schedule": {"choices": tuple(BETA_SCHEDULES)},
    "num_timesteps": {"ge": 1},
    "mean_type": {"choices": MEAN_TYPES},
    "var_type": {"choices": VAR_TYPES},
    "objective": {"choices": OBJECTIVES},
    "hybrid_lambda": {"gt": 0},
}

# the sections of a trial, in file order: key -> its dataclass
SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelSection,
    "diffusion": DiffusionConfig,
    "train": TrainConfig,
    "budget": BudgetConfig,
    "eval": EvalConfig,
    "resources": ResourcesConfig,
    "tracking": TrackingConfig,
    "storage": StorageConfig,
}


def name_problems(name: Any) -> list[Problem]:
    """The problem of a trial or sweep name that is not a NAME_PATTERN."""
    if isinstance(name, str) and re.fullmatch(NAME_PATTERN, name):
        return []
    return [("name", f"expected a name matching {NAME_PATTERN}, got {name!r}")]


@dataclass(frozen=True, kw_only=True)
class TrialConfig:
    """One training trial: everything the Ray Train worker loop needs."""

    name: str  # the Ray run name and the trial's directory: NAME_PATTERN
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(num_timesteps=1000))
    train: TrainConfig = field(default_factory=TrainConfig)
    budget: BudgetConfig = field(default_factory=lambda: BudgetConfig(steps=500))  # ~35 s of CPU
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        wrong = [k for k, c in SECTIONS.items() if not isinstance(getattr(self, k), c)]
        problems = [
            (k, f"expected a {SECTIONS[k].__name__}, got {getattr(self, k)!r}") for k in wrong
        ]
        problems += name_problems(self.name)
        if problems or (problems := self._check()):
            raise ConfigError(problems)

    def _check(self) -> list[Problem]:
        """Impossible combinations across sections."""
        problems: list[Problem] = []
        batch, workers = self.train.batch_size, self.resources.num_workers
        if batch % workers:
            msg = f"expected a multiple of resources.num_workers={workers}, got {batch}"
            problems.append(("train.batch_size", msg))
        T = self.diffusion.num_timesteps
        try:
            space_timesteps(T, self.eval.sample_steps)
        except ValueError as error:
            problems.append(("eval.sample_steps", f"{error} (T is diffusion.num_timesteps)"))
        for item in self.eval.sampling:
            _, spacing, var = parse_sampler(item)
            try:
                space_timesteps(T, spacing)
            except ValueError as error:
                problems.append(("eval.sampling", f"{item!r}: {error} (T = {T})"))
            if var and self.diffusion.learns_sigma:
                msg = f"{item!r}: @{var} needs a fixed variance, not {self.diffusion.var_type}"
                problems.append(("eval.sampling", msg))
        if self.eval.nll_timesteps > T:
            msg = f"expected <= diffusion.num_timesteps={T}, got {self.eval.nll_timesteps}"
            problems.append(("eval.nll_timesteps", msg))
        try:
            unet = self.model_config()
        except ValueError as error:
            return [*problems, ("model.overrides.learn_sigma", str(error))]
        shape = (unet.in_channels, unet.image_size, unet.image_size)
        builtin = builtin_dataset(self.data.dataset)
        if builtin and builtin.image_shape and tuple(builtin.image_shape) != shape:
            msg = (
                f"the {builtin.name} are {'x'.join(map(str, builtin.image_shape))} images; "
                f"{self.model.name!r} (with overrides) takes {'x'.join(map(str, shape))}"
            )
            problems.append(("model", msg))
        return problems

    def model_config(self) -> UNetConfig:
        """The UNet to train: 2C outputs exactly when the diffusion learns the variance."""
        return self.model.resolve(learn_sigma=self.diffusion.learns_sigma)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> TrialConfig:
        """Validate ``d`` completely; every problem goes into one ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError([("", f"expected a mapping, got {d!r}")], source)
        allowed = ["name", *SECTIONS]
        problems = [unknown_key(k, allowed) for k in d if k not in allowed]
        if "name" not in d:
            problems.append(("name", f"required: a name matching {NAME_PATTERN}"))
        else:
            problems += name_problems(d["name"])
        defaults = cls(name="default")
        sections = {key: getattr(defaults, key) for key in SECTIONS}
        for key in [k for k in SECTIONS if k in d]:
            try:
                # A budget is one choice of three: a given one replaces the default.
                base = {} if key == "budget" else sections[key].to_dict()
                rules = DIFFUSION_RULES if key == "diffusion" else None
                sections[key] = build_section(SECTIONS[key], key, d[key], base, rules)
            except ConfigError as error:
                problems += error.problems
        if not problems:
            try:
                return cls(name=d["name"], **sections)
            except ConfigError as error:
                problems += error.problems
        raise ConfigError(problems, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrialConfig:
        """Read a YAML (or JSON) file; problems name the file."""
        try:
            data = load_yaml(Path(path).read_text())
        except yaml.YAMLError as error:
            raise ConfigError([("", f"invalid YAML: {error}")], str(path)) from None
        return cls.from_dict({} if data is None else data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; ``from_dict(to_dict())`` gives an equal config."""
        return {"name": self.name, **{k: getattr(self, k).to_dict() for k in SECTIONS}}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: Iterable[str], source: str = "<overrides>") -> TrialConfig:
        """A copy with ``dotted.key=value`` items applied (values parsed as YAML), validated.

        Setting one budget kind (``budget.images=64000``) clears the other two.
        """
        d, problems = self.to_dict(), []
        for item in overrides:
            key, sep, text = item.partition("=")
            key = key.strip()
            *parents, last = key.split(".")
            if not sep or not all([*parents, last]):
                problems.append((item, "expected dotted.key=value"))
                continue
            try:
                value = load_yaml(text)
            except yaml.YAMLError as error:
                problems.append((key, f"cannot parse {text!r}: {error}"))
                continue
            node = d
            for i, part in enumerate(parents):
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    problems.append((key, f"{'.'.join(parents[: i + 1])} holds no keys"))
                    break
            else:
                if parents == ["budget"] and last in BUDGET_KINDS and value is not None:
                    node.update(dict.fromkeys(BUDGET_KINDS))
                node[last] = value
        if problems:
            raise ConfigError(problems, source)
        return type(self).from_dict(d, source=source)

    def flatten(self) -> dict[str, str | int | float | bool]:
        """Dotted keys for MLflow params, the resolved UNet as ``model.resolved.*``; lists
        become JSON text and nulls "null"."""
        out: dict[str, str | int | float | bool] = {}
        flatten("", self.to_dict(), out)
        flatten("model.resolved", self.model_config().to_dict(), out)
        return out
