"""Guards: refuse a sweep that would silently break on the cluster it joins, before any
trial starts and before anything in its storage folder is written.

``submit`` and ``resume`` (:mod:`orchestrator.sweep.submit`) call :func:`check_sweep`:

- **More than one node** (or a single node that offers no CPU: a ``--num-cpus=0`` head
  whose worker nodes the autoscaler has yet to add): every node writes checkpoints and
  sweep state where ``storage.path`` points and Ray does not copy them to the head (not
  since 2.7), so it must be ``s3://...`` or a folder every node mounts at the same path,
  declared with ``storage.shared: true``; the tracking URI must be an MLflow server
  (``http(s)://``), since a SQLite file or a folder would exist once per node.
- **Inside a Ray job** (``ray job submit``) the command runs in a temporary copy of
  ``--working-dir``, deleted with the job: a relative local path (or a default,
  ``./diffscale_runs`` and ``./mlflow.db``) would land there, so it must be absolute.

The driver joins the cluster in :func:`connect` (with the runtime env of
:mod:`orchestrator.trial.env`, which carries the S3 endpoint, the tracking URI and
credentials by reference to every node); without ``RAY_ADDRESS`` the sweep runs on a private
local Ray, a single node, and nothing is checked or started here. Problems are raised as
one :class:`~orchestrator.config.ConfigError` (``file: key: what is allowed``, exit 2).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from orchestrator.config import ConfigError, Problem, SweepSpec, canonical_key, load_yaml
from orchestrator.names import DEFAULT_TRACKING_DB
from orchestrator.trial.env import driver_only_secrets, worker_env

log = logging.getLogger(__name__)

__all__ = [
    "JOB_ENV",
    "ClusterContext",
    "check_sweep",
    "connect",
    "given_value",
    "in_ray_job",
    "job_env_names",
    "placement_problems",
    "storage_arg_problems",
    "tracking_local_path",
    "warn_driver_only_secrets",
]

# Set by Ray's job supervisor for a job's entrypoint (it strips RAY_JOB_ID from it).
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
DEFAULT_STORAGE_PATH = "./diffscale_runs"  # StorageConfig.path's default


@dataclass(frozen=True)
class ClusterContext:
    """Where the driver runs: the alive nodes of its Ray cluster (1 for the private local
    Ray), the CPUs they offer, whether it is a Ray job's entrypoint and its cwd."""

    nodes: int = 1
    cpus: float | None = None  # None: not asked (the private local Ray)
    in_job: bool = False
    cwd: str = ""

    @property
    def multi_node(self) -> bool:
        """Whether trials may run on another machine than the driver's."""
        return self.nodes > 1 or (self.nodes == 1 and self.cpus == 0)

    def describe(self) -> str:
        if self.nodes > 1:
            return f"this Ray cluster has {self.nodes} alive nodes"
        return (
            "this Ray cluster's only node offers no CPU (a head started with --num-cpus=0), "
            "so trials run on worker nodes it has yet to add"
        )


def in_ray_job(environ: Mapping[str, str]) -> bool:
    """Whether this process is the entrypoint of a Ray job (``ray job submit``)."""
    return JOB_ENV in environ


def job_env_names(environ: Mapping[str, str]) -> set[str]:
    """The ``env_vars`` the Ray job's own runtime env sets (``--runtime-env``): left to the
    job, since ``ray.init`` refuses a runtime env that sets them again."""
    try:
        config = json.loads(environ.get(JOB_ENV) or "{}")
    except ValueError:
        return set()
    runtime_env = (config or {}).get("runtime_env") or {}
    return set((runtime_env.get("env_vars") or {}).keys())


def tracking_local_path(uri: str) -> str | None:
    """The file or folder a tracking URI writes locally (maybe relative), or None for a
    server or database: ``sqlite:///rel.db`` -> ``rel.db``, ``sqlite:////abs.db`` ->
    ``/abs.db``, ``file:///abs`` -> ``/abs``, a bare path -> itself."""
    if uri.startswith("sqlite:///"):
        return uri[len("sqlite:///") :]
    scheme = urlsplit(uri).scheme
    if scheme == "file":
        return uri[len("file://") :] if uri.startswith("file://") else uri[len("file:") :]
    if not scheme or len(scheme) == 1:  # a path (one letter: a Windows drive)
        return uri
    return None


