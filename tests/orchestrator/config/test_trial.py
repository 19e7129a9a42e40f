import dataclasses
import itertools
import json
import math
import os

import pytest
import yaml

from diffusion.unet import MODEL_LADDER, UNetConfig
from orchestrator.config import (
    BudgetConfig,
    ConfigError,
    EvalConfig,
    TrainConfig,
    TrialConfig,
)

SRC = "sweep.yaml"


def problems_of(d: dict, source: str = SRC) -> str:
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_dict(d, source=source)
    return str(info.value)


def custom() -> TrialConfig:
    """A config far from the defaults in every section."""
    return TrialConfig.from_dict(
        {
            "name": "w64.flops-1e15_seed1",
            "data": {
                "dataset": "s3://bucket/cifar10",
                "flip": True,
                "endpoint_url": "http://x:9000",
            },
            "model": {
                "name": "cifar10",
                "overrides": {"model_channels": 64, "channel_mult": (1, 2, 2)},
            },
            "diffusion": {
                "schedule": "linear",
                "num_timesteps": 4000,
                "var_type": "fixed_small",
                "objective": "simple",
            },
            "train": {
                "batch_size": 128,
                "lr": 1,
                "grad_clip": None,
                "bf16": True,
                "timestep_sampler": "loss-second-moment",
                "max_failures": -1,
            },
            "budget": {"flops": 1e15},
            "eval": {"num_points": 6, "features": "inception", "sample_steps": "ddim25"},
            "resources": {"num_workers": 4, "use_gpu": True, "cpus_per_worker": 0.5},
            "tracking": {"uri": "http://mlflow:5000", "experiment": "scaling"},
            "storage": {"path": "s3://bucket/runs", "endpoint_url": "http://x:9000"},
        }
    )


# Defaults and round trips


def test_defaults_are_a_short_cpu_trial_on_digits():
    c = TrialConfig(name="demo")
    assert c == TrialConfig.from_dict({"name": "demo"})
    assert (c.data.dataset, c.model.name, c.budget.kind, c.budget.steps) == (
        "digits",
        "digits-xs",
        "steps",
        500,
    )
    assert c.diffusion.num_timesteps == 1000 and c.diffusion.objective == "hybrid"
    assert c.model_config() == MODEL_LADDER["digits-xs"]
    assert not c.resources.use_gpu and c.resources.num_workers == 1


@pytest.mark.parametrize("make", [lambda: TrialConfig(name="t"), custom])
def test_dict_json_and_yaml_round_trips(make, tmp_path):
    c = make()
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON types only
    assert TrialConfig.from_dict(d) == c
    assert TrialConfig.from_dict(json.loads(json.dumps(d))) == c
    (tmp_path / "c.yaml").write_text(c.to_yaml())
    assert TrialConfig.from_yaml(tmp_path / "c.yaml") == c
    (tmp_path / "c.json").write_text(json.dumps(d, indent=1))
    assert TrialConfig.from_yaml(tmp_path / "c.json") == c


def test_values_are_normalised():
    c = custom()
    assert isinstance(c.train.lr, float) and c.train.lr == 1.0  # floats accept ints
    assert c.model.overrides["channel_mult"] == [1, 2, 2]  # tuples become lists
    assert c.model_config().channel_mult == (1, 2, 2)
    assert not c.model_config().learn_sigma  # fixed variance: C outputs
    assert (
        TrialConfig.from_dict({"name": "t", "eval": {"sample_steps": 100}}).eval.sample_steps
        == "100"
    )


def test_sections_are_frozen_and_validate_on_direct_construction():
    c = TrialConfig(name="t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.train.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number > 0, got -1"):
        TrainConfig(lr=-1)
    with pytest.raises(ConfigError, match="expected a TrainConfig"):
        TrialConfig(name="t", train={"lr": 1.0})  # type: ignore[arg-type]


def test_yaml_reads_exponent_floats_that_pyyaml_leaves_as_strings(tmp_path):
    assert yaml.safe_load("lr: 3e-4")["lr"] == "3e-4"  # YAML 1.1: why the loader exists
    path = tmp_path / "t.yaml"
    path.write_text("name: t\ntrain: {lr: 3e-4}\nbudget: {flops: 2E+15}\n")
    c = TrialConfig.from_yaml(path)
    assert c.train.lr == 3e-4 and c.budget.flops == 2e15


# Errors: file, dotted key, allowed values


def test_error_line_names_file_key_and_expectation():
    message = problems_of({"name": "t", "train": {"lr": "abc"}})
    assert message == f"{SRC}: train.lr: expected a number > 0, got 'abc'"


