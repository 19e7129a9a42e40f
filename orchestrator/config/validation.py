"""Validation of typed config sections: every problem at once, with the key and what is allowed.

A section is a frozen dataclass deriving from ``Section``; its fields carry rules (``spec``:
bounds, choices) and its type hints say what a value must be. Ints must be ints (a bool is
not), floats accept ints (stored as floats), ``X | None`` fields accept null.

YAML is read with ``yaml.safe_load`` semantics plus YAML 1.2 exponent floats: plain PyYAML
reads ``3e-4`` as a string (YAML 1.1 wants ``3.0e-4``); here it is the number.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import functools
import json
import math
import operator
import re
import types
import typing
from collections.abc import Iterable
from typing import Any, ClassVar

import yaml

from diffusion.data import storage

__all__ = [
    "URI_SCHEMES",
    "ConfigError",
    "Problem",
    "Section",
    "build_section",
    "check_fields",
    "flatten",
    "load_yaml",
    "prepare_command",
    "spec",
    "unknown_key",
    "uri_problem",
]

Problem = tuple[str, str]  # (dotted key, what is wrong)
URI_SCHEMES = storage.SCHEMES  # ("local path", "file://", "s3://")

_BOUNDS = {
    "gt": (">", operator.gt),
    "ge": (">=", operator.ge),
    "lt": ("<", operator.lt),
    "le": ("<=", operator.le),
}
_TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a mapping",
    list: "a list",
}


class ConfigError(ValueError):
    """Every problem of a config at once; ``problems`` holds (dotted key, message) pairs and
    the message one ``{source}: {key}: {message}`` line per problem."""

    def __init__(self, problems: Iterable[Problem], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        lead = f"{source}: " if source else ""
        counts = collections.Counter(self.problems)  # a problem of many trials: once, counted
        lines = [
            (f"{lead}{k}: {m}" if k else lead + m) + (f" ({n} times)" if n > 1 else "")
            for (k, m), n in counts.items()
        ]
        super().__init__("\n".join(lines))


def spec(default: Any = dataclasses.MISSING, *, factory: Any = None, **rules: Any) -> Any:
    """A dataclass field with rules: bounds ``gt``/``ge``/``lt``/``le`` and ``choices``."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=rules)
    return dataclasses.field(default=default, metadata=rules)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_optional(hint: Any) -> tuple[type, bool]:
    """(base type, accepts None) of ``X`` or ``X | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return typing.get_origin(args[0]) or args[0], len(args) < len(typing.get_args(hint))
    return typing.get_origin(hint) or hint, False


def _describe(hint: Any, rules: dict[str, Any]) -> str:
    base, optional = _split_optional(hint)
    if "choices" in rules:
        text = f"one of {list(rules['choices'])}"
    else:
        bounds = [f"{op} {rules[key]}" for key, (op, _) in _BOUNDS.items() if key in rules]
        text = _TYPE_NAMES[base] + (" " + " and ".join(bounds) if bounds else "")
    return f"null or {text}" if optional else text


def _check_value(value: Any, hint: Any, rules: dict[str, Any]) -> tuple[bool, Any]:
    """(ok, normalised value)."""
    base, optional = _split_optional(hint)
    if value is None:
        return optional, None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, base) and not (base is int and isinstance(value, bool))
    if ok and base is float:
        ok = math.isfinite(value)
    if ok and "choices" in rules:
        ok = value in rules["choices"]
    if ok and base in (int, float):
        ok = all(test(value, rules[key]) for key, (_, test) in _BOUNDS.items() if key in rules)
    return ok, value


def check_fields(
    section: str, cls: type, values: dict[str, Any], rules: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], list[Problem]]:
    """Check ``values`` (field -> value) against ``cls``'s type hints and ``rules``."""
    out, problems = {}, []
    for name, value in values.items():
        ok, out[name] = _check_value(value, _hints(cls)[name], rules.get(name, {}))
        if not ok:
            expected = _describe(_hints(cls)[name], rules.get(name, {}))
            problems.append((f"{section}.{name}", f"expected {expected}, got {value!r}"))
    return out, problems


