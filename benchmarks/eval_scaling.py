"""Sharded evaluation: one eval point of the demo model on 1 and 2 Ray Train workers (not a
test).

The eval point is the demo sweep's (``sweeps/demo.yaml``: `digits-xs`, cosine T=1000,
L_hybrid; 128 held-out images x 20 stratified NLL terms, 128 samples x 25 strided steps,
digits-feature FD and precision/recall, a 36-sample grid) on a fixed, seeded, perturbed
model (timing does not depend on training; the metrics are non-trivial). Each worker runs
:func:`orchestrator.evaluate.evaluate_trial` with one torch thread (``cpus_per_worker: 1``),
the way a trial's ranks do; ``seconds`` is measured inside the workers around the eval
point alone (Ray start-up, process group and model build excluded; the gather of the
results included). The 1- and 2-worker runs alternate for ``--rounds`` rounds (machine
noise hits both alike); the ratio is of the medians. Every metric must be equal.

    python benchmarks/eval_scaling.py [--rounds 2]  -> benchmarks/results/eval_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from diffusion.metrics import get_feature_extractor
from diffusion.unet import UNet
from orchestrator.config import TrialConfig
from orchestrator.evaluate import evaluate_trial

RESULTS = Path(__file__).parent / "results"
DEMO = Path(__file__).parent.parent / "sweeps" / "demo.yaml"
GOAL = 0.6  # 2-worker time / 1-worker time, on 2 cores
STEP = 100  # the eval point's step (seeds its samples)


def demo_config() -> TrialConfig:
    """The demo sweep's base trial (its first size), budget = the eval point's step."""
    doc = yaml.safe_load(DEMO.read_text())
    base = {k: doc[k] for k in ("data", "model", "diffusion", "train", "eval")}
    return TrialConfig.from_dict({**base, "name": "eval-scaling", "budget": {"steps": STEP}})


def demo_model(cfg: TrialConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = UNet(cfg.model_config())
    with torch.no_grad():  # off the zero-initialised output layer: non-trivial samples
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def eval_point_worker(config: dict) -> None:
    """One Ray Train worker: time the eval point; rank 0 writes the result file."""
    import ray.train

    torch.set_num_threads(1)
    cfg = TrialConfig.from_dict(config["cfg"])
    model, diffusion = demo_model(cfg), cfg.diffusion.build()
    started = time.perf_counter()
    result = evaluate_trial(cfg, diffusion, model, torch.device("cpu"), step=STEP, final=False)
    seconds = time.perf_counter() - started
    if ray.train.get_context().get_world_rank() == 0:
        doc = {"seconds": seconds, "metrics": result.metrics, "forwards": result.model_forwards}
        Path(config["out"]).write_text(json.dumps(doc))
    ray.train.report({"seconds": seconds})


def run(cfg: TrialConfig, workers: int, out: Path) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        eval_point_worker,
        train_loop_config={"cfg": cfg.to_dict(), "out": str(out)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, resources_per_worker={"CPU": 1}
        ),
        run_config=ray.train.RunConfig(
            name=f"eval-scaling-{workers}", storage_path=str(out.parent / "ray")
        ),
    )
    trainer.fit()
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cfg = demo_config()
    get_feature_extractor(cfg.eval.feature_name(cfg.data.dataset))  # cached before timing
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    try:
        with tempfile.TemporaryDirectory(prefix="eval-scaling-") as tmp:
            for r in range(args.rounds):
                for workers in (1, 2):
                    doc = run(cfg, workers, Path(tmp) / f"w{workers}_r{r}.json")
                    runs[workers].append(doc)
                    print(f"round {r}: {workers} worker(s): {doc['seconds']:.2f} s", flush=True)
    finally:
        ray.shutdown()
    seconds = {w: [d["seconds"] for d in docs] for w, docs in runs.items()}
    median = {w: statistics.median(s) for w, s in seconds.items()}
    reference = runs[1][0]["metrics"]
    equal = all(d["metrics"] == reference for docs in runs.values() for d in docs)
    ratio = median[2] / median[1]
    result = {
        "what": "one eval point of the demo model (sweeps/demo.yaml eval section), "
        "1 vs 2 Ray Train workers, 1 torch thread each",
        "model": cfg.model.name,
        "eval": {
            "nll_images": cfg.eval.nll_images,
            "nll_timesteps": cfg.eval.nll_timesteps,
            "fid_samples": cfg.eval.fid_samples,
            "sample_steps": cfg.eval.sample_steps,
            "grid_samples": cfg.eval.grid_samples,
            "num_timesteps": cfg.diffusion.num_timesteps,
        },
        "model_forwards": runs[1][0]["forwards"],
        "seconds_1_worker": seconds[1],
        "seconds_2_workers": seconds[2],
        "median_seconds_1_worker": median[1],
        "median_seconds_2_workers": median[2],
        "ratio_2_vs_1": ratio,
        "goal_ratio": GOAL,
        "meets_goal": ratio <= GOAL,
        "metrics_equal": equal,
        "metrics": reference,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "load_average_1m_at_end": os.getloadavg()[0],
        "machine": platform.machine(),
        "torch": torch.__version__,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ratio_2_vs_1", "metrics_equal")}))
    if not equal:
        raise SystemExit("the metrics of 1 and 2 workers differ")


if __name__ == "__main__":
    main()