BAD = [
    # (section, key, bad value, fragment of the message)
    ("data", "datset", "digits", "unknown key (did you mean 'dataset'?); allowed: ['dataset'"),
    ("data", "flip", "yes", "expected true or false, got 'yes'"),
    ("data", "train_split", "val", "expected one of ['train', 'test'] for the digits, got 'val'"),
    ("data", "dataset", "gs://b/d", "allowed: ['local path', 'file://', 's3://']"),
    ("model", "size", "digits-s", "unknown key; allowed: ['name', 'overrides']"),
    ("model", "name", 7, "expected one of ['imagenet64-w64'"),
    (
        "model",
        "name",
        "huge",
        "'digits-m', 'digits-3xs', 'digits-2xs', 'digits-xs3'], got 'huge'",
    ),
    ("model", "overrides", [1], "expected a mapping, got [1]"),
    ("diffusion", "steps", 10, "unknown key; allowed: ['schedule', 'num_timesteps'"),
    ("diffusion", "schedule", "sqrt", "expected one of ['linear', 'cosine'], got 'sqrt'"),
    ("diffusion", "num_timesteps", 0, "expected an integer >= 1, got 0"),
    ("diffusion", "num_timesteps", True, "expected an integer >= 1, got True"),
    ("diffusion", "hybrid_lambda", "0.001", "expected a number > 0, got '0.001'"),
    ("train", "lrr", 1e-4, "unknown key (did you mean 'lr'?); allowed: ['batch_size', 'lr'"),
    ("train", "batch_size", 64.0, "expected an integer >= 1, got 64.0"),
    ("train", "batch_size", 0, "expected an integer >= 1, got 0"),
    ("train", "ema_rate", 1, "expected a number >= 0 and < 1, got 1"),
    ("train", "grad_clip", 0, "expected null or a number > 0, got 0"),
    ("train", "lr", float("nan"), "expected a number > 0, got nan"),
    ("train", "timestep_sampler", "x", "expected one of ['uniform', 'loss-second-moment']"),
    ("train", "bf16", 1, "expected true or false, got 1"),
    ("budget", "epochs", 3, "unknown key; allowed: ['steps', 'images', 'flops']"),
    ("budget", "steps", 0, "expected null or an integer > 0, got 0"),
    ("budget", "images", 1e6, "expected null or an integer > 0, got 1000000.0"),
    ("eval", "points", 3, "unknown key (did you mean 'num_points'?)"),
    ("eval", "num_points", -1, "expected an integer >= 0, got -1"),
    ("eval", "features", "clip", "expected null or one of ['inception', 'digits'], got 'clip'"),
    ("eval", "fid_samples", 2, "expected 0 or more than k=3, got 2"),
    ("resources", "gpus", 1, "unknown key; allowed: ['num_workers', 'use_gpu', 'cpus_per_worker']"),
    ("resources", "num_workers", 0, "expected an integer >= 1, got 0"),
    ("resources", "use_gpu", "no", "expected true or false, got 'no'"),
    ("resources", "cpus_per_worker", 0, "expected a number > 0, got 0"),
    ("tracking", "url", "x", "unknown key (did you mean 'uri'?); allowed: ['uri', 'experiment']"),
    ("tracking", "uri", 5, "expected null or a string, got 5"),
    ("tracking", "experiment", "", "expected a non-empty string"),
    ("storage", "bucket", "b", "unknown key; allowed: ['path', 'endpoint_url', 'shared']"),
    ("storage", "path", "gs://b/runs", "scheme 'gs' in 'gs://b/runs'; allowed: ['local path'"),
    ("storage", "path", "s3:///runs", "names no bucket; expected s3://bucket/prefix"),
]


@pytest.mark.parametrize(("section", "key", "value", "fragment"), BAD)
def test_every_section_reports_bad_keys_and_values(section, key, value, fragment):
    given = {"steps": 10} if section == "budget" and key == "epochs" else {}  # else: no budget
    message = problems_of({"name": "t", section: {**given, key: value}})
    lines = message.splitlines()
    assert len(lines) == 1, message
    assert lines[0].startswith(f"{SRC}: {section}.{key}: "), message
    assert fragment in lines[0], message


