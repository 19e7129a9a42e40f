"""Sweep files for the tests of loading, validation and grid expansion: a small grid, the
bundled sweeps, and tiny prepared datasets of any image shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from diffusion.data import storage
from diffusion.data.registry import builtin_dataset
from diffusion.data.shards import Manifest, write_manifest, write_split

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"
BUNDLED = sorted(p.name for p in SWEEPS.glob("*.yaml"))

SMALL = {
    "name": "g",
    "model": {"name": "digits-xs"},
    "diffusion": {"num_timesteps": 100},
    "train": {"batch_size": 32},
    "eval": {"num_points": 1, "fid_samples": 16, "sample_steps": "10"},
    "grid": {"model.name": ["digits-xs", "digits-s"], "budget.steps": [10, 20, 40]},
}


def write(tmp_path: Path, d: dict | str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(d if isinstance(d, str) else yaml.safe_dump(d, sort_keys=False))
    return path


def fake_dataset(root: Path, shape: tuple[int, int, int], splits=("train", "test")) -> str:
    """A tiny prepared dataset (random uint8 images) in the Parquet shard format."""
    fs, path = storage.resolve(str(root))
    rng = np.random.default_rng(0)
    infos = {}
    for split in splits:
        images = rng.integers(0, 256, (8, *shape), dtype=np.uint8)
        infos[split] = write_split(fs, path, "fake", split, shape, [(images, np.zeros(8))])
    write_manifest(fs, path, Manifest(dataset="fake", splits=infos))
    return str(root)


def bundled_overrides(name: str, tmp_path: Path) -> list[str]:
    """Point a bundled sweep at a fake prepared dataset of the right shape."""
    d = yaml.safe_load((SWEEPS / name).read_text())
    dataset = d.get("data", {}).get("dataset", "digits")
    if builtin_dataset(dataset):
        return []
    size = 64 if "imagenet64" in name else 32
    splits = (d["data"].get("train_split", "train"), d["data"].get("eval_split", "test"))
    return [f"data.dataset={fake_dataset(tmp_path / 'data', (3, size, size), splits)}"]
