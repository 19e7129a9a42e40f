"""The CPU demo: train a small UNet on the built-in digits for a fixed wall-clock budget,
then report held-out bits/dim before and after, and write a grid of strided samples.

It runs with nothing but the package (no Ray, no MLflow, no network) so a new machine can
check the whole diffusion stack in about three minutes: ``make demo`` / ``diffscale demo``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion.config import DiffusionConfig
from diffusion.data import get_dataset
from diffusion.flops import forward_flops_per_image, training_flops
from diffusion.images import save_image_grid, to_model_range
from diffusion.likelihood import calc_bpd
from diffusion.sampling import sample
from diffusion.timesteps import create_sampler
from diffusion.training import EMA, make_optimizer, train_step
from diffusion.unet import build_model, count_parameters, get_model_config
from orchestrator.checkpoint import save_checkpoint
from orchestrator.names import DEMO_CHECKPOINT_DIR, DEMO_RESULT_FILE, EVAL_SAMPLES_FILE

log = logging.getLogger(__name__)

DEMO_DATASET = "digits"  # built in: no network, no preparation


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo run (defaults: about 2 minutes of training on 2 cores)."""

    model: str = "digits-xs"
    seconds: float = 120.0  # training wall-clock budget
    max_steps: int | None = None  # optional cap on optimizer steps (tests use it)
    batch_size: int = 64
    lr: float = 1e-3
    ema_rate: float = 0.995
    schedule: str = "cosine"
    num_timesteps: int = 1000
    objective: str = "hybrid"
    timestep_sampler: str = "uniform"
    eval_images: int = 32  # held-out test images for the full-bound bits/dim
    sample_steps: str = "100"  # strided sampling (Sec. 4)
    num_samples: int = 64
    seed: int = 0
    threads: int | None = None


def run_demo(config: DemoConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train, evaluate and sample; writes ``samples.png``, ``result.json`` and
    ``checkpoint/`` to ``out_dir``.

    Returns the result dictionary (bits/dim before and after, steps, images/s, paths).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    model_config = get_model_config(config.model)
    model = build_model(model_config)
    diffusion_config = DiffusionConfig(
        schedule=config.schedule,
        num_timesteps=config.num_timesteps,
        objective=config.objective,
        rescale_timesteps=True,
    )
    diffusion = diffusion_config.build()
    sampler = create_sampler(config.timestep_sampler, diffusion.num_timesteps)
    optimizer = make_optimizer(model.parameters(), lr=config.lr)
    ema = EMA(model, config.ema_rate)

    dataset = get_dataset(DEMO_DATASET)
    train = to_model_range(dataset.load_split("train"))
    test = to_model_range(dataset.load_split("test")[: config.eval_images])

    def bits_per_dim(net: torch.nn.Module) -> float:
        # The same noise before and after training: the difference is the model's alone.
        g = torch.Generator().manual_seed(config.seed + 1)
        net.eval()
        result = calc_bpd(diffusion, net, test, generator=g, timesteps_per_batch=50)
        return float(result.total_bpd.mean())

    log.info("model %s: %d parameters", config.model, count_parameters(model))
    bpd_before = bits_per_dim(model)

    steps, images, start = 0, 0, time.perf_counter()
    bar = tqdm(total=round(config.seconds), unit="s", desc="training", disable=not progress)
    losses: list[float] = []
    while time.perf_counter() - start < config.seconds and (
        config.max_steps is None or steps < config.max_steps
    ):
        idx = torch.randint(0, len(train), (config.batch_size,), generator=generator)
        model.train()
        terms = train_step(
            model, diffusion, sampler, optimizer, train[idx], generator=generator, ema=ema
        )
        steps += 1
        images += config.batch_size
        losses.append(float(terms["objective"]))
        elapsed = time.perf_counter() - start
        bar.n = min(round(elapsed), bar.total)
        bar.set_postfix(
            step=steps, loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False
        )
    bar.close()
    train_seconds = time.perf_counter() - start

    bpd_after = bits_per_dim(ema.module)
    samples = sample(
        diffusion,
        ema.module,
        (config.num_samples, *test.shape[1:]),
        steps=config.sample_steps,
        generator=torch.Generator().manual_seed(config.seed + 2),
    )
    grid_path = save_image_grid(samples, out / EVAL_SAMPLES_FILE, scale=4)
    checkpoint = save_checkpoint(
        out / DEMO_CHECKPOINT_DIR,
        {"model": model.state_dict(), "ema": ema.state_dict()},
        {
            "model": model_config.to_dict(),
            "diffusion": diffusion_config.to_dict(),
            "data": {"dataset": dataset.name},
            "step": steps,
            "images_seen": images,
        },
    )

    fwd = forward_flops_per_image(model_config)
    result = {
        "config": asdict(config),
        "params": count_parameters(model),
        "steps": steps,
        "images_seen": images,
        "train_seconds": train_seconds,
        "images_per_s": images / train_seconds,
        "training_flops": training_flops(fwd, images),
        "final_loss_avg50": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "bpd_before": bpd_before,
        "bpd_after": bpd_after,
        "bpd_kind": f"full bound, T={diffusion.num_timesteps}, {len(test)} held-out images",
        "samples_png": str(grid_path),
        "checkpoint": str(checkpoint),
    }
    (out / DEMO_RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result
