"""Checkpoint directories: tensors in ``*.pt`` files, metadata in ``meta.json``, and
SHA-256 manifests, in one of two layouts:

* single writer (:func:`save_checkpoint`, e.g. the demo): ``model.pt``, ``ema.pt`` and one
  ``manifest.json`` written last;
* one writer per DDP rank (Ray Train trials, :func:`write_rank_files`): rank 0 writes
  ``trainer_state.pt`` (model, EMA, optimizer, sampler, data position) and ``meta.json``,
  every rank its ``rng_rank{r}.pt``, and each its own ``manifest_rank{r}.json``.


A checkpoint is built under a temporary name and renamed into place, so a crash never
leaves a half checkpoint that looks whole; a reader verifies every checksum and refuses
a directory whose manifest is missing or whose files do not match it. Tensors are read
back with ``torch.load(weights_only=True)``.

:func:`load_model_checkpoint` evaluates either layout: both keep the model and diffusion
configs in ``meta.json`` under "model" and "diffusion".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusion.config import DiffusionConfig
from diffusion.gaussian import GaussianDiffusion
from diffusion.unet import UNet, UNetConfig
from orchestrator.names import (
    CHECKPOINT_MANIFEST,
    CHECKPOINT_META,
    CHECKPOINT_RANK_MANIFEST,
    CHECKPOINT_STATE,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

__all__ = [
    "CheckpointError",
    "ModelCheckpoint",
    "load_checkpoint",
    "load_model_checkpoint",
    "save_checkpoint",
    "sha256_file",
    "verify_rank_manifests",
    "write_rank_files",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def save_checkpoint(path: str | Path, tensors: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` (name -> object saved as ``name.pt``) and ``meta`` atomically.

    An existing checkpoint at ``path`` is replaced only once the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        files = {}
        for name, obj in tensors.items():
            torch.save(obj, tmp / f"{name}.pt")
            files[f"{name}.pt"] = None
        (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        files[CHECKPOINT_META] = None
        manifest = {
            "format_version": FORMAT_VERSION,
            "files": {
                name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                for name in sorted(files)
            },
        }
        (tmp / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_dir(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote checkpoint %s", path)
    return path


def load_checkpoint(path: str | Path, verify: bool = True) -> tuple[dict[str, Any], dict]:
    """(tensors by name, meta) of a checkpoint, after checking it against its manifest."""
    path = Path(path)
    manifest_path = path / CHECKPOINT_MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {CHECKPOINT_MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is listed in the manifest but missing")
        if verify and sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch (truncated or corrupt)")
    meta = json.loads((path / CHECKPOINT_META).read_text())
    tensors = {
        name[: -len(".pt")]: torch.load(path / name, map_location="cpu", weights_only=True)
        for name in files
        if name.endswith(".pt")
    }
    return tensors, meta


def write_rank_files(directory: Path, rank: int, files: dict[str, Any]) -> None:
    """Save one rank's ``files`` (name -> object: JSON for ``.json``, else torch.save) and
    that rank's manifest; Ray merges every rank's files into one checkpoint directory."""
    entries = {}
    for name, obj in files.items():
        path = directory / name
        if name.endswith(".json"):
            path.write_text(json.dumps(obj, indent=2, sort_keys=True))
        else:
            torch.save(obj, path)
        entries[name] = sha256_file(path)
    (directory / CHECKPOINT_RANK_MANIFEST.format(rank=rank)).write_text(
        json.dumps(entries, indent=2)
    )


def verify_rank_manifests(directory: Path, world_size: int) -> None:
    """Raise CheckpointError unless every rank's manifest is there and every file matches."""
    for rank in range(world_size):
        manifest = directory / CHECKPOINT_RANK_MANIFEST.format(rank=rank)
        if not manifest.is_file():
            raise CheckpointError(f"{directory}: no {manifest.name} (incomplete checkpoint)")
        for name, digest in json.loads(manifest.read_text()).items():
            path = directory / name
            if not path.is_file() or sha256_file(path) != digest:
                raise CheckpointError(f"{directory}: {name} is missing or corrupt")


@dataclass
class ModelCheckpoint:
    """A trained model ready for evaluation: the UNet, its EMA and the process."""

    model: UNet
    ema_model: UNet
    diffusion: GaussianDiffusion
    model_config: UNetConfig
    diffusion_config: DiffusionConfig
    meta: dict[str, Any]


def load_model_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> ModelCheckpoint:
    """Rebuild the model, its EMA and the diffusion process of a checkpoint (eval mode),
    in either layout."""
    path = Path(path)
    if (path / CHECKPOINT_RANK_MANIFEST.format(rank=0)).is_file():
        meta = json.loads((path / CHECKPOINT_META).read_text())
        verify_rank_manifests(path, int(meta.get("world_size", 1)))
        tensors = torch.load(path / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
    else:
        tensors, meta = load_checkpoint(path)
    for key in ("model", "diffusion"):
        if key not in meta:
            raise CheckpointError(f"{path}: {CHECKPOINT_META} has no {key!r} config")
    for key in ("model", "ema"):
        if key not in tensors:
            raise CheckpointError(f"{path}: no {key}.pt")
    model_config = UNetConfig.from_dict(meta["model"])
    diffusion_config = DiffusionConfig.from_dict(meta["diffusion"])
    model, ema_model = UNet(model_config), UNet(model_config)
    model.load_state_dict(tensors["model"])
    ema_model.load_state_dict(tensors["ema"])
    return ModelCheckpoint(
        model=model.to(device).eval(),
        ema_model=ema_model.to(device).eval(),
        diffusion=diffusion_config.build(),
        model_config=model_config,
        diffusion_config=diffusion_config,
        meta=meta,
    )


def sha256_file(file: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    for file in directory.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
