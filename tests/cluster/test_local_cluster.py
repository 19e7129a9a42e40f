"""cluster/local.sh really starts a head with no CPUs and N one-CPU worker nodes, and stops them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "local.sh"

PROBE = """
import json, ray
ray.init(address="auto", log_to_driver=False)
nodes = [n for n in ray.nodes() if n["Alive"]]
print("PROBE " + json.dumps({
    "alive": len(nodes),
    "cpus": ray.cluster_resources().get("CPU", 0),
    "per_node": sorted(n["Resources"].get("CPU", 0) for n in nodes),
}))
"""


def _sessions_alive(sids: list[int]) -> list[int]:
    out = subprocess.run(["ps", "-eo", "sid=,stat="], capture_output=True, text=True).stdout
    live = {
        int(s) for s, st in (line.split() for line in out.splitlines()) if not st.startswith("Z")
    }
    return [s for s in sids if s in live]


def test_up_status_down() -> None:
    state = Path(tempfile.mkdtemp(prefix="dslc-", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, "DIFFSCALE_LOCAL_CLUSTER": str(state)}
    env.pop("RAY_ADDRESS", None)

    def sh(*args: str, timeout: int = 150) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
        )

    try:
        up = sh("up", "2", timeout=600)  # the script itself waits up to 180 s per step
        assert up.returncode == 0, up.stdout + up.stderr
        line = re.search(r"^export (RAY_ADDRESS=.*)$", up.stdout, re.M)
        assert line, up.stdout
        client = dict(kv.split("=", 1) for kv in line[1].split())
        assert client["RAY_AUTH_MODE"] == "token"
        sids = [int(s) for s in (state / "sessions").read_text().split()]
        assert len(sids) == 3 and len(_sessions_alive(sids)) == 3

        probe = subprocess.run(
            [sys.executable, "-c", PROBE],
            capture_output=True,
            text=True,
            env={**env, **client},
            timeout=120,
        )
        found = re.search(r"^PROBE (.*)$", probe.stdout, re.M)
        assert found, probe.stdout + probe.stderr
        got = json.loads(found[1])
        assert got == {"alive": 3, "cpus": 2.0, "per_node": [0.0, 1.0, 1.0]}

        status = sh("status", timeout=60)
        assert status.returncode == 0, status.stderr
        assert client["RAY_ADDRESS"] in status.stdout
        assert status.stdout.count(" node_") == 3
        assert "0.0/2.0 CPU" in status.stdout

        again = sh("up", "1", timeout=30)  # a second cluster in the same dir is refused
        assert again.returncode == 2 and "already running" in again.stderr
    finally:
        down = sh("down", timeout=90)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped 3 node(s)" in down.stdout
    assert _sessions_alive(sids) == []
    assert sh("status", timeout=30).returncode == 1
    shutil.rmtree(state, ignore_errors=True)


def test_too_long_state_dir_is_refused_before_anything_starts(tmp_path) -> None:
    state = tmp_path / ("x" * 40)
    out = subprocess.run(
        ["bash", str(SCRIPT), "up", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, "DIFFSCALE_LOCAL_CLUSTER": str(state)},
        timeout=30,
    )
    assert out.returncode == 2 and "too long for Ray's socket paths" in out.stderr
    assert not state.exists()
