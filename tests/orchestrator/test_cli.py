"""Every message of issue 15 through the real `diffscale` command (orchestrator.cli.main, as the
console script calls it): its exit code, the words that point to the fix, no traceback. No Ray:
each case is refused before anything starts."""

from __future__ import annotations

import re

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError
from orchestrator.grid import load_plan
from orchestrator.names import SWEEP_RECORD
from orchestrator.sweep.store import SweepStore
from tests.orchestrator.sweep_files import SMALL, SWEEPS, bundled_overrides, write


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default storage and MLflow land in the test's directory
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # capacity is checked against this box


def run(capfd, *argv: str) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `diffscale ARGV`; argparse's exits included."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text, text
    return code, text


def test_eval_of_a_missing_path_says_it_does_not_exist(capfd, tmp_path):
    code, text = run(capfd, "eval", str(tmp_path / "nonexistent"))
    assert code == 2 and f"{tmp_path / 'nonexistent'} does not exist" in text, text
    assert "checkpoint directory" in text and "manifest" not in text, text
    assert not (tmp_path / "nonexistent").exists()  # nothing was created on the way


def test_train_of_a_missing_file_names_it(capfd):
    code, text = run(capfd, "train", "sweeps/nope.yaml")
    assert code == 2 and "sweeps/nope.yaml does not exist" in text, text
    assert "Errno" not in text and "sweeps/trial_digits.yaml" in text, text


def test_a_changed_resubmission_names_the_keys_and_suggests_a_new_name(capfd, tmp_path):
    path = write(tmp_path, SMALL)
    plan = load_plan(str(path))
    store = SweepStore(plan.spec.storage_path)  # as a first `diffscale submit` leaves it
    store.write(SWEEP_RECORD, {"name": "g", "definition": plan.spec.to_dict()})
    code, text = run(capfd, "submit", str(path), "--set", "train.lr=3e-4", "--dry-run")
    assert code == 2 and "already exists" in text, text
    assert re.search(r"differs in: train\.lr \(\S+ -> 0\.0003\)", text), text
    assert "--set name=g-2" in text and "diffscale resume g" in text, text


def test_a_bare_key_suggests_its_section(capfd, tmp_path):
    code, text = run(capfd, "submit", str(write(tmp_path, SMALL)), "--set", "lr=3e-4")
    assert code == 2 and "lr: unknown key (did you mean 'train.lr'?" in text, text
    code, text = run(capfd, "train", str(write(tmp_path, {"name": "t"}, "t.yaml")), "--set", "x=1")
    assert code == 2 and "x:" in text, text  # a key of no section: the allowed ones


def test_an_unknown_subcommand_suggests_the_closest(capfd):
    code, text = run(capfd, "sumbit", "sweeps/demo.yaml")
    assert code == 2 and "unknown choice 'sumbit': did you mean 'submit'?" in text, text
    code, text = run(capfd, "eval", "x", "--nll", "fulll")
    assert code == 2 and "did you mean 'full'?" in text, text


@pytest.mark.parametrize(
    ("dataset", "command"),
    [
        ("data/cifar10", "diffscale data prepare cifar10 --out data/cifar10 --source "),
        ("data/imagenet64", "diffscale data prepare imagenet64 --out data/imagenet64 --source "),
        ("data/faces", "diffscale data prepare folder --out data/faces --source "),
    ],
)
def test_an_unprepared_dataset_gets_its_concrete_command(capfd, tmp_path, dataset, command):
    size = 64 if "imagenet" in dataset else 32
    sweep = {
        **SMALL,
        "data": {"dataset": dataset},
        "model": {"name": "cifar10-w32-b1" if size == 32 else "imagenet64-w64"},
        "grid": {"budget.steps": [10]},
    }
    code, text = run(capfd, "submit", str(write(tmp_path, sweep)), "--dry-run")
    assert code == 2 and "was never prepared" in text and command in text, text
    assert "NAME" not in text, text


def test_a_yaml_syntax_error_names_the_file_line_and_column(capfd, tmp_path):
    path = write(tmp_path, "name: x\nmodel: {name: digits-xs\n", "bad.yaml")
    for command in ("submit", "train"):
        code, text = run(capfd, command, str(path))
        assert code == 2, text
        assert f"{path}: invalid YAML: line 3, column 1: expected ',' or '}}'" in text, text
        assert "line 2, column 8" in text and "<unicode string>" not in text, text


def test_repeated_notes_are_shown_once_with_a_count(capfd, tmp_path):
    name = "ablation_imagenet64.yaml"
    sets = [a for o in bundled_overrides(name, tmp_path) for a in ("--set", o)]
    code, text = run(capfd, "submit", str(SWEEPS / name), "--dry-run", *sets)
    assert code == 0, text
    notes = [line for line in text.splitlines() if "resources" in line and "needed" in line]
    notes += [line for line in text.splitlines() if "workers x" in line]
    assert notes and len(notes) == len(set(notes)), text
    assert re.search(r"\(\d+ times\)", text), text


def test_config_error_counts_a_problem_of_many_trials_once():
    error = ConfigError([("resources", "too big")] * 3 + [("train.lr", "bad")], "s.yaml")
    assert str(error).splitlines() == [
        "s.yaml: resources: too big (3 times)",
        "s.yaml: train.lr: bad",
    ]
    assert len(error.problems) == 4  # the problems themselves are all kept


def test_eval_by_cell_of_an_unknown_sweep_says_how_to_find_it(capfd):
    code, text = run(capfd, "eval", "nosuch", "--cell", "c00")
    assert code == 2 and "no sweep at" in text and "--storage" in text, text
