"""FLOP accounting for the compute axis of the scaling study.

Nichol & Dhariwal 2021, Sec. 6 (scaling model size, Fig. 10): compute is training FLOPs =
3 x forward FLOPs x images seen, with FLOPs counted as 2 per multiply-add over the
convolutions and matmuls (attention's QK^T and AV included). The forward count is
measured with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device, so even
the 272M-parameter model is counted instantly and without allocating memory.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffusion.unet import UNet, UNetConfig, count_parameters

__all__ = [
    "count_forward_flops",
    "count_parameters",
    "forward_flops_per_image",
    "training_flops",
]


def _resolve_config(model_or_config: nn.Module | UNetConfig) -> UNetConfig:
    if isinstance(model_or_config, UNetConfig):
        return model_or_config
    config = getattr(model_or_config, "config", None)
    if not isinstance(config, UNetConfig):
        raise ValueError(
            "FLOP counting needs a UNetConfig or a model with a UNetConfig `config` "
            f"attribute, got {type(model_or_config).__name__}"
        )
    return config


def count_forward_flops(
    model_or_config: nn.Module | UNetConfig,
    batch_size: int = 1,
    image_size: int | None = None,
) -> int:
    """Forward FLOPs of a batch, 2 per multiply-add, measured by ``FlopCounterMode``.

    Counts convolutions, linear layers and attention matmuls (QK^T and AV), as the
    paper's table does; elementwise ops (norms, activations) count zero. A model is
    counted through its ``config`` (its architecture, not its weights), on the meta
    device. ``image_size`` defaults to the config's.
    """
    config = _resolve_config(model_or_config)
    image_size = config.image_size if image_size is None else image_size
    for name, value in (("batch_size", batch_size), ("image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    with torch.device("meta"):
        model = UNet(config)
        x = torch.zeros(batch_size, config.in_channels, image_size, image_size)  # [N, C, H, W]
        t = torch.zeros(batch_size)  # [N]
        y = None
        if config.num_classes is not None:
            y = torch.zeros(batch_size, dtype=torch.long)  # [N]
    counter = FlopCounterMode(display=False)
    # The math backend writes attention as the two matmuls the counter knows; the fused
    # CPU kernel (_scaled_dot_product_flash_attention_for_cpu) has no FLOP formula.
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x, t, y)
    return int(counter.get_total_flops())


def forward_flops_per_image(
    model_or_config: nn.Module | UNetConfig, image_size: int | None = None
) -> int:
    """Forward FLOPs of one image (a batch of 1), cached per (config, image_size).

    Matches the paper's table (Nichol & Dhariwal 2021, Sec. 6): 20.1/44.9/79.5/178.2 GFLOP
    for the 64x64 models of width 64/96/128/192.
    """
    config = _resolve_config(model_or_config)
    image_size = config.image_size if image_size is None else image_size
    return _forward_flops_per_image_cached(config, image_size)


@functools.cache
def _forward_flops_per_image_cached(config: UNetConfig, image_size: int) -> int:
    return count_forward_flops(config, batch_size=1, image_size=image_size)


def training_flops(forward_flops_per_image: int, images: int) -> int:
    """Training compute: 3 x forward FLOPs x images seen.

    Nichol & Dhariwal 2021, Sec. 6 ("a training step costs 3x the forward", PAPER.md):
    the backward pass costs about twice the forward (Kaplan et al. 2020).
    """
    if forward_flops_per_image < 0 or images < 0:
        raise ValueError(
            "training_flops needs non-negative forward_flops_per_image and images, got "
            f"{forward_flops_per_image!r} and {images!r}"
        )
    return 3 * forward_flops_per_image * images
