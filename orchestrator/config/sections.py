"""The sections of a trial config: data, model, train, budget, eval, resources, tracking,
storage (the diffusion section is ``diffusion.gaussian.DiffusionConfig``).

Each is a frozen dataclass deriving from :class:`~orchestrator.config.validation.Section`:
its fields carry their rules (``spec``: bounds, choices), and ``_check`` adds the rules
across the fields of one section. Rules across sections live in
:class:`~orchestrator.config.trial.TrialConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from diffusion.data.registry import builtin_dataset, default_features
from diffusion.gaussian import LEARNED_VAR_TYPES, VAR_TYPES
from diffusion.metrics.registry import FEATURE_EXTRACTORS
from diffusion.timesteps import SAMPLERS
from diffusion.unet import MODEL_LADDER, UNetConfig, get_model_config
from orchestrator.config.validation import Problem, Section, spec, unknown_key, uri_problem
from orchestrator.names import DEFAULT_TRACKING_DB

__all__ = [
    "BUDGET_KINDS",
    "EVAL_SPAN",
    "FIXED_VAR_TYPES",
    "BudgetConfig",
    "DataConfig",
    "EvalConfig",
    "ModelSection",
    "ResourcesConfig",
    "StorageConfig",
    "TrackingConfig",
    "TrainConfig",
    "mask_passwords",
    "parse_sampler",
]

EVAL_SPAN = 100  # the first eval point sits at ~1/100 of the run: curves span two decades
BUDGET_KINDS = ("steps", "images", "flops")  # a budget sets exactly one of them
# what a sampler may swap after "@": ("fixed_small", "fixed_large")
FIXED_VAR_TYPES = tuple(v for v in VAR_TYPES if v not in LEARNED_VAR_TYPES)


@dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    """Training and evaluation images."""

    section: ClassVar[str] = "data"
    dataset: str = "digits"  # a built-in dataset (offline) or the URI of prepared Parquet shards
    train_split: str = "train"
    eval_split: str = "test"
    flip: bool = False  # random horizontal flips (the paper flips CIFAR-10 and ImageNet)
    endpoint_url: str | None = None  # S3-compatible endpoint of the dataset URI

    def _check(self) -> list[Problem]:
        splits = {"train_split": self.train_split, "eval_split": self.eval_split}
        problems = [(k, "expected a non-empty string") for k, v in splits.items() if not v]
        if (builtin := builtin_dataset(self.dataset)) and builtin.splits:
            allowed = f"expected one of {list(builtin.splits)} for the {builtin.name}"
            problems += [
                (k, f"{allowed}, got {v!r}")
                for k, v in splits.items()
                if v and v not in builtin.splits
            ]
        uri = (
            uri_problem("dataset", self.dataset)
            if self.dataset
            else ("dataset", "expected a non-empty string")
        )
        return problems + ([uri] if uri else [])


@dataclass(frozen=True, kw_only=True)
class ModelSection(Section):
    """A ``MODEL_LADDER`` size, with any ``UNetConfig`` fields replaced by ``overrides``.

    A model off the ladder is the nearest ladder name with its fields overridden (every field
    may be, so a fully explicit UNet is possible). ``learn_sigma`` normally follows the
    diffusion: see ``TrialConfig.model_config``.
    """

    section: ClassVar[str] = "model"
    name: str = spec("digits-xs", choices=tuple(MODEL_LADDER))  # 0.72M params, 8x8 grey
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"model_channels": 64}

    def __post_init__(self) -> None:
        if isinstance(self.overrides, dict):  # tuples become lists: round trips compare equal
            plain = {k: list(v) if isinstance(v, tuple) else v for k, v in self.overrides.items()}
            object.__setattr__(self, "overrides", plain)
        super().__post_init__()

    def _check(self) -> list[Problem]:
        allowed = [f.name for f in dataclasses.fields(UNetConfig)]
        if unknown := [k for k in self.overrides if k not in allowed]:
            return [unknown_key(f"overrides.{k}", allowed) for k in unknown]
        try:
            self.resolve()
        except (ValueError, TypeError) as error:
            found = re.match(r"UNetConfig\.(\w+)", str(error))
            key = found[1] if found and found[1] in self.overrides else ""
            return [(f"overrides.{key}".rstrip("."), str(error))]
        return []

    def resolve(self, learn_sigma: bool | None = None) -> UNetConfig:
        """The UNetConfig; ``learn_sigma`` (unless overridden) sets the output channels."""
        overrides = dict(self.overrides)
        if learn_sigma is not None:
            if overrides.setdefault("learn_sigma", learn_sigma) != learn_sigma:
                raise ValueError(
                    f"learn_sigma={overrides['learn_sigma']} contradicts the diffusion, which "
                    f"{'learns' if learn_sigma else 'fixes'} the variance"
                )
        return get_model_config(self.name, **overrides)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Section):
    """Optimisation (Nichol & Dhariwal 2021 train with Adam, lr 1e-4, EMA 0.9999, for 500K
    steps; the defaults are the demo's calibration for runs of a few hundred steps)."""

    section: ClassVar[str] = "train"
    batch_size: int = spec(64, ge=1)  # global, split evenly over the workers
    lr: float = spec(1e-3, gt=0)  # AdamW learning rate
    weight_decay: float = spec(0.0, ge=0)
    ema_rate: float = spec(0.995, ge=0, lt=1)  # averaging horizon ~ 1 / (1 - rate) steps
    grad_clip: float | None = spec(1.0, gt=0)  # max global grad norm; null: no clipping
    timestep_sampler: str = spec("uniform", choices=tuple(SAMPLERS))  # Eq. 18: loss-second-moment
    bf16: bool = False  # bf16 autocast for the model (math stays float32/64)
    channels_last: bool = False  # NHWC memory format for the model's convolutions
    seed: int = spec(0, ge=0)
    log_every: int = spec(10, ge=1)  # steps between train/* metric logs
    checkpoint_every: int = spec(100, ge=1)  # steps between checkpoints (eval points add more)
    keep_checkpoints: int = spec(2, ge=1)  # newest checkpoints kept in storage
    max_failures: int = spec(1, ge=-1)  # restarts from the last checkpoint; -1: unlimited


@dataclass(frozen=True, kw_only=True)
class BudgetConfig(Section):
    """Training compute, as exactly one of optimizer steps, images seen, or FLOPs."""

    section: ClassVar[str] = "budget"
    steps: int | None = spec(None, gt=0)
    images: int | None = spec(None, gt=0)
    flops: float | None = spec(None, gt=0)  # training FLOPs (3 x forward, Sec. 6)

    def _check(self) -> list[Problem]:
        given = [k for k in BUDGET_KINDS if getattr(self, k) is not None]
        if len(given) == 1:
            return []
        return [("", f"expected exactly one of {list(BUDGET_KINDS)}, got {given or 'none'}")]

    @property
    def kind(self) -> str:
        """Which budget is set: "steps", "images" or "flops"."""
        return next(k for k in BUDGET_KINDS if getattr(self, k) is not None)

    def total_steps(self, global_batch: int, forward_flops_per_image: float | None = None) -> int:
        """Optimizer steps the budget buys (at least 1), rounding up.

        Training FLOPs = 3 x forward FLOPs x images (Nichol & Dhariwal 2021, Sec. 6; the
        backward pass costs about twice the forward, Kaplan et al. 2020).
        """
        if self.steps is not None:
            return self.steps
        if self.images is not None:
            return max(1, -(-self.images // global_batch))
        if not forward_flops_per_image or forward_flops_per_image <= 0:
            raise ValueError("forward_flops_per_image: a flops budget needs it > 0")
        images = self.flops / (3.0 * forward_flops_per_image)
        return max(1, math.ceil(round(images / global_batch, 6)))  # round off float noise


def parse_sampler(item: str) -> tuple[str, str, str | None]:
    """``"100"`` / ``"ddim50"`` / ``"100@fixed_large"`` -> (method, spacing, var_type or None).

    A plain spacing samples ancestrally with strided steps; ``ddimN`` samples with DDIM on the
    ``ddimN`` spacing; ``@fixed_small``/``@fixed_large`` sample a fixed-variance model with
    the other fixed variance (no retraining: L_simple does not depend on it).
    """
    if not isinstance(item, str) or not item:
        raise ValueError(
            f"expected a sampler such as '100', 'ddim50' or '100@fixed_large', got {item!r}"
        )
    spacing, _, var = item.partition("@")
    if var and var not in FIXED_VAR_TYPES:
        raise ValueError(
            f"{item!r}: variance after @ must be one of {list(FIXED_VAR_TYPES)}, got {var!r}"
        )
    method = "ddim" if spacing.startswith("ddim") else "ancestral"
    if not re.fullmatch(r"(ddim)?\d+(,\d+)*", spacing) or (method == "ddim" and var):
        raise ValueError(f"{item!r}: expected '100', '10,15,20', 'ddim50' or '100@fixed_large'")
    return method, spacing, var or None


@dataclass(frozen=True, kw_only=True)
class EvalConfig(Section):
    """What the training loop measures at its eval points (EMA model)."""

    section: ClassVar[str] = "eval"
    num_points: int = spec(4, ge=0)  # eval points evenly spaced in log-compute, plus the end
    nll_images: int = spec(64, ge=1)  # held-out images for bits/dim
    nll_timesteps: int = spec(50, ge=1)  # terms per image of the subset NLL estimate
    full_nll_at_end: bool = False  # all T terms at the end (the paper's number; slow)
    fid_samples: int = spec(64, ge=0)  # samples for FD, precision/recall; 0 disables them
    sample_steps: str = "50"  # strided sampling (Sec. 4): "50", "10,15,20" or "ddim25"
    features: str | None = spec(None, choices=FEATURE_EXTRACTORS)  # null: by dataset
    k: int = spec(3, ge=1)  # k of improved precision/recall
    grid_samples: int = spec(36, ge=0)  # samples in the logged image grid; 0: none
    at_steps: list[int] = field(default_factory=list)  # more eval points: shared cells' budgets
    # FD at the end for each sampler: "100" (ancestral, strided), "ddim50" (DDIM), and
    # "100@fixed_large" (ancestral with another fixed variance; Sec. 4, Fig. 8)
    sampling: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.sample_steps, int) and not isinstance(self.sample_steps, bool):
            object.__setattr__(self, "sample_steps", str(self.sample_steps))  # YAML: 50
        super().__post_init__()

    def _check(self) -> list[Problem]:
        problems: list[Problem] = []
        if 0 < self.fid_samples <= self.k:
            problems.append(
                ("fid_samples", f"expected 0 or more than k={self.k}, got {self.fid_samples}")
            )
        bad = [v for v in self.at_steps if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            problems.append(("at_steps", f"expected positive integers, got {bad}"))
        for item in self.sampling:
            try:
                parse_sampler(item)
            except ValueError as error:
                problems.append(("sampling", str(error)))
        if self.sampling and self.fid_samples == 0:
            problems.append(("sampling", "needs fid_samples > 0"))
        return problems

    def feature_name(self, dataset: str) -> str:
        """The feature extractor: ``features``, else the dataset's default (the digits features
        for the digits, else "inception")."""
        return self.features or default_features(dataset)

    def eval_steps(self, total_steps: int) -> list[int]:
        """Sorted unique steps in [1, total_steps], ending at total_steps.

        ``num_points`` points evenly spaced in log(step) from ~total_steps / EVAL_SPAN (at
        least step 1), the ``at_steps`` up to total_steps, and the end; rounding may merge
        points of short runs.
        """
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps: expected a positive integer, got {total_steps!r}")
        first = max(1.0, total_steps / EVAL_SPAN)
        ratio = (total_steps / first) ** (1.0 / max(1, self.num_points))
        points = {min(total_steps, max(1, round(first * ratio**i))) for i in range(self.num_points)}
        return sorted(points | {s for s in self.at_steps if s <= total_steps} | {total_steps})


@dataclass(frozen=True, kw_only=True)
class ResourcesConfig(Section):
    """Ray Train scaling of one trial."""

    section: ClassVar[str] = "resources"
    num_workers: int = spec(1, ge=1)  # DDP workers
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = spec(1.0, gt=0)  # fractions allowed (Ray resources)


# up to the LAST "@" of the authority, as urlsplit reads it: a password may hold an "@"
_URI_PASSWORD = re.compile(r"(?P<user>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@'\"]*:)[^/\s'\"]+@")


def mask_passwords(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it shown as
    ``***`` (for echoing a ``--set`` item or a URI in a message)."""
    return _URI_PASSWORD.sub(r"\g<user>***@", text)


def _password_problem(key: str, uri: str) -> Problem | None:
    """The problem of a URI that carries a password (``http://user:pw@host``): it would be
    stored in sweep.json, MLflow params and log lines. The message masks it."""
    try:
        secret = urlsplit(uri).password
    except ValueError:
        return None
    if not secret:
        return None
    masked = mask_passwords(uri)
    return key, (
        f"{masked!r} holds a password; give credentials by reference, never in the URI: "
        "MLflow's ~/.mlflow/credentials on every node (MLFLOW_TRACKING_USERNAME may be "
        "set), for S3 an instance role, AWS_PROFILE or AWS_SHARED_CREDENTIALS_FILE"
    )


@dataclass(frozen=True, kw_only=True)
class TrackingConfig(Section):
    """MLflow tracking server and experiment."""

    section: ClassVar[str] = "tracking"
    uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    experiment: str = "diffscale"

    def _check(self) -> list[Problem]:
        empty = [k for k in ("uri", "experiment") if getattr(self, k) == ""]
        problems = [(k, "expected a non-empty string") for k in empty]
        if self.uri and (problem := _password_problem("uri", self.uri)):
            problems.append(problem)
        return problems

    def resolve_uri(self) -> str:
        """The tracking URI; the SQLite default as an absolute path (Ray workers change cwd)."""
        return (
            self.uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or ("sqlite:///" + os.path.abspath(DEFAULT_TRACKING_DB))
        )


@dataclass(frozen=True, kw_only=True)
class StorageConfig(Section):
    """Where Ray Train puts checkpoints: a local directory or s3://bucket/prefix."""

    section: ClassVar[str] = "storage"
    path: str = "./diffscale_runs"
    endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, moto)
    # A local `path` that every node of a cluster mounts at the same place (NFS): lets a
    # multi-node sweep use it instead of s3:// (see orchestrator.sweep.guards).
    shared: bool = False

    def _check(self) -> list[Problem]:
        problem = uri_problem("path", self.path) if self.path else ("path", "expected a path")
        problems = [problem] if problem else []
        for key in ("path", "endpoint_url"):
            value = getattr(self, key)
            if value and (problem := _password_problem(key, value)):
                problems.append(problem)
        return problems

    def resolve_path(self) -> str:
        """An absolute local path (Ray needs one; workers change cwd) or the URI unchanged."""
        return self.path if "://" in self.path else os.path.abspath(self.path)