@pytest.mark.parametrize(
    ("d", "line"),
    [
        ({"nam": "t"}, "name: required: a name matching"),
        ({"name": "my run"}, "name: expected a name matching [A-Za-z0-9][A-Za-z0-9._-]*"),
        ({"name": "../up"}, "name: expected a name matching"),
        ({"name": "t", "optim": {}}, "optim: unknown key; allowed: ['name', 'data', 'model'"),
        ({"name": "t", "train": 3}, "train: expected a mapping, got 3"),
        (
            {"name": "t", "budget": {"steps": 5, "flops": 1e9}},
            "budget: expected exactly one of ['steps', 'images', 'flops'], got ['steps', 'flops']",
        ),
        ({"name": "t", "budget": {}}, "budget: expected exactly one of"),
        (
            {"name": "t", "model": {"overrides": {"model_chanels": 8}}},
            "model.overrides.model_chanels: unknown key (did you mean 'model_channels'?); "
            "allowed: [",
        ),
        (
            {"name": "t", "model": {"overrides": {"model_channels": 48}}},
            "model.overrides.model_channels: UNetConfig.model_channels * channel_mult must be "
            "divisible by 32",
        ),
        (
            {"name": "t", "diffusion": {"objective": "simple"}},
            "diffusion.objective: 'simple' gives a learned variance no training signal",
        ),
        (
            {"name": "t", "model": {"name": "cifar10"}},
            "model: the digits are 1x8x8 images; 'cifar10' (with overrides) takes 3x32x32",
        ),
        (
            {"name": "t", "resources": {"num_workers": 3}},
            "train.batch_size: expected a multiple of resources.num_workers=3, got 64",
        ),
        (
            {"name": "t", "eval": {"sample_steps": "abc"}},
            "eval.sample_steps: spacing: cannot parse 'abc'; allowed forms: '50', '10,15,20'",
        ),
        ({"name": "t", "diffusion": {"num_timesteps": 20}}, "eval.sample_steps: spacing: cannot"),
        (
            {"name": "t", "diffusion": {"num_timesteps": 20}, "eval": {"sample_steps": "10"}},
            "eval.nll_timesteps: expected <= diffusion.num_timesteps=20, got 50",
        ),
        (
            {
                "name": "t",
                "diffusion": {"var_type": "fixed_small", "objective": "simple"},
                "model": {"overrides": {"learn_sigma": True}},
            },
            "model.overrides.learn_sigma: learn_sigma=True contradicts the diffusion",
        ),
    ],
)
def test_trial_level_and_cross_section_errors(d, line):
    message = problems_of(d)
    assert f"{SRC}: {line}" in message, message


def test_all_problems_are_reported_together():
    message = problems_of(
        {
            "name": "bad name",
            "extra": 1,
            "train": {"lr": "abc", "lrr": 1, "batch_size": True},
            "budget": {"steps": 1, "images": 2},
            "eval": {"features": "x"},
            "diffusion": {"num_timesteps": 1.5},
            "storage": {"path": "gs://x"},
        }
    )
    keys = [line.split(": ")[1] for line in message.splitlines()]
    assert all(line.startswith(f"{SRC}: ") for line in message.splitlines())
    assert keys == [
        "extra",
        "name",
        "diffusion.num_timesteps",
        "train.lrr",
        "train.batch_size",
        "train.lr",
        "budget",
        "eval.features",
        "storage.path",
    ]


def test_from_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "trial.yaml"
    path.write_text("name: t\ntrain:\n  lr: abc\n  seed: -1\n")
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_yaml(path)
    assert str(info.value).splitlines() == [
        f"{path}: train.lr: expected a number > 0, got 'abc'",
        f"{path}: train.seed: expected an integer >= 0, got -1",
    ]
    assert info.value.source == str(path) and len(info.value.problems) == 2
    path.write_text("name: t\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{path}: invalid YAML"):
        TrialConfig.from_yaml(path)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# Budget


def test_budget_needs_exactly_one_kind():
    assert BudgetConfig(images=10).kind == "images"
    for kwargs in ({}, {"steps": 1, "images": 1}, {"steps": 1, "images": 1, "flops": 1.0}):
        with pytest.raises(ConfigError, match="budget: expected exactly one of"):
            BudgetConfig(**kwargs)


def test_total_steps_from_steps_images_and_flops():
    assert BudgetConfig(steps=7).total_steps(64) == 7
    assert BudgetConfig(images=640).total_steps(64) == 10
    assert BudgetConfig(images=641).total_steps(64) == 11  # rounds up: the budget is met
    assert BudgetConfig(images=1).total_steps(64) == 1
    fwd = 1.23e7  # training FLOPs = 3 x forward x images
    assert BudgetConfig(flops=3 * fwd * 6400).total_steps(64, fwd) == 100
    assert BudgetConfig(flops=3 * fwd * 6401).total_steps(64, fwd) == 101
    with pytest.raises(ValueError, match="forward_flops_per_image"):
        BudgetConfig(flops=1e12).total_steps(64)


# Eval points


@pytest.mark.parametrize("total", [1, 2, 3, 7, 10, 99, 100, 500, 1234, 10_000, 987_654])
@pytest.mark.parametrize("num_points", [0, 1, 2, 4, 9])
def test_eval_steps_are_sorted_unique_positive_and_end_at_total(total, num_points):
    steps = EvalConfig(num_points=num_points).eval_steps(total)
    assert steps == sorted(set(steps))
    assert steps[-1] == total and steps[0] >= 1
    assert len(steps) <= num_points + 1
    if total >= 100 * 10**num_points:  # far from rounding: exactly num_points + 1 points
        assert len(steps) == num_points + 1


