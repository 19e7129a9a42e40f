"""A sweep's folder in storage, ``{storage.path}/{name}/`` (a local directory or s3://).

Everything a later command needs lives there (file names from :mod:`orchestrator.names`):

- ``sweep.json``: the sweep file's text and overrides, the MLflow parent run id;
- ``state/{trial}.json``: per trial, its status (RUNNING, FINISHED, ERROR), progress
  (step of total) and latest metrics, written by the driver as results arrive and by the
  trainable when a trial ends, so a finished trial is never trained again;
- ``driver.json``: the driver's host, pid, heartbeat and end state;
- ``cancel``: written by ``diffscale cancel``; the driver stops gracefully when it sees it;
- ``tune/``: Ray Tune's experiment state (restored by ``resume``); ``trials/{trial}/``:
  each trial's Ray Train run and checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from diffusion.data import storage
from orchestrator.names import (
    SWEEP_DRIVER,
    SWEEP_RECORD,
    SWEEP_STATE_DIR,
    checkpoint_dir_name,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_STORAGE",
    "HEARTBEAT_S",
    "STALE_S",
    "SweepError",
    "SweepStore",
    "cell_checkpoint",
    "driver_alive",
    "store_for",
    "stored_record",
]

HEARTBEAT_S = 10.0  # the driver refreshes driver.json this often
STALE_S = 90.0  # a heartbeat older than this means the driver is gone
DEFAULT_STORAGE = "./diffscale_runs"  # without --storage or $DIFFSCALE_STORAGE


class SweepError(RuntimeError):
    """A sweep cannot be submitted, resumed, cancelled or found."""


class SweepStore:
    """The sweep's folder in storage (local or S3), read and written as small JSON files."""

    def __init__(self, root_uri: str, endpoint_url: str | None = None) -> None:
        self.uri = root_uri.rstrip("/")
        self.endpoint_url = endpoint_url
        self.fs, self.root = storage.resolve(self.uri, endpoint_url=endpoint_url)

    def _path(self, name: str) -> str:
        return storage.join(self.root, name)

    def read(self, name: str) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.fs, self._path(name)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.warning("unreadable %s/%s: %s", self.uri, name, error)
            return None

    def write(self, name: str, data: dict) -> None:
        storage.write_bytes(self.fs, self._path(name), json.dumps(data, indent=1).encode())

    def delete(self, name: str) -> None:
        storage.delete(self.fs, self._path(name))

    def exists(self, name: str) -> bool:
        return storage.exists(self.fs, self._path(name))

    def trial_state(self, trial: str) -> dict:
        return self.read(f"{SWEEP_STATE_DIR}/{trial}.json") or {}

    def update_trial(self, trial: str, **fields: Any) -> dict:
        state = {**self.trial_state(trial), **fields, "updated": time.time()}
        self.write(f"{SWEEP_STATE_DIR}/{trial}.json", state)
        return state

    def driver(self) -> dict:
        """The driver's record (driver.json); empty if the sweep never ran."""
        return self.read(SWEEP_DRIVER) or {}

    def beat(self, state: str, **extra: Any) -> None:
        """Refresh driver.json: this process's host, pid, ``state`` and a heartbeat."""
        record = self.driver()
        record.update(
            host=socket.gethostname(), pid=os.getpid(), state=state, heartbeat=time.time(), **extra
        )
        self.write(SWEEP_DRIVER, record)


def store_for(
    name: str, storage_path: str | None = None, endpoint_url: str | None = None
) -> SweepStore:
    """The store of sweep ``name`` under ``storage_path`` (default ./diffscale_runs)."""
    base = storage_path or os.environ.get("DIFFSCALE_STORAGE") or DEFAULT_STORAGE
    if "://" not in base:
        base = os.path.abspath(base)
    return SweepStore(base.rstrip("/") + "/" + name, endpoint_url)


def stored_record(store: SweepStore) -> dict:
    """The sweep's sweep.json: the file as submitted, its overrides, trials and run ids."""
    record = store.read(SWEEP_RECORD)
    if record is None:
        raise SweepError(
            f"no sweep at {store.uri} (no {SWEEP_RECORD}): submit it first, or pass "
            f"--storage where it was submitted"
        )
    return record


def driver_alive(driver: dict) -> bool:
    """Whether the driver of a driver.json record still runs: its pid on this host, else a
    fresh heartbeat."""
    if driver.get("host") == socket.gethostname() and driver.get("pid"):
        try:
            os.kill(int(driver["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return time.time() - driver.get("heartbeat", 0) < STALE_S * 10
    return time.time() - driver.get("heartbeat", 0) < STALE_S


def cell_checkpoint(store: SweepStore, cell: str) -> tuple[str, int, str, dict]:
    """(trial, step, checkpoint URI, trial config) of grid cell ``cell`` of the sweep in
    ``store``: the checkpoint its trial wrote at the cell's step (kept whatever
    ``keep_checkpoints`` says). SweepError naming the cells when ``cell`` is not one."""
    record = stored_record(store)
    cells = {}
    for trial, info in record.get("trials", {}).items():
        for cell_id, step in info.get("cells", {}).items():
            cells[cell_id] = (trial, int(step), info["config"])
    if cell not in cells:
        raise SweepError(
            f"sweep {record.get('name', store.uri)!r} has no cell {cell!r}; its cells: "
            f"{', '.join(sorted(cells))} (`diffscale submit FILE --dry-run` shows them)"
        )
    trial, step, config = cells[cell]
    uri = f"{config['storage']['path'].rstrip('/')}/{trial}/{checkpoint_dir_name(step)}"
    return trial, step, uri, config
