"""Checkpoint directories: tensors in ``*.pt`` files, metadata in ``meta.json``, and a
``manifest.json`` with a SHA-256 per file, written last.

A checkpoint is built under a temporary name and renamed into place, so a crash never
leaves a half checkpoint that looks whole; a reader verifies every checksum and refuses
a directory whose manifest is missing or whose files do not match it. Tensors are read
back with ``torch.load(weights_only=True)``.

Every checkpoint that :func:`load_model_checkpoint` can evaluate holds ``model.pt`` and
``ema.pt`` (state dicts of the UNet and its EMA) and, in ``meta.json``, the model and
diffusion configs under "model" and "diffusion".
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

from diffusion.gaussian import DiffusionConfig, GaussianDiffusion
from diffusion.unet import UNet, UNetConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
META = "meta.json"
FORMAT_VERSION = 1

__all__ = [
    "CheckpointError",
    "ModelCheckpoint",
    "load_checkpoint",
    "load_model_checkpoint",
    "save_checkpoint",
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
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        files[META] = None
        manifest = {
            "format_version": FORMAT_VERSION,
            "files": {
                name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                for name in sorted(files)
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
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
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MANIFEST})")
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
    meta = json.loads((path / META).read_text())
    tensors = {
        name[: -len(".pt")]: torch.load(path / name, map_location="cpu", weights_only=True)
        for name in files
        if name.endswith(".pt")
    }
    return tensors, meta


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
    """Rebuild the model, its EMA and the diffusion process of a checkpoint (eval mode)."""
    tensors, meta = load_checkpoint(path)
    for key in ("model", "diffusion"):
        if key not in meta:
            raise CheckpointError(f"{path}: {META} has no {key!r} config")
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
