"""Tests for diffusion/flops.py against the paper's FLOP table and the counter's semantics."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffusion.flops import (
    FEATURE_INPUTS,
    count_forward_flops,
    count_parameters,
    feature_dim,
    feature_flops_per_image,
    forward_flops_per_image,
    precision_recall_flops,
    sampling_forwards,
    training_flops,
)
from diffusion.metrics import precision_recall
from diffusion.metrics.inception import build_fid_inception
from diffusion.metrics.registry import FEATURE_EXTRACTORS
from diffusion.unet import MODEL_LADDER, UNet, UNetConfig
from diffusion.unet import count_parameters as unet_count_parameters


def test_cifar_w64_b2_forward_flops():
    """Reference check: 3.26 GFLOP per 32x32 image for 64 channels, 2 blocks."""
    flops = forward_flops_per_image(MODEL_LADDER["cifar10-w64-b2"])
    assert flops == pytest.approx(3.26e9, rel=0.01)


@pytest.mark.parametrize(
    "name,paper_gflops",
    [
        ("imagenet64-w64", 20.1),
        ("imagenet64-w96", 44.9),
        ("imagenet64-w128", 79.5),
        ("imagenet64-w192", 178.2),
    ],
)
def test_paper_table_forward_flops(name, paper_gflops):
    """Nichol & Dhariwal 2021 scaling grid (PAPER.md table); attention matmuls included."""
    flops = forward_flops_per_image(MODEL_LADDER[name])
    assert flops == pytest.approx(paper_gflops * 1e9, rel=0.01)
    assert round(flops / 1e9, 1) == paper_gflops


def test_attention_matmuls_are_counted():
    """Without attention the w64 model would be 19.7 GFLOP, not the paper's 20.1."""
    config = MODEL_LADDER["imagenet64-w64"]
    without = dataclasses.replace(config, attention_resolutions=())
    # the middle block keeps its attention; the 16x16 and 8x8 levels lose theirs
    assert forward_flops_per_image(without) < 0.99 * forward_flops_per_image(config)


def test_training_flops_is_three_forwards_per_image():
    assert training_flops(10, 7) == 210
    assert training_flops(3_255_664_640, 0) == 0
    assert training_flops(3_255_664_640, 128) == 3 * 3_255_664_640 * 128
    with pytest.raises(ValueError, match="images"):
        training_flops(10, -1)


def test_flops_scale_linearly_with_batch():
    config = MODEL_LADDER["digits-xs"]
    one = count_forward_flops(config, batch_size=1)
    assert one == forward_flops_per_image(config)
    assert count_forward_flops(config, batch_size=2) == 2 * one


def test_model_and_config_give_the_same_count():
    config = MODEL_LADDER["digits-xs"]
    assert forward_flops_per_image(UNet(config)) == forward_flops_per_image(config)


def test_meta_count_matches_a_real_cpu_forward():
    config = MODEL_LADDER["digits-xs"]
    model = UNet(config)
    x = torch.zeros(1, 1, 8, 8)  # [1, C, H, W]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x, torch.zeros(1))
    assert counter.get_total_flops() == forward_flops_per_image(config)


def test_image_size_override_scales_convs():
    config = MODEL_LADDER["cifar10-w32-b1"]
    small = forward_flops_per_image(config)
    big = forward_flops_per_image(config, image_size=64)
    # 4x the pixels: convs and projections scale 4x, attention matmuls 16x (T^2)
    assert 4 * small < big < 16 * small


def test_class_conditional_config_is_countable():
    config = dataclasses.replace(MODEL_LADDER["digits-xs"], num_classes=10)
    assert forward_flops_per_image(config) > 0


def test_invalid_inputs():
    with pytest.raises(ValueError, match="UNetConfig"):
        forward_flops_per_image(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="batch_size"):
        count_forward_flops(MODEL_LADDER["digits-xs"], batch_size=0)
    with pytest.raises(ValueError, match="image_size"):
        forward_flops_per_image(MODEL_LADDER["digits-xs"], image_size=-8)


def test_count_parameters_reexported():
    assert count_parameters is unet_count_parameters
    config = UNetConfig(image_size=8, in_channels=1, model_channels=32, num_res_blocks=1)
    with torch.device("meta"):
        assert count_parameters(UNet(config)) == 717_858


# ---------------------------------------------------------------- the parts of evaluation
def test_feature_networks_are_counted_from_their_architecture():
    # the digits classifier by hand: conv 1->16 and 16->32 (3x3, 8x8), fc 512->128; 2 per MAC
    hand = 2 * (9 * 1 * 16 * 64 + 9 * 16 * 32 * 64 + 512 * 128)
    assert feature_flops_per_image("digits") == hand
    # FID Inception v3 at 299 x 299 up to pool3: ~5.7 G multiply-adds (Szegedy et al. 2016)
    inception = feature_flops_per_image("inception")
    assert 11.0e9 < inception < 11.8e9
    assert set(FEATURE_INPUTS) == set(FEATURE_EXTRACTORS)
    assert (feature_dim("inception"), feature_dim("digits")) == (2048, 128)
    with pytest.raises(ValueError, match=r"allowed values: \['inception', 'digits'\]"):
        feature_flops_per_image("vgg")


def test_inception_pool3_is_the_network_without_its_classifier():
    with torch.device("meta"):
        net = build_fid_inception().eval()
        x = torch.zeros(2, 3, 299, 299)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net.fc = torch.nn.Identity()  # pool3 features [2, 2048]: the network minus its logits
        assert net(x).shape == (2, 2048)
    assert counter.get_total_flops() == 2 * feature_flops_per_image("inception")


@pytest.mark.parametrize(
    "spacing,forwards", [("100", 100), ("ddim50", 50), ("10,15,20", 45), ("4000", 4000)]
)
def test_sampling_costs_one_forward_per_respaced_step(spacing, forwards):
    assert sampling_forwards(4000, spacing) == forwards


def test_precision_recall_counts_its_three_distance_matrices():
    real, fake = torch.zeros(5, 7), torch.zeros(9, 7)
    counter = FlopCounterMode(display=False)
    with counter:
        precision_recall(real, fake, k=3)
    assert counter.get_total_flops() == precision_recall_flops(5, 9, 7)
