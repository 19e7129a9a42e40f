"""Checkpoint discovery and retention: the newest checkpoint of a trial's Ray Train run
that verifies, and which checkpoints Ray keeps.

Ray hands a restarted worker its latest registered checkpoint; when that one is corrupt
(a truncated upload, a lost file) the trial continues from the newest older one that
verifies instead of failing, and from scratch when none does.

Retention: the checkpoint at each grid cell's step (``eval.at_steps`` and the final step)
is *pinned*: it is kept whatever ``train.keep_checkpoints`` says, which governs only the
rolling checkpoints in between. Ray's own ``CheckpointConfig`` does the deleting (so its
state never lists a folder that is gone, and the latest checkpoint is never deleted):
every report carries :func:`checkpoint_score`, which ranks a pinned checkpoint above every
rolling one, and :func:`checkpoints_to_keep` is the number of pinned ones plus
``keep_checkpoints``, so only the oldest rolling ones ever fall out.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from orchestrator.checkpoint import CheckpointError, verify_rank_manifests
from orchestrator.names import CHECKPOINT_META, CHECKPOINT_PREFIX

log = logging.getLogger(__name__)

__all__ = ["checkpoint_score", "checkpoints_to_keep", "newest_valid_checkpoint", "pinned_steps"]

PINNED_SCORE = 1e15  # above any step: a pinned checkpoint outranks every rolling one


def pinned_steps(at_steps: list[int], total_steps: int) -> set[int]:
    """The steps whose checkpoints are never deleted: the grid cells' steps a trial serves
    (``eval.at_steps`` up to ``total_steps``) and its final step."""
    return {s for s in at_steps if s <= total_steps} | {total_steps}


def checkpoints_to_keep(at_steps: list[int], total_steps: int, keep_rolling: int) -> int:
    """Ray's ``num_to_keep``: every pinned checkpoint plus ``keep_rolling`` newest others."""
    return len(pinned_steps(at_steps, total_steps)) + keep_rolling


def checkpoint_score(step: int, pinned: bool) -> float:
    """The score Ray ranks a checkpoint by (higher is kept): its step, plus PINNED_SCORE
    when it is a cell's; so the rolling ones go oldest first and the pinned never."""
    return float(step) + (PINNED_SCORE if pinned else 0.0)


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