def test_eval_steps_are_evenly_spaced_in_log_step():
    steps = EvalConfig(num_points=4).eval_steps(1_000_000)
    assert steps[0] == 10_000  # two decades before the end
    gaps = [math.log(b / a) for a, b in itertools.pairwise(steps)]
    assert max(gaps) - min(gaps) < 1e-3
    assert EvalConfig(num_points=4).eval_steps(10_000) == [100, 316, 1000, 3162, 10_000]
    with pytest.raises(ValueError, match="total_steps"):
        EvalConfig().eval_steps(0)


def test_feature_extractor_follows_the_dataset():
    assert EvalConfig().feature_name("digits") == "digits"
    assert EvalConfig().feature_name("s3://b/cifar10") == "inception"
    assert EvalConfig(features="inception").feature_name("digits") == "inception"


# Flatten, overrides, derived values


def test_flatten_gives_scalar_dotted_params_with_the_resolved_model():
    flat = custom().flatten()
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    assert flat["name"] == "w64.flops-1e15_seed1" and flat["train.lr"] == 1.0
    assert flat["budget.flops"] == 1e15 and flat["budget.steps"] == "null"
    assert flat["model.overrides.model_channels"] == 64
    assert flat["model.overrides.channel_mult"] == "[1, 2, 2]"
    for field in dataclasses.fields(UNetConfig):
        assert f"model.resolved.{field.name}" in flat
    assert flat["model.resolved.model_channels"] == 64
    assert flat["model.resolved.learn_sigma"] is False
    assert flat["diffusion.objective"] == "simple" and flat["resources.use_gpu"] is True


def test_overrides_parse_yaml_values_and_validate():
    base = TrialConfig(name="t")
    c = base.with_overrides(
        [
            "train.lr=3e-4",
            "budget.images=6400",
            "model.overrides.model_channels=64",
            "eval.sample_steps=100",
            "eval.features=null",
            "data.flip=true",
            "name=t2",
            "model.overrides.channel_mult=[1, 2]",
        ]
    )
    assert c.train.lr == 3e-4 and c.name == "t2" and c.data.flip is True
    assert (c.budget.kind, c.budget.images, c.budget.steps) == ("images", 6400, None)
    assert c.model_config().model_channels == 64 and c.eval.sample_steps == "100"
    assert base.train.lr == 1e-3 and base.budget.steps == 500  # the original is untouched
    assert TrialConfig.from_dict(c.to_dict()) == c


def test_bad_overrides_are_reported_together():
    with pytest.raises(ConfigError) as info:
        TrialConfig(name="t").with_overrides(["train.lr", "train.lr.x=1", "=3"])
    assert str(info.value).splitlines() == [
        "<overrides>: train.lr: expected dotted.key=value",
        "<overrides>: train.lr.x: train.lr holds no keys",
        "<overrides>: =3: expected dotted.key=value",
    ]
    with pytest.raises(ConfigError) as info:
        TrialConfig(name="t").with_overrides(
            ["train.lr=abc", "train.lrr=1", "budget.steps=null", "seed=1"], source="--set"
        )
    assert str(info.value).splitlines() == [
        "--set: seed: unknown key (did you mean 'train.seed'?); allowed: ['name', 'data', "
        "'model', 'diffusion', 'train', 'budget', 'eval', 'resources', 'tracking', 'storage']",
        "--set: train.lrr: unknown key (did you mean 'lr'?); allowed: ['batch_size', 'lr', "
        "'weight_decay', 'ema_rate', 'grad_clip', 'timestep_sampler', 'bf16', 'channels_last', "
        "'seed', 'log_every', 'checkpoint_every', 'keep_checkpoints', 'max_failures']",
        "--set: train.lr: expected a number > 0, got 'abc'",
        "--set: budget: expected exactly one of ['steps', 'images', 'flops'], got none",
    ]


def test_model_output_channels_follow_the_diffusion():
    fixed = TrialConfig(name="t").with_overrides(
        ["diffusion.var_type=fixed_large", "diffusion.objective=simple"]
    )
    assert fixed.model_config().learn_sigma is False
    assert fixed.model.resolve() == MODEL_LADDER["digits-xs"]  # the ladder entry as named
    assert TrialConfig(name="t").model_config().learn_sigma is True


def test_tracking_uri_and_storage_path_resolution(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    c = TrialConfig(name="t")
    assert c.tracking.resolve_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert c.tracking.resolve_uri() == "http://mlflow:5000"
    assert custom().tracking.resolve_uri() == "http://mlflow:5000"
    assert c.storage.resolve_path() == os.path.join(tmp_path, "diffscale_runs")
    assert custom().storage.resolve_path() == "s3://bucket/runs"
