"""Check the cluster configs in this folder offline, with Ray's own validation, before `ray up`.

    python cluster/validate.py cluster/aws.yaml cluster/gcp.yaml cluster/kuberay/*.yaml

Cluster-launcher files (aws.yaml, gcp.yaml) go through Ray's ``prepare_config`` (merges the
provider's defaults.yaml, no cloud call) and ``validate_config`` (the ray-schema.json in the
wheel: unknown keys, integer resources, sum of min_workers <= max_workers). KubeRay files
(RayCluster, RayJob's spec.rayClusterSpec) go through the translation the autoscaler itself
runs on the head, ``_derive_autoscaling_config_from_ray_cr``, then ``validate_config``.
On top, what those functions let through but a real cluster would not run as intended:
a node type with min_workers > max_workers, unknown keys in the KubeRay spec, and a
fractional ``nvidia.com/gpu`` (Kubernetes has no fractional GPUs; Ray would round it up).
Exit 0 if every file passes, 2 with one line per problem (file: key: message) otherwise.
"""

from __future__ import annotations

import copy
import decimal
import sys
from pathlib import Path
from typing import Any

import yaml

# Keys of the KubeRay v1 CRDs this project uses or may reasonably use (ray.io/v1, KubeRay 1.x).
RAYCLUSTER_SPEC_KEYS = {
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headGroupSpec",
    "workerGroupSpecs",
    "headServiceAnnotations",
    "suspend",
    "managedBy",
    "gcsFaultToleranceOptions",
    "upgradeStrategy",
    "authOptions",
}
HEAD_GROUP_KEYS = {
    "rayStartParams",
    "template",
    "serviceType",
    "headService",
    "enableIngress",
    "resources",
    "labels",
}
WORKER_GROUP_KEYS = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "idleTimeoutSeconds",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "numOfHosts",
    "suspend",
    "resources",
    "labels",
}
RAYJOB_SPEC_KEYS = {
    "entrypoint",
    "rayClusterSpec",
    "clusterSelector",
    "shutdownAfterJobFinishes",
    "ttlSecondsAfterFinished",
    "activeDeadlineSeconds",
    "runtimeEnvYAML",
    "jobId",
    "metadata",
    "submitterPodTemplate",
    "submitterConfig",
    "submissionMode",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "entrypointResources",
    "entrypointMemory",
    "backoffLimit",
    "suspend",
    "managedBy",
    "deletionStrategy",
}
KINDS = ("RayCluster", "RayJob")


def _unknown(where: str, got: dict[str, Any], allowed: set[str]) -> list[str]:
    return [
        f"{where}.{k}: unknown key; allowed: {sorted(allowed)}" for k in sorted(set(got) - allowed)
    ]


def _kuberay_problems(doc: dict[str, Any]) -> list[str]:
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    kind = doc.get("kind")
    if doc.get("apiVersion") != "ray.io/v1" or kind not in KINDS:
        return [f"apiVersion/kind: expected ray.io/v1 and one of {list(KINDS)}"]
    problems: list[str] = []
    spec = doc.get("spec") or {}
    if kind == "RayJob":
        problems += _unknown("spec", spec, RAYJOB_SPEC_KEYS)
        spec, where = spec.get("rayClusterSpec") or {}, "spec.rayClusterSpec"
    else:
        where = "spec"
    problems += _unknown(where, spec, RAYCLUSTER_SPEC_KEYS)
    problems += _unknown(f"{where}.headGroupSpec", spec.get("headGroupSpec") or {}, HEAD_GROUP_KEYS)
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        at = f"{where}.workerGroupSpecs[{i}]"
        problems += _unknown(at, group, WORKER_GROUP_KEYS)
        if group.get("minReplicas", 0) > group.get("maxReplicas", 0):
            problems.append(f"{at}.minReplicas: {group['minReplicas']} > maxReplicas")
        for c in (group.get("template") or {}).get("spec", {}).get("containers", []):
            for kind_ in ("limits", "requests"):
                gpus = str((c.get("resources") or {}).get(kind_, {}).get("nvidia.com/gpu", "0"))
                try:
                    whole = decimal.Decimal(gpus) == decimal.Decimal(gpus).to_integral_value()
                except decimal.InvalidOperation:
                    whole = False
                if not whole:
                    problems.append(
                        f"{at}: nvidia.com/gpu {kind_} {gpus!r}; expected a whole number"
                    )
    try:
        cr = {"metadata": doc.get("metadata") or {}, "spec": spec}
        _derive_autoscaling_config_from_ray_cr(cr)  # ends with validate_config
    except Exception as e:  # any rejection by Ray is a problem with the file
        problems.append(f"{where}: rejected by Ray's KubeRay translation: {type(e).__name__}: {e}")
    return problems


def _launcher_problems(doc: dict[str, Any]) -> list[str]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(doc))
        validate_config(prepared)
    except Exception as e:  # jsonschema.ValidationError, ValueError, ...: all mean "rejected"
        msg = getattr(e, "message", None) or str(e)
        path = ".".join(str(p) for p in getattr(e, "absolute_path", []) or [])
        return [f"{path or '(top level)'}: rejected by Ray: {type(e).__name__}: {msg}"]
    problems = []
    for name, node in prepared["available_node_types"].items():
        if node.get("min_workers", 0) > node.get("max_workers", 0):
            problems.append(
                f"available_node_types.{name}.min_workers: {node['min_workers']} > "
                f"max_workers {node['max_workers']}"
            )
    return problems


def problems(path: str | Path) -> list[str]:
    """Every problem in one cluster config file, each as 'file: key: message'."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        return [f"{path}: cannot read: {e}"]
    if not isinstance(doc, dict):
        return [f"{path}: expected a mapping at the top level"]
    found = _kuberay_problems(doc) if "apiVersion" in doc else _launcher_problems(doc)
    return [f"{path}: {p}" for p in found]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    found = [p for path in argv for p in problems(path)]
    for p in found:
        print(p, file=sys.stderr)
    if not found:
        print(f"ok: {len(argv)} file(s) pass Ray's offline validation")
    return 2 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
