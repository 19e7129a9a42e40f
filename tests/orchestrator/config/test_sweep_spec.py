"""Sweep files read and validated: every problem at once, with the file, the key and the
allowed values, before any Ray resource is taken (no Ray)."""

from __future__ import annotations

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError
from orchestrator.config.sections import mask_passwords
from orchestrator.grid import load_sweep
from tests.orchestrator.sweep_files import SMALL, fake_dataset, write


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default storage and MLflow land in the test's directory


BAD = [
    ("unknown key", {"trian": {}}, "trian: unknown key (did you mean 'train'?)"),
    (
        "unknown axis",
        {"grid": {"train.lrr": [1e-3]}},
        "grid: train.lrr: unknown key (did you mean 'lr'?)",
    ),
    (
        "wrong type",
        {"grid": {"train.batch_size": ["big"]}},
        "grid.train.batch_size[0] = 'big': train.batch_size: expected an integer >= 1, got 'big'",
    ),
    (
        "negative budget",
        {"grid": {"budget.flops": [1e12, -5.0]}},
        "grid.budget.flops[1] = -5.0: budget.flops: expected null or a number > 0, got -5.0",
    ),
    (
        "unknown size",
        {"grid": {"model.name": ["digits-xs", "digits-xxl"]}},
        "grid.model.name[1] = 'digits-xxl': model.name: expected one of [",
    ),
    (
        "impossible workers",
        {"resources": {"num_workers": 3}},
        "train.batch_size: expected a multiple of resources.num_workers=3, got 32",
    ),
    (
        "zero workers",
        {"size_resources": {"digits-xs": {"num_workers": 0}}},
        "size_resources.digits-xs: resources.num_workers: expected an integer >= 1, got 0",
    ),
    (
        "unknown size",
        {"size_resources": {"digits-s": {"num_workers": 2}}},
        "size_resources.digits-s: no such size in the sweep",
    ),
    (
        "missing dataset",
        {"data": {"dataset": "./nowhere/cifar10"}},
        "data.dataset: ./nowhere/cifar10: no manifest.json",
    ),
    (
        "duplicate axis",
        {"grid": {"model.channels": [32], "model.model_channels": [64]}},
        "grid.model.model_channels: duplicate axis: the same key as grid.model.channels",
    ),
    ("duplicate value", {"grid": {"train.seed": [1, 1]}}, "grid.train.seed: duplicate values 1"),
    (
        "two budget axes",
        {"grid": {"budget.steps": [1], "budget.flops": [1e9]}},
        "grid: at most one budget axis",
    ),
    (
        "bad sampler",
        {"eval": {"sampling": ["ddim50@fixed_large"]}},
        "eval.sampling: 'ddim50@fixed_large'",
    ),
]


@pytest.mark.parametrize(("case", "change", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_sweeps_exit_2_with_file_key_and_allowed_values(
    tmp_path, capsys, case, change, message
):
    import ray

    d = {k: v for k, v in SMALL.items() if k != "grid"} | {"grid": {"model.name": ["digits-xs"]}}
    for key, value in change.items():
        d[key] = {**d[key], **value} if isinstance(d.get(key), dict) and key != "grid" else value
    path = write(tmp_path, d)
    assert main(["submit", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: " in err and message in err, err
    assert not ray.is_initialized() and not (tmp_path / "diffscale_runs").exists()


def test_duplicate_yaml_key_and_every_problem_at_once(tmp_path, capsys):
    text = "name: g\ngrid:\n  train.lr: [0.1]\n  train.lr: [0.2]\n"
    assert main(["submit", str(write(tmp_path, text))]) == 2
    assert "duplicate key 'train.lr'" in capsys.readouterr().err
    d = {
        **SMALL,
        "trian": {},
        "grid": {"train.lrr": [1], "budget.steps": [0]},
        "max_concurrent_trials": 0,
    }
    with pytest.raises(ConfigError) as error:
        load_sweep(write(tmp_path, d))
    keys = [k for k, _ in error.value.problems]
    assert {"trian", "max_concurrent_trials"} <= set(keys) and any("train.lrr" in k for k in keys)


def test_dataset_shape_and_splits_are_checked(tmp_path):
    data = fake_dataset(tmp_path / "rgb", (3, 8, 8), splits=("train",))
    d = {**SMALL, "data": {"dataset": data, "eval_split": "test"}}
    with pytest.raises(ConfigError) as error:
        load_sweep(write(tmp_path, d))
    text = str(error.value)
    assert "has no split 'test'; it has ['train']" in text and "holds 3x8x8 images" in text


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("--set train.lrr=1", "--set train.lrr=1: unknown key (did you mean 'lr'?)"),
        ("--set train.batch_size=abc", "--set train.batch_size=abc: expected an integer >= 1"),
        ("yaml train.lrr", "train.lrr: unknown key (did you mean 'lr'?)"),
    ],
)
def test_base_config_problem_is_reported_once_under_its_source(tmp_path, capsys, where, message):
    d = {**SMALL, "grid": {"model.name": ["digits-xs", "digits-s"], "budget.steps": [10, 20]}}
    if where.startswith("yaml"):
        d = {**d, "train": {**d.get("train", {}), "lrr": 1}}
        sets: list[str] = []
    else:
        sets = ["--set", where.removeprefix("--set ")]
    path = write(tmp_path, d)
    assert main(["submit", str(path), "--dry-run", *sets]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {message}" in err, err
    assert err.count("lrr" if "lrr" in where else "batch_size") == 1, err  # once, not per value
    assert "grid." not in err, err  # not blamed on an axis


def test_axis_problem_stays_under_its_axis_beside_a_base_problem(tmp_path):
    d = {**SMALL, "grid": {"model.name": ["digits-xs", "digits-q"], "budget.steps": [10, 20]}}
    with pytest.raises(ConfigError) as error:
        load_sweep(write(tmp_path, d), ["train.lrr=1"])
    keys = [k for k, _ in error.value.problems]
    assert keys[0] == "--set train.lrr=1" and keys.count("--set train.lrr=1") == 1, keys
    assert "grid.model.name[1] = 'digits-q': model.name" in keys, keys
    assert not any(k.startswith("grid.") and "lrr" in k for k in keys), keys


@pytest.mark.parametrize(
    "item",
    ["tracking.uri=http://bob:hunter2@head:5000", 'tracking={uri: "http://bob:hunter2@head:5000"}'],
)
def test_a_password_in_a_set_item_is_masked_where_the_item_is_named(tmp_path, capsys, item):
    assert main(["submit", str(write(tmp_path, SMALL)), "--dry-run", "--set", item]) == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err, err
    assert "--set tracking" in err and "http://bob:***@head:5000" in err, err


def test_mask_passwords_keeps_everything_but_the_password():
    assert mask_passwords("a=s3://k:s3cret@minio:9000/b x") == "a=s3://k:***@minio:9000/b x"
    assert mask_passwords("http://u:p@ss@h:1/x") == "http://u:***@h:1/x"  # as urlsplit reads it
    for text in ["http://bob@head:5000", "http://head:5000/a:b@c", "plain:text@x", ""]:
        assert mask_passwords(text) == text
