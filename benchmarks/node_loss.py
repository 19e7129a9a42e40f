"""Recovery after a lost worker node, on a real multi-node cluster on this machine (not a test).

Runs tests/cluster/test_cluster_job.py (``cluster/local.sh up 2``: a 0-CPU head and two
1-CPU worker nodes; PostgreSQL + ``cluster/mlflow-server.sh`` with artifacts in moto S3;
``ray job submit -- diffscale submit`` of a trial with two DDP workers, one per node). After
the trial has logged more than two checkpoints (every 8 steps) one worker node is SIGKILLed
and a replacement joins. The figures are the test's own measurements:

- seconds_kill_to_first_new_step: from the SIGKILL to the first step past the highest one
  logged before it (Ray's health check marking the node dead, Train restarting both
  workers from the last checkpoint on the new node set, recomputing the lost steps);
- seconds_kill_to_replacement_joined: how long ``local.sh add`` took to start the new node;
- recomputed_steps: steps logged before the kill that were done again (from the last
  checkpoint Ray Train had persisted); each is logged to MLflow once all the same.

Writes JSON (default benchmarks/results/node_loss.json) with the machine's description.

    flock /tmp/ray.lock .venv/bin/python benchmarks/node_loss.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "node_loss.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "figures.json"
        env = {**os.environ, "DIFFSCALE_NODE_LOSS_JSON": str(figures)}
        test = "tests/cluster/test_cluster_job.py"  # the whole module: one cluster, one job
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", test], cwd=ROOT, env=env)
        wall = time.monotonic() - t0
        if done.returncode != 0 or not figures.exists():
            print(
                f"node_loss: the test failed (exit {done.returncode}); no figures", file=sys.stderr
            )
            return 1
        result = json.loads(figures.read_text())
    result.update(
        test_wall_seconds=round(wall, 1),
        machine=platform.machine(),
        cpus=os.cpu_count(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        date=time.strftime("%Y-%m-%d"),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