def unknown_key(key: str, allowed: list[str]) -> Problem:
    """The problem of an unknown ``key``, naming the allowed ones (and the likely typo); a
    bare key that is a field of an allowed section suggests it: ``lr`` -> ``train.lr``."""
    bare = key.rsplit(".", 1)[-1].rsplit(" ", 1)[-1]
    owners = [
        f"{cls.section}.{bare}"
        for cls in _SECTION_CLASSES
        if cls.section in allowed and bare in {f.name for f in dataclasses.fields(cls)}
    ]
    close = difflib.get_close_matches(bare, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if "." not in key and owners:
        hint = f" (did you mean {' or '.join(map(repr, owners))}?)"
    return key, f"unknown key{hint}; allowed: {allowed}"


_SECTION_CLASSES: list[type[Section]] = []  # every Section subclass, for unknown_key's hint


class Section:
    """Base of a frozen dataclass section: checks every field on construction (type hints and
    ``spec`` rules), normalises them, then runs ``_check`` for rules across fields."""

    section: ClassVar[str]  # the section's key in the trial ("train")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _SECTION_CLASSES.append(cls)

    def __post_init__(self) -> None:
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        values, problems = check_fields(
            self.section,
            type(self),
            {f.name: getattr(self, f.name) for f in fields},
            {f.name: dict(f.metadata) for f in fields},
        )
        if not problems:
            for name, value in values.items():
                object.__setattr__(self, name, value)
            problems = [(f"{self.section}.{k}".rstrip("."), m) for k, m in self._check()]
        if problems:
            raise ConfigError(problems)

    def _check(self) -> list[Problem]:
        """Problems across fields as (field or "", message); runs once every field is well typed."""
        return []

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[call-overload]


def build_section(
    cls: type, key: str, given: Any, base: dict[str, Any], rules: dict | None = None
) -> Any:
    """``cls(**(base | given))`` with every problem in one ConfigError.

    ``cls`` is a ``Section``, or another dataclass whose fields are checked here against
    ``rules`` and whose own ValueErrors ("field: message") become problems of ``key.field``.
    """
    if not isinstance(given, dict):
        raise ConfigError([(key, f"expected a mapping, got {given!r}")])
    allowed = [f.name for f in dataclasses.fields(cls)]
    problems = [unknown_key(f"{key}.{k}", allowed) for k in given if k not in allowed]
    values = base | {k: v for k, v in given.items() if k in allowed}
    typed: list[Problem] = []
    if rules is not None:
        values, typed = check_fields(key, cls, values, rules)
    try:
        section = None if typed else cls(**values)
    except ConfigError as error:
        typed = error.problems
    except ValueError as error:
        found = re.match(r"(\w+): (.*)", str(error), re.S)
        in_field = found and found[1] in allowed
        typed = [(f"{key}.{found[1]}", found[2]) if in_field else (key, str(error))]
    if problems or typed:
        raise ConfigError(problems + typed)
    return section


def uri_problem(key: str, uri: str) -> Problem | None:
    """The problem of a storage URI that is neither a local path, file:// nor s3://bucket."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]+)://(.*)", uri)
    if scheme and scheme[1] not in ("file", "s3"):
        return key, f"scheme {scheme[1]!r} in {uri!r}; allowed: {list(URI_SCHEMES)}"
    if scheme and scheme[1] == "s3" and not scheme[2].split("/")[0]:
        return key, f"{uri!r} names no bucket; expected s3://bucket/prefix"
    return None


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads YAML 1.2 exponent floats such as 3e-4."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _UniqueKeyLoader(_Loader):
    """``_Loader`` that rejects a mapping repeating a key (PyYAML keeps the last silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            where = f"line {key_node.start_mark.line + 1}, first on line {seen[key] + 1}"
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} ({where})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(text: str, *, unique_keys: bool = False) -> Any:
    """``yaml.safe_load`` plus exponent floats without a dot (``3e-4``); ``unique_keys``
    makes a repeated mapping key an error instead of the last one winning. A syntax error
    is a ``yaml.YAMLError`` whose message starts with its line and column (the caller
    names the file): ``line 3, column 1: expected ',' or '}' ...``."""
    loader = _UniqueKeyLoader if unique_keys else _Loader
    try:
        return yaml.load(text, Loader=loader)  # a SafeLoader: builds plain types only
    except yaml.MarkedYAMLError as error:
        raise yaml.YAMLError(_yaml_message(error)) from None


def _yaml_message(error: yaml.MarkedYAMLError) -> str:
    mark = error.problem_mark or error.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    text = error.problem or error.context or "invalid YAML"
    if error.context and error.problem and error.context_mark:
        c = error.context_mark
        text += f" ({error.context} that starts at line {c.line + 1}, column {c.column + 1})"
    return where + text


def prepare_command(uri: str) -> str:
    """The ``diffscale data prepare`` command that writes the dataset a config names by
    ``uri``: the registry's dataset whose name the path ends with (else ``folder``), with
    the ``--source`` it takes."""
    from diffusion.data.registry import DATASETS

    base = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    name = next((n for n in DATASETS if n in base and n != "folder"), "folder")
    sources = {
        "digits": "",
        "cifar10": " --source cifar-10-python.tar.gz (a path or "
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz)",
        "imagenet64": " --source DIR (DIR holds train_data_batch_1..10.npz and val_data.npz)",
        "folder": " --source DIR --size 64 (DIR: PNG/JPEG images)",
    }
    source = sources.get(name, " --source SOURCE")
    cmd, _, note = source.partition(" (")
    note = f" ({note}" if note else ""
    return f"`diffscale data prepare {name} --out {uri}{cmd}`{note}"


def flatten(prefix: str, value: Any, out: dict[str, str | int | float | bool]) -> None:
    """Nested dicts into ``out`` under dotted keys; lists become JSON text, None "null"."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else k, v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(list(value))
    else:
        out[prefix] = "null" if value is None else value
