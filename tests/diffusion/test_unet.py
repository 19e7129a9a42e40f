"""Tests for diffusion/unet.py: exact parameter counts, shapes, init, config, dtypes."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffusion.unet import (
    MODEL_LADDER,
    AttentionBlock,
    GroupNorm32,
    UNet,
    UNetConfig,
    build_model,
    count_parameters,
    get_model_config,
    timestep_embedding,
)


def _meta_params(config: UNetConfig) -> int:
    with torch.device("meta"):
        return count_parameters(UNet(config))


def _perturb_zero_init(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised params (output convs, proj_out, norm biases) random values,
    so outputs and gradients are not trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def _inputs(config: UNetConfig, n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    size = config.image_size
    x = torch.randn(n, config.in_channels, size, size, generator=gen)  # [N, C, H, W]
    t = torch.randint(0, 4000, (n,), generator=gen)  # [N]
    return x, t


# --- exact parameter counts (reference: openai/improved-diffusion) -----------------------

PAPER_COUNTS = [
    # (image_size, model_channels, num_res_blocks, channel_mult, exact params)
    (32, 128, 3, (1, 2, 2, 2), 52_546_438),  # CIFAR-10 model
    (64, 128, 3, (1, 2, 3, 4), 121_063_942),  # ImageNet 64 model
    (32, 64, 2, (1, 2, 2, 2), 9_926_790),
    (32, 32, 1, (1, 2, 2, 2), 1_679_782),
    # scaling grid, widths 64/96/128/192: paper says 30.3M / 68.1M / 121.1M / 272.3M
    (64, 64, 3, (1, 2, 3, 4), 30_303_494),
    (64, 96, 3, (1, 2, 3, 4), 68_126_598),
    (64, 192, 3, (1, 2, 3, 4), 272_281_350),
]


@pytest.mark.parametrize("size,width,blocks,mult,expected", PAPER_COUNTS)
def test_parameter_counts_match_reference(size, width, blocks, mult, expected):
    config = UNetConfig(
        image_size=size, model_channels=width, num_res_blocks=blocks, channel_mult=mult
    )
    assert _meta_params(config) == expected


@pytest.mark.parametrize(
    "name,paper_millions",
    [
        ("imagenet64-w64", 30.3),
        ("imagenet64-w96", 68.1),
        ("imagenet64-w128", 121.1),
        ("imagenet64-w192", 272.3),
    ],
)
def test_ladder_matches_paper_scaling_grid(name, paper_millions):
    assert round(_meta_params(MODEL_LADDER[name]) / 1e6, 1) == paper_millions


def test_meta_and_cpu_counts_agree():
    config = MODEL_LADDER["cifar10-w32-b1"]
    assert count_parameters(UNet(config)) == _meta_params(config) == 1_679_782


def test_no_scale_shift_has_half_the_emb_projection():
    base = MODEL_LADDER["digits-xs"]
    plain = dataclasses.replace(base, use_scale_shift_norm=False)
    # every ResBlock's emb Linear(4C, 2*out) shrinks to Linear(4C, out)
    assert _meta_params(plain) < _meta_params(base)
    model = UNet(plain)
    x, t = _inputs(plain)
    assert model(x, t).shape == (2, 2, 8, 8)


# --- forward shapes and init --------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        MODEL_LADDER["digits-xs"],  # 8x8, 1 channel
        UNetConfig(image_size=16, model_channels=32, num_res_blocks=1),  # default (1, 2, 2)
        MODEL_LADDER["cifar10-w32-b1"],  # 32x32, 3 channels
    ],
    ids=["8px-gray", "16px", "32px"],
)
def test_output_shape_has_2c_channels_when_learning_sigma(config):
    model = UNet(config)
    x, t = _inputs(config)
    out = model(x, t)
    size = config.image_size
    assert out.shape == (2, 2 * config.in_channels, size, size)
    assert out.dtype == torch.float32


def test_output_has_c_channels_without_learned_sigma():
    config = dataclasses.replace(MODEL_LADDER["digits-xs"], learn_sigma=False)
    model = UNet(config)
    x, t = _inputs(config)
    assert model(x, t).shape == (2, 1, 8, 8)


def test_fresh_model_outputs_exact_zeros():
    """The output conv is zero-initialised (reference init), so eps_theta starts at 0."""
    config = MODEL_LADDER["digits-xs"]
    model = UNet(config)
    x, t = _inputs(config)
    assert torch.equal(model(x, t), torch.zeros(2, 2, 8, 8))


def test_zero_init_layers():
    model = UNet(MODEL_LADDER["digits-xs"])
    assert not model.out[-1].weight.any() and not model.out[-1].bias.any()
    attn = model.middle_block[1]
    assert isinstance(attn, AttentionBlock)
    assert not attn.proj_out.weight.any() and not attn.proj_out.bias.any()
    res = model.middle_block[0]
    last_conv = res.out_rest[-1]
    assert not last_conv.weight.any() and not last_conv.bias.any()


def test_attention_placement_follows_resolutions():
    # 32px with (16, 8): attention at the 16x16 and 8x8 levels (downsample factors 2, 4).
    model = UNet(MODEL_LADDER["cifar10-w32-b1"])
    with_attn = [
        any(isinstance(layer, AttentionBlock) for layer in block) for block in model.input_blocks
    ]
    # blocks: conv, res@32, down, res@16+attn, down, res@8+attn, down, res@4
    assert with_attn == [False, False, False, True, False, True, False, False]
    n_out_attn = sum(
        any(isinstance(layer, AttentionBlock) for layer in block) for block in model.output_blocks
    )
    assert n_out_attn == 2 * 2  # (num_res_blocks + 1) per attended level
    assert isinstance(model.middle_block[1], AttentionBlock)


def test_timesteps_any_numeric_dtype():
    config = MODEL_LADDER["digits-xs"]
    torch.manual_seed(0)
    model = UNet(config).eval()  # no dropout noise
    _perturb_zero_init(model)
    x, t = _inputs(config)
    out_int = model(x, t)
    assert torch.equal(out_int, model(x, t.float()))
    assert torch.equal(out_int, model(x, t.to(torch.int32)))


# --- timestep embedding ---------------------------------------------------------------------


def test_timestep_embedding_by_hand():
    t = torch.tensor([0, 1, 7.5])
    emb = timestep_embedding(t, 6)
    assert emb.shape == (3, 6) and emb.dtype == torch.float32
    freqs = [math.exp(-math.log(10000.0) * i / 3) for i in range(3)]
    for row, tv in enumerate([0.0, 1.0, 7.5]):
        expected = [math.cos(tv * f) for f in freqs] + [math.sin(tv * f) for f in freqs]
        assert emb[row].tolist() == pytest.approx(expected, abs=1e-6)
    # cos half first: t=0 gives ones then zeros
    assert emb[0].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_timestep_embedding_odd_dim_pads_zero_column():
    emb = timestep_embedding(torch.arange(4), 7)
    assert emb.shape == (4, 7)
    assert not emb[:, -1].any()
    assert torch.equal(emb[:, :6], timestep_embedding(torch.arange(4), 6))


# --- attention ----------------------------------------------------------------------------


def _attention_by_einsum(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The reference layout written out: 1x1-conv qkv [B, 3C, T], split head-major."""
    b, c, height, width = x.shape
    heads = block.num_heads
    ch = c // heads
    h = block.norm(x).reshape(b, c, height * width)  # [B, C, T]
    qkv = torch.einsum("oc,bct->bot", block.qkv.weight, h) + block.qkv.bias[None, :, None]
    qkv = qkv.reshape(b, heads, 3 * ch, height * width)  # [B, heads, 3ch, T]
    q, k, v = qkv.split(ch, dim=2)  # each [B, heads, ch, T]
    scale = ch**-0.25
    weights = torch.einsum("bhct,bhcs->bhts", q * scale, k * scale).softmax(dim=-1)
    a = torch.einsum("bhts,bhcs->bhct", weights, v).reshape(b, c, height * width)  # [B, C, T]
    out = torch.einsum("oc,bct->bot", block.proj_out.weight, a)
    out = out + block.proj_out.bias[None, :, None]
    return x + out.reshape(b, c, height, width)


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_sdpa_matches_einsum_head_major(heads):
    torch.manual_seed(0)
    block = AttentionBlock(64, num_heads=heads)
    _perturb_zero_init(block)
    x = torch.randn(2, 64, 4, 6)
    torch.testing.assert_close(block(x), _attention_by_einsum(block, x), rtol=1e-5, atol=1e-5)


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(model_channels=48), "model_channels"),  # 48 not divisible by 32 groups
        (dict(num_heads=3), "num_heads"),
        (dict(image_size=30, channel_mult=None), "channel_mult"),  # no default for 30px
        (dict(image_size=36), "image_size"),  # 36 not divisible by 2**3
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(in_channels=-1), "in_channels"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(channel_mult=(1, 0)), "channel_mult"),
        (dict(attention_resolutions=(16, -8)), "attention_resolutions"),
        (dict(num_classes=0), "num_classes"),
        (dict(learn_sigma="yes"), "learn_sigma"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    base = dict(image_size=32, model_channels=64, num_res_blocks=2, channel_mult=(1, 2, 2, 2))
    base.update(kwargs)
    with pytest.raises(ValueError, match=field):
        UNetConfig(**base)


def test_config_accepts_unusual_but_valid_mults():
    config = UNetConfig(image_size=16, model_channels=32, num_res_blocks=1, channel_mult=(1, 3, 5))
    assert config.channel_mult == (1, 3, 5)  # widths 32, 96, 160: all divisible by 32 and 4


@pytest.mark.parametrize("size,mult", [(64, (1, 2, 3, 4)), (32, (1, 2, 2, 2)), (8, (1, 2))])
def test_default_channel_mult_by_size(size, mult):
    config = UNetConfig(image_size=size, model_channels=32, num_res_blocks=1)
    assert config.channel_mult == mult


def test_config_round_trip_through_json():
    for config in MODEL_LADDER.values():
        data = json.loads(json.dumps(config.to_dict()))
        assert isinstance(data["channel_mult"], list)
        restored = UNetConfig.from_dict(data)
        assert restored == config
        assert isinstance(restored.channel_mult, tuple)
        assert hash(restored) == hash(config)


def test_from_dict_rejects_unknown_keys():
    data = MODEL_LADDER["digits-xs"].to_dict()
    data["widht"] = 3
    with pytest.raises(ValueError, match="widht"):
        UNetConfig.from_dict(data)


def test_config_is_frozen():
    config = MODEL_LADDER["digits-xs"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model_channels = 64  # type: ignore[misc]


# --- ladder registry ------------------------------------------------------------------------


def test_ladder_names():
    expected = {
        "imagenet64-w64",
        "imagenet64-w96",
        "imagenet64-w128",
        "imagenet64-w192",
        "cifar10",
        "cifar10-w64-b2",
        "cifar10-w32-b1",
        "digits-xs",
        "digits-s",
        "digits-m",
    }
    assert expected <= set(MODEL_LADDER)
    assert MODEL_LADDER["cifar10"].dropout == 0.3
    for name in ("imagenet64-w64", "imagenet64-w96", "imagenet64-w128", "imagenet64-w192"):
        assert MODEL_LADDER[name].dropout == 0.0


def test_digits_ladder_is_small_and_increasing():
    sizes = [_meta_params(MODEL_LADDER[n]) for n in ("digits-xs", "digits-s", "digits-m")]
    assert sizes == sorted(sizes) and sizes[-1] < 5_000_000
    assert 0.6e6 < sizes[0] < 0.9e6
    for name in ("digits-xs", "digits-s", "digits-m"):
        config = MODEL_LADDER[name]
        assert (config.image_size, config.in_channels, config.channel_mult) == (8, 1, (1, 2))


def test_get_model_config_and_build_model():
    config = get_model_config("digits-xs", dropout=0.0)
    assert config.dropout == 0.0 and config.model_channels == 32
    assert MODEL_LADDER["digits-xs"].dropout == 0.1  # registry entry untouched
    with pytest.raises(ValueError, match="digits-xs"):  # lists the known names
        get_model_config("digits-xxl")
    with pytest.raises(ValueError, match="widht"):
        get_model_config("digits-xs", widht=3)
    with pytest.raises(ValueError, match="dropout"):
        get_model_config("digits-xs", dropout=2.0)
    model = build_model("digits-xs")
    assert isinstance(model, UNet) and model.config == MODEL_LADDER["digits-xs"]
    assert build_model(config).config is config


# --- class conditioning ---------------------------------------------------------------------


def test_class_conditional_requires_labels():
    config = get_model_config("digits-xs", num_classes=10)
    torch.manual_seed(0)
    model = UNet(config)
    _perturb_zero_init(model)
    x, t = _inputs(config)
    out0 = model(x, t, torch.tensor([0, 0]))
    out1 = model(x, t, torch.tensor([3, 3]))
    assert out0.shape == (2, 2, 8, 8) and not torch.equal(out0, out1)
    with pytest.raises(ValueError, match="num_classes"):
        model(x, t)
    with pytest.raises(ValueError, match="num_classes"):
        UNet(MODEL_LADDER["digits-xs"])(x, t, torch.tensor([0, 0]))


# --- dtypes -----------------------------------------------------------------------------------


def test_groupnorm32_computes_in_float32():
    torch.manual_seed(0)
    norm = GroupNorm32(32, 64)
    x = torch.randn(2, 64, 4, 4).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    expected = F.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps).to(torch.bfloat16)
    assert torch.equal(out, expected)


def test_bf16_autocast_forward_keeps_groupnorm_in_float32(monkeypatch):
    config = MODEL_LADDER["digits-xs"]
    torch.manual_seed(0)
    model = UNet(config).eval()  # no dropout noise
    _perturb_zero_init(model)
    x, t = _inputs(config)
    reference = model(x, t)

    seen: list[torch.dtype] = []
    group_norm = F.group_norm

    def recording_group_norm(inp, *args, **kwargs):
        seen.append(inp.dtype)
        return group_norm(inp, *args, **kwargs)

    monkeypatch.setattr(F, "group_norm", recording_group_norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.dtype == torch.bfloat16
    assert seen and set(seen) == {torch.float32}
    # bf16 has ~3 significant digits; the output should still track the fp32 model
    rel = (out.float() - reference).norm() / reference.norm()
    assert rel < 0.05


# --- determinism, dropout, gradients ----------------------------------------------------------


def test_same_seed_same_weights_and_output():
    config = MODEL_LADDER["digits-xs"]
    outs = []
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        model = UNet(config).eval()
        _perturb_zero_init(model)
        states.append(model.state_dict())
        x, t = _inputs(config)
        outs.append(model(x, t))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert torch.equal(outs[0], outs[1]) and outs[0].abs().sum() > 0


def test_dropout_only_in_train_mode():
    config = get_model_config("digits-xs", dropout=0.3)
    torch.manual_seed(0)
    model = UNet(config)
    _perturb_zero_init(model)
    x, t = _inputs(config)
    model.train()
    assert not torch.equal(model(x, t), model(x, t))
    model.eval()
    assert torch.equal(model(x, t), model(x, t))


def test_gradient_reaches_every_parameter():
    config = get_model_config("digits-xs", num_classes=3)
    torch.manual_seed(0)
    model = UNet(config)
    _perturb_zero_init(model)
    x, t = _inputs(config)
    model(x, t, torch.tensor([0, 2])).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_diffusion_modules_do_not_import_orchestration():
    root = Path(__file__).resolve().parents[2] / "diffusion"
    for name in ("unet.py", "flops.py"):
        tree = ast.parse((root / name).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"ray", "mlflow", "orchestrator"}, name
