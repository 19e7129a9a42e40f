"""Submit a sweep and resume it: ``submit(prepare("sweeps/demo.yaml"))``, ``resume(name)``.

:func:`prepare` loads, validates and expands the sweep file before any Ray resource is
taken and finds what its storage holds; :func:`submit` and :func:`resume` check that this
machine (or the cluster in RAY_ADDRESS) can run it, run the guards of
:mod:`orchestrator.sweep.guards` (shared storage and an MLflow server on many nodes,
absolute paths inside a Ray job), all before anything is written, and hand it to the Tune
driver (:mod:`orchestrator.sweep.driver`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from orchestrator.config import ConfigError, Problem
from orchestrator.grid import SweepPlan, SweepSpec, load_plan
from orchestrator.names import SWEEP_RECORD
from orchestrator.sweep.driver import SubmitResult, run_sweep
from orchestrator.sweep.guards import ClusterContext, check_sweep, in_ray_job, storage_arg_problems
from orchestrator.sweep.store import SweepError, SweepStore, store_for, stored_record

log = logging.getLogger(__name__)

__all__ = ["Prepared", "capacity_problems", "prepare", "resume", "submit"]


def capacity_problems(plan: SweepPlan) -> list[Problem]:
    """Without RAY_ADDRESS the sweep runs on a private local Ray: every trial must fit on
    this machine, or Tune would wait forever for resources that never come."""
    if os.environ.get("RAY_ADDRESS"):
        return []
    cpus = os.cpu_count() or 1
    problems = []
    for t in plan.trials:
        res = t.config.resources
        need = res.num_workers * res.cpus_per_worker
        if need > cpus:
            msg = (
                f"{res.num_workers} workers x {res.cpus_per_worker:g} CPUs = {need:g} CPUs, "
                f"but this machine has {cpus}; lower resources.num_workers or set RAY_ADDRESS "
                "to a cluster"
            )
            problems.append((f"resources ({t.size})", msg))
        if res.use_gpu:
            import torch

            if torch.cuda.device_count() < res.num_workers:
                msg = (
                    f"{res.num_workers} GPUs needed, {torch.cuda.device_count()} here; set "
                    "RAY_ADDRESS to a GPU cluster"
                )
                problems.append((f"resources.use_gpu ({t.size})", msg))
    return problems


@dataclass(frozen=True)
class Prepared:
    """A validated, expanded sweep and what its storage already holds."""

    plan: SweepPlan
    store: SweepStore
    record: dict | None  # the stored sweep.json; None for a new sweep

    @property
    def spec(self) -> SweepSpec:
        return self.plan.spec


def prepare(path: str, overrides: Sequence[str] = (), *, check_data: bool = True) -> Prepared:
    """Load, validate and expand a sweep file; find its store and what it holds already.

    A sweep of the same name stored with a different definition is an error: resuming it
    with another grid would mix two studies in one experiment.
    """
    plan = load_plan(path, overrides, check_data=check_data)
    spec = plan.spec
    store = SweepStore(spec.storage_path, spec.storage_endpoint)
    record = store.read(SWEEP_RECORD)
    if record is not None and record["definition"] != spec.to_dict():
        changed = _differences(record["definition"], spec.to_dict())
        shown = ", ".join(changed[:8]) + (
            f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        )
        raise SweepError(
            f"sweep {spec.name!r} already exists at {store.uri} with a different definition "
            f"(differs in: {shown}); to run the changed study beside it, give it another "
            f"name: add `--set name={spec.name}-2` (or edit `name:`); to continue the stored "
            f"one: `diffscale resume {spec.name}`"
        )
    return Prepared(plan, store, record)


def _differences(old: object, new: object, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two definitions, with old -> new values:
    ``base.train.lr (0.001 -> 0.0003)``; the sweep-level ``base`` prefix is dropped."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            out += _differences(old.get(key), new.get(key), "" if name == "base" else name)
        return out
    if old == new:
        return []
    return [f"{prefix or 'definition'} ({json.dumps(old)} -> {json.dumps(new)})"]


def submit(
    prepared: Prepared,
    *,
    retry_errored: bool = False,
    say: Callable[[str], None] = log.info,
) -> SubmitResult:
    """Run (or, if it exists with the same definition, continue) a prepared sweep:
    ``submit(prepare("sweeps/demo.yaml"))``."""
    spec = prepared.spec
    if problems := capacity_problems(prepared.plan):
        raise ConfigError(problems, spec.source)
    check_sweep(spec)
    record = prepared.record or {
        "name": spec.name,
        "source": spec.source,
        "text": spec.text,
        "overrides": list(spec.overrides),
        "definition": spec.to_dict(),
        "tracking_uri": spec.tracking_uri,
        "experiment": spec.experiment,
        "created": time.time(),
    }
    return run_sweep(prepared.plan, prepared.store, record, retry_errored=retry_errored, say=say)


def resume(
    name: str,
    *,
    storage_path: str | None = None,
    endpoint_url: str | None = None,
    retry_errored: bool = False,
    say: Callable[[str], None] = log.info,
) -> SubmitResult:
    """Continue sweep ``name`` after any interruption: finished trials are kept, the
    interrupted ones continue from their newest checkpoints, errored ones only if asked."""
    here = ClusterContext(in_job=in_ray_job(os.environ), cwd=os.getcwd())
    if problems := storage_arg_problems(storage_path, here):
        raise ConfigError(problems)
    store = store_for(name, storage_path, endpoint_url)
    record = stored_record(store)
    plan = load_plan(record["source"], record["overrides"], text=record["text"])
    if problems := capacity_problems(plan):
        raise ConfigError(problems, plan.spec.source)
    check_sweep(plan.spec)
    return run_sweep(plan, store, record, retry_errored=retry_errored, say=say)
