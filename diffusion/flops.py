"""FLOP accounting for the compute axis of the scaling study.

Nichol & Dhariwal 2021, Sec. 6 (scaling model size, Fig. 10): compute is training FLOPs =
3 x forward FLOPs x images seen, with FLOPs counted as 2 per multiply-add over the
convolutions and matmuls (attention's QK^T and AV included). The forward count is
measured with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device, so even
the 272M-parameter model is counted instantly and without allocating memory.

Evaluation is counted the same way, from its parts (``orchestrator.cost`` adds them up for an
eval point): one model forward per sample per sampling step (:func:`sampling_forwards`),
one forward per NLL term of an image (the prior term L_T is closed-form and needs none), and
the feature network once per image (:func:`feature_flops_per_image`: FID Inception at
299 x 299 up to pool3, or the digits classifier up to its features), each measured on the
meta device from the architecture alone, no weights file needed, and the distance matrices of
improved precision/recall (:func:`precision_recall_flops`). The Frechet distance's float64
covariances and matrix square root (NumPy/SciPy, O(N D^2 + D^3)) are not counted.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffusion.metrics.digits_features import DigitsClassifier
from diffusion.metrics.inception import build_fid_inception
from diffusion.metrics.registry import FEATURE_EXTRACTORS
from diffusion.schedules import space_timesteps
from diffusion.unet import UNet, UNetConfig, count_parameters

__all__ = [
    "FEATURE_INPUTS",
    "count_forward_flops",
    "count_parameters",
    "feature_dim",
    "feature_flops_per_image",
    "forward_flops_per_image",
    "precision_recall_flops",
    "sampling_forwards",
    "training_flops",
]

# The input [C, H, W] of each feature network, whatever the images' size: pytorch-fid
# resizes to 299 x 299 (grey is replicated to RGB: same FLOPs), the digits classifier takes 8x8.
FEATURE_INPUTS = {"inception": (3, 299, 299), "digits": (1, 8, 8)}


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


def sampling_forwards(num_timesteps: int, spacing: str) -> int:
    """Model forwards per sample of a sampler: one per step of the respaced process
    (``space_timesteps(T, "100")`` -> 100; ``"ddim50"`` -> 50; ``"10,15,20"`` -> 45), for
    ancestral and DDIM steps alike (Nichol & Dhariwal 2021, Sec. 4)."""
    return len(space_timesteps(num_timesteps, spacing))


def feature_flops_per_image(name: str) -> int:
    """Forward FLOPs of one image through a feature network (2 per multiply-add, counted as
    :func:`count_forward_flops` counts; the resize to the network's input counts zero).

    ``"inception"``: pytorch-fid's FID Inception v3 at 299 x 299 up to its pool3 features
    (the whole network minus its final 2048 -> 1008 classifier), ~11.4 GFLOP;
    ``"digits"``: the digits classifier up to its 128-d features, ~0.74 MFLOP. Built on the
    meta device from the architecture (random init, no weights file), cached per name.
    """
    if name not in FEATURE_INPUTS:
        raise ValueError(f"feature network: got {name!r}; allowed values: {list(FEATURE_INPUTS)}")
    return _feature_flops_cached(name)


@functools.cache
def _feature_flops_cached(name: str) -> int:
    counter = FlopCounterMode(display=False)
    with torch.device("meta"):
        x = torch.zeros(1, *FEATURE_INPUTS[name])  # [1, C, H, W]
        if name == "inception":
            net = build_fid_inception().eval()
            classifier = 2 * net.fc.in_features * net.fc.out_features  # the logits, unused
            with counter, torch.no_grad():
                net(x)
            return int(counter.get_total_flops()) - classifier
        digits = DigitsClassifier().eval()
        with counter, torch.no_grad():
            digits.features(x)
        return int(counter.get_total_flops())


def feature_dim(name: str) -> int:
    """Dimension of a registered feature network's features (2048 for Inception's pool3)."""
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(f"feature network: got {name!r}; allowed: {list(FEATURE_EXTRACTORS)}")
    return int(FEATURE_EXTRACTORS[name].dim)  # a class attribute: nothing is built


def precision_recall_flops(real: int, fake: int, dim: int) -> int:
    """FLOPs of improved precision/recall (Kynkaanniemi et al. 2019) over ``real`` and
    ``fake`` feature vectors of ``dim``: the matmuls of its three squared-distance matrices,
    real x real and fake x fake (the k-NN radii) and fake x real (the membership tests),
    2 x dim FLOPs per pair (``diffusion.metrics.precision_recall``)."""
    return 2 * dim * (real * real + fake * fake + fake * real)
