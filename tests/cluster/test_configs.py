"""cluster/*.yaml pass Ray's own offline validation; broken copies are rejected."""

from __future__ import annotations

import copy
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
KUBERAY = [CLUSTER / "kuberay" / "raycluster.yaml", CLUSTER / "kuberay" / "rayjob.yaml"]

_spec = importlib.util.spec_from_file_location("cluster_validate", CLUSTER / "validate.py")
assert _spec and _spec.loader
validate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(validate)


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _write(tmp_path: Path, name: str, doc: dict[str, Any]) -> Path:
    out = tmp_path / name
    out.write_text(yaml.safe_dump(doc))
    return out


def test_every_yaml_in_cluster_is_checked_and_passes() -> None:
    found = sorted(CLUSTER.rglob("*.yaml"))
    assert found == sorted(LAUNCHER + KUBERAY)
    for path in found:
        assert validate.problems(path) == [], path


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_head_offers_no_cpus_and_gpu_workers_exist(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config

    doc = prepare_config(copy.deepcopy(_load(path)))
    head = doc["head_node_type"]
    start = " ".join(doc["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "cluster/mlflow-server.sh" in start
    gpus = sorted(t["resources"].get("GPU", 0) for n, t in doc["available_node_types"].items())
    assert gpus == [0, 1, 8]
    assert doc["available_node_types"][head]["max_workers"] == 0
    assert any("-c constraints.txt" in c for c in doc["setup_commands"])


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_head_has_no_cpus_and_a_gpu_group(path: Path) -> None:
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    doc = _load(path)
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    derived = _derive_autoscaling_config_from_ray_cr({"metadata": doc["metadata"], "spec": spec})
    types = derived["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert types["headgroup"]["resources"].get("GPU", 0) == 0
    assert [t["resources"]["GPU"] for n, t in types.items() if n != "headgroup"] == [1]
    assert derived["max_workers"] >= 1
    if doc["kind"] == "RayJob":
        assert re.search(r"diffscale submit sweeps/\S+\.yaml", doc["spec"]["entrypoint"])
        sweep = doc["spec"]["entrypoint"].split()[2]
        assert (ROOT / sweep).is_file()
        assert "storage.path=s3://" in doc["spec"]["entrypoint"]
        assert "tracking.uri=http" in doc["spec"]["entrypoint"]


def _launcher_breakages() -> list[tuple[str, Any, str]]:
    def unknown(d):
        d["max_worker"] = 3

    def node_unknown(d):
        d["available_node_types"]["gpu8"]["gpus"] = 8

    def fractional(d):
        d["available_node_types"]["gpu1_spot"]["resources"]["GPU"] = 0.5

    def node_min_over_max(d):
        d["available_node_types"]["gpu8"]["min_workers"] = 3  # max_workers 2

    def sum_min_over_global(d):
        d["max_workers"] = 1
        d["available_node_types"]["gpu1_spot"]["min_workers"] = 1
        d["available_node_types"]["gpu8"]["min_workers"] = 1

    return [
        ("unknown top-level key", unknown, "max_worker"),
        ("unknown node-type key", node_unknown, "gpus"),
        ("fractional GPU", fractional, "0.5"),
        ("node min_workers > max_workers", node_min_over_max, "gpu8.min_workers"),
        ("sum of min_workers > max_workers", sum_min_over_global, "min_workers"),
    ]


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
@pytest.mark.parametrize(("what", "breaks", "named"), _launcher_breakages(), ids=lambda x: x)
def test_broken_launcher_copy_is_rejected(tmp_path, path, what, breaks, named) -> None:
    doc = _load(path)
    breaks(doc)
    found = validate.problems(_write(tmp_path, path.name, doc))
    assert found, what
    assert all(p.startswith(str(tmp_path / path.name)) for p in found)
    assert any(named in p for p in found), found


def _spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _kuberay_breakages() -> list[tuple[str, Any, str]]:
    def unknown(d):
        _spec(d)["enableAutoscaling"] = True

    def group_unknown(d):
        _spec(d)["workerGroupSpecs"][0]["maxReplica"] = 4

    def fractional_param(d):
        _spec(d)["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = "0.5"

    def fractional_limit(d):
        c = _spec(d)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        del _spec(d)["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"]
        c["resources"]["limits"]["nvidia.com/gpu"] = "0.5"

    def min_over_max(d):
        _spec(d)["workerGroupSpecs"][0]["minReplicas"] = 20  # maxReplicas 16

    return [
        ("unknown spec key", unknown, "enableAutoscaling"),
        ("unknown worker-group key", group_unknown, "maxReplica"),
        ("fractional num-gpus", fractional_param, "0.5"),
        ("fractional nvidia.com/gpu", fractional_limit, "0.5"),
        ("minReplicas > maxReplicas", min_over_max, "minReplicas"),
    ]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
@pytest.mark.parametrize(("what", "breaks", "named"), _kuberay_breakages(), ids=lambda x: x)
def test_broken_kuberay_copy_is_rejected(tmp_path, path, what, breaks, named) -> None:
    doc = _load(path)
    breaks(doc)
    found = validate.problems(_write(tmp_path, path.name, doc))
    assert found, what
    assert any(named in p for p in found), found


def test_min_over_max_rejected_by_ray_itself_for_one_group(tmp_path) -> None:
    """With one worker group, Ray's own validate_config catches minReplicas > maxReplicas."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    doc = _load(KUBERAY[0])
    doc["spec"]["workerGroupSpecs"][0]["minReplicas"] = 20
    with pytest.raises(ValueError, match="min_workers"):
        _derive_autoscaling_config_from_ray_cr(doc)


def test_validate_cli_exit_codes(tmp_path) -> None:
    files = [str(p) for p in LAUNCHER + KUBERAY]
    ok = subprocess.run(
        [sys.executable, str(CLUSTER / "validate.py"), *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "4 file(s) pass" in ok.stdout
    doc = _load(LAUNCHER[0])
    doc["available_node_types"]["gpu8"]["resources"]["GPU"] = 7.5
    bad = _write(tmp_path, "aws.yaml", doc)
    out = subprocess.run(
        [sys.executable, str(CLUSTER / "validate.py"), str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert f"{bad}: available_node_types.gpu8.resources.GPU" in out.stderr