def _is_server(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https")


def _local_storage(path: str) -> str | None:
    """The local path of a storage URI (maybe relative), None for s3://."""
    if path.startswith("s3://"):
        return None
    return path[len("file://") :] if path.startswith("file://") else path


def _job_message(value: str, cwd: str, example: str) -> str:
    return (
        f"{value!r} is relative, but this command runs inside a Ray job, whose "
        f"working directory ({cwd}) is a temporary copy of --working-dir deleted with the "
        f"job: pass an absolute path ({example})"
    )


def placement_problems(
    *,
    storage_path: str,
    storage_shared: bool,
    tracking_uri: str,
    given_storage: str | None,
    given_tracking: str | None,
    context: ClusterContext,
) -> list[Problem]:
    """The guards' problems as (key, message). ``storage_path`` / ``tracking_uri`` are the
    sweep's resolved values; ``given_*`` what the user gave before paths were made
    absolute (None: not given, the default or $MLFLOW_TRACKING_URI applies)."""
    problems: list[Problem] = []
    if context.in_job:
        storage = _local_storage(given_storage or DEFAULT_STORAGE_PATH)
        if storage is not None and not os.path.isabs(storage):
            shown = given_storage or f"{DEFAULT_STORAGE_PATH} (the default)"
            example = "--set storage.path=/shared/diffscale_runs, or s3://BUCKET/PREFIX"
            problems.append(("storage.path", _job_message(shown, context.cwd, example)))
        tracking = given_tracking or f"sqlite:///{DEFAULT_TRACKING_DB}"
        local = tracking_local_path(tracking)
        if local is not None and not os.path.isabs(local):
            default = f"{tracking} (the default: no tracking.uri nor $MLFLOW_TRACKING_URI)"
            shown = given_tracking or default
            example = "--set tracking.uri=http://HEAD:5000, an MLflow server"
            problems.append(("tracking.uri", _job_message(shown, context.cwd, example)))
    if context.multi_node:
        where = context.describe()
        if _local_storage(storage_path) is not None and not storage_shared:
            problems.append(
                (
                    "storage.path",
                    f"{storage_path!r} is a local path, but {where}: each node would keep its "
                    "own checkpoints and trial state. Allowed: s3://BUCKET/PREFIX (with "
                    "storage.endpoint_url or AWS_ENDPOINT_URL for an S3-compatible store), or "
                    "a folder every node mounts at the same path (NFS) declared with "
                    "`storage.shared: true`",
                )
            )
        if not _is_server(tracking_uri):
            problems.append(
                (
                    "tracking.uri",
                    f"{tracking_uri!r} is not an MLflow server, but {where}: a SQLite file or "
                    "a folder would be written separately on each node. Allowed: "
                    "http://HOST:PORT or https://HOST (`mlflow server`, e.g. "
                    "cluster/mlflow-server.sh on the head: --set tracking.uri=http://HEAD:5000)",
                )
            )
    return problems


def storage_arg_problems(storage_arg: str | None, context: ClusterContext) -> list[Problem]:
    """``diffscale resume/status --storage`` inside a Ray job must be absolute or s3://
    (None: $DIFFSCALE_STORAGE, else ./diffscale_runs)."""
    if not context.in_job:
        return []
    given = storage_arg or os.environ.get("DIFFSCALE_STORAGE")
    local = _local_storage(given or DEFAULT_STORAGE_PATH)
    if local is None or os.path.isabs(local):
        return []
    shown = given or f"{DEFAULT_STORAGE_PATH} (the default)"
    example = "--storage /shared/diffscale_runs, or s3://BUCKET/PREFIX"
    return [("--storage", _job_message(shown, context.cwd, example))]


def given_value(spec: SweepSpec, section: str, key: str) -> Any:
    """``section.key`` as the sweep file and its ``--set`` items gave it, before the
    tracking URI and storage path were made absolute (None when neither gave it)."""
    data = load_yaml(spec.text) if spec.text else {}
    part = data.get(section) if isinstance(data, dict) else None
    value = part.get(key) if isinstance(part, dict) else None
    for item in spec.sets:
        name, _, text = item.partition("=")
        name = canonical_key(name.strip())
        if name == f"{section}.{key}":
            value = load_yaml(text)
        elif name == section:
            given = load_yaml(text)
            value = given.get(key) if isinstance(given, dict) else None
    return value


def connect(tracking_uri: str | None, environ: Mapping[str, str] = os.environ) -> ClusterContext:
    """Join the cluster in ``RAY_ADDRESS`` (once: ``run_sweep`` reuses the connection), with
    the runtime env that carries :func:`orchestrator.trial.env.worker_env` to every node,
    and count its alive nodes. Without ``RAY_ADDRESS`` and Ray not started, nothing is
    started: the private local Ray has one node."""
    import ray

    in_job = in_ray_job(environ)
    cwd = os.getcwd()
    address = environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if not address:
            return ClusterContext(nodes=1, cpus=None, in_job=in_job, cwd=cwd)
        env = worker_env(environ, tracking_uri)
        for name in job_env_names(environ):
            env.pop(name, None)
        log.info("joining the Ray cluster at %s; env for every node: %s", address, sorted(env))
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": env} if env else None,
        )
    alive = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(float(n.get("Resources", {}).get("CPU", 0)) for n in alive)
    return ClusterContext(nodes=len(alive), cpus=cpus, in_job=in_job, cwd=cwd)


def warn_driver_only_secrets(environ: Mapping[str, str], context: ClusterContext) -> list[str]:
    """On a multi-node cluster, log a warning per secret set only in the driver's
    environment (it is never forwarded), naming the alternative; returns their names.

    A secret the Ray job's own runtime env sets (``ray job submit --runtime-env-json``) is
    not driver-only: Ray gives the job's env to every task and actor of the job."""
    if not context.multi_node:
        return []
    job_set = job_env_names(environ)
    found = {k: v for k, v in driver_only_secrets(environ).items() if k not in job_set}
    for name, alternative in found.items():
        log.warning(
            "%s is set in this driver's environment only: secrets never travel to other nodes, "
            "so trials there do not see it; use %s",
            name,
            alternative,
        )
    return list(found)


def check_sweep(spec: SweepSpec, environ: Mapping[str, str] = os.environ) -> ClusterContext:
    """Connect (:func:`connect`), log the driver-only secrets and raise one ConfigError with
    every guard's problem; returns where the sweep runs."""
    storage = spec.base.get("storage") or {}
    given_storage = given_value(spec, "storage", "path")
    given_tracking = given_value(spec, "tracking", "uri") or environ.get("MLFLOW_TRACKING_URI")
    context = connect(spec.tracking_uri, environ)
    warn_driver_only_secrets(environ, context)
    problems = placement_problems(
        storage_path=str(storage.get("path") or spec.storage_path),
        storage_shared=bool(storage.get("shared", False)),
        tracking_uri=spec.tracking_uri,
        given_storage=None if given_storage is None else str(given_storage),
        given_tracking=None if given_tracking is None else str(given_tracking),
        context=context,
    )
    if problems:
        raise ConfigError(problems, spec.source)
    return context
