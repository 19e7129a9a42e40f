"""What a trial's processes on every node receive from the driver's environment.

On a multi-node cluster the Tune trial actors, the Train controllers and the DDP workers run
in processes started by each node's own raylet, with that node's environment, not the
driver's. Settings a worker needs travel in the Ray runtime env (``env_vars``), applied to
the whole job by ``ray.init(runtime_env=...)`` when the driver joins a cluster
(:func:`orchestrator.sweep.guards.connect`) and to every trial's workers by
``ray.train.RunConfig(worker_runtime_env=...)`` (:mod:`orchestrator.trial.driver`).

What travels (:data:`FORWARDED_ENV`), when set in the driver's environment:

- the S3 endpoint and region, so storage, datasets and MLflow artifacts on an S3-compatible
  store resolve the same everywhere: ``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``,
  ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``AWS_REGION``, ``AWS_CA_BUNDLE``,
  ``AWS_EC2_METADATA_DISABLED``, ``MLFLOW_S3_IGNORE_TLS``;
- the tracking server: ``MLFLOW_TRACKING_URI`` (the sweep's resolved URI), and what
  identifies the caller without being a secret: ``MLFLOW_TRACKING_USERNAME``,
  ``MLFLOW_TRACKING_INSECURE_TLS``, ``MLFLOW_TRACKING_SERVER_CERT_PATH``,
  ``MLFLOW_TRACKING_CLIENT_CERT_PATH``;
- credentials by reference only: ``AWS_PROFILE``, ``AWS_SHARED_CREDENTIALS_FILE`` and
  ``AWS_CONFIG_FILE`` name a profile or a file that each node reads itself.

What never travels: a value whose name contains PASSWORD, SECRET, TOKEN or SESSION, and
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (:func:`is_secret`), nor a forwarded
value with a password inside a URL. A runtime env is visible to anyone who can read the
cluster (the dashboard shows a Train run's ``worker_runtime_env``), so secrets stay where
they are: each node gets its own (an instance role or service account, a credentials file
at the same path on every node, MLflow's ``~/.mlflow/credentials``).
:func:`driver_only_secrets` names the ones set only on the driver, with the by-reference
alternative, for a warning on a multi-node cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

__all__ = [
    "FORWARDED_ENV",
    "MLFLOW_ENV",
    "REFERENCE_ENV",
    "S3_ENV",
    "SECRET_ENV",
    "SECRET_MARKERS",
    "driver_only_secrets",
    "is_secret",
    "worker_env",
]

S3_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CA_BUNDLE",
    "AWS_EC2_METADATA_DISABLED",
    "MLFLOW_S3_IGNORE_TLS",
)
MLFLOW_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)
REFERENCE_ENV = ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
FORWARDED_ENV = S3_ENV + MLFLOW_ENV + REFERENCE_ENV
SECRET_MARKERS = ("PASSWORD", "SECRET", "TOKEN", "SESSION")
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

_AWS_ALTERNATIVE = (
    "an instance role / service account on every node, or AWS_PROFILE or "
    "AWS_SHARED_CREDENTIALS_FILE naming a credentials file present on every node (those travel)"
)
_MLFLOW_ALTERNATIVE = (
    "MLflow's credentials file ~/.mlflow/credentials on every node "
    "(MLFLOW_TRACKING_USERNAME travels, a password never does)"
)


def is_secret(name: str) -> bool:
    """Whether an environment variable's value must never leave the process it is set in."""
    upper = name.upper()
    return upper in SECRET_ENV or any(marker in upper for marker in SECRET_MARKERS)


def _holds_password(value: str) -> bool:
    try:
        return bool(urlsplit(value).password)
    except ValueError:
        return False


def worker_env(environ: Mapping[str, str], tracking_uri: str | None = None) -> dict[str, str]:
    """The ``env_vars`` of the runtime env: the :data:`FORWARDED_ENV` names set (non-empty)
    in ``environ``, with ``MLFLOW_TRACKING_URI`` set to ``tracking_uri`` when given; never a
    secret (:func:`is_secret`) nor a URL with a password in it."""
    env = {name: environ[name] for name in FORWARDED_ENV if environ.get(name)}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return {
        name: value
        for name, value in env.items()
        if not is_secret(name) and not _holds_password(value)
    }


def driver_only_secrets(environ: Mapping[str, str]) -> dict[str, str]:
    """Secret AWS_* and MLFLOW_* variables set in ``environ`` (which therefore stay on the
    driver) -> the by-reference alternative to name in a warning. Never the values."""
    found = {}
    for name in sorted(environ):
        if not environ[name] or not is_secret(name):
            continue
        if name.startswith("AWS_"):
            found[name] = _AWS_ALTERNATIVE
        elif name.startswith("MLFLOW_"):
            found[name] = _MLFLOW_ALTERNATIVE
    return found
