"""Checkpoint discovery: the newest checkpoint of a trial's Ray Train run that verifies.

Ray hands a restarted worker its latest registered checkpoint; when that one is corrupt
(a truncated upload, a lost file) the trial continues from the newest older one that
verifies instead of failing, and from scratch when none does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from orchestrator.checkpoint import CheckpointError, verify_rank_manifests
from orchestrator.names import CHECKPOINT_META, CHECKPOINT_PREFIX

log = logging.getLogger(__name__)

__all__ = ["newest_valid_checkpoint"]


def newest_valid_checkpoint(world_size: int, scratch: Path) -> Path | None:
    """The local copy (under ``scratch``) of the newest checkpoint whose ``world_size``
    rank manifests all verify and whose meta reads; None when there is none (a new trial,
    or every candidate corrupt). A corrupt newer checkpoint is skipped with a warning."""
    import pyarrow.fs as pafs
    import ray.train

    latest = ray.train.get_checkpoint()
    if latest is None:
        return None
    fs = latest.filesystem
    parent = latest.path.rstrip("/").rsplit("/", 1)[0]
    infos = fs.get_file_info(pafs.FileSelector(parent))
    candidates = sorted(
        (
            i.path
            for i in infos
            if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)
        ),
        reverse=True,
    )
    if latest.path not in candidates:
        candidates.insert(0, latest.path)
    for path in candidates:
        local = scratch / Path(path).name
        try:
            ray.train.Checkpoint(path=path, filesystem=fs).to_directory(str(local))
            verify_rank_manifests(local, world_size)
            json.loads((local / CHECKPOINT_META).read_text())
        except (OSError, ValueError, CheckpointError) as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
            continue
        if path != latest.path:
            log.warning("restoring from %s instead of the newest %s", path, latest.path)
        return local
    log.warning("no valid checkpoint among %d candidates: starting from scratch", len(candidates))
    return None
