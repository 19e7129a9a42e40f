"""The UNet noise predictor of Nichol & Dhariwal 2021 (improved DDPM).

The network is the Ho et al. 2020 UNet with the changes of Nichol & Dhariwal 2021,
Appendix A: the timestep embedding enters every residual block as an adaptive
group norm ("scale-shift norm", GN(h) * (1 + s) + b), self-attention with 4 heads at the
16x16 and 8x8 resolutions and in the middle block, dropout before the last convolution
of each residual block, and 2C output channels when the variances are learned (Eq. 15:
eps and the interpolation coefficient v).

Parameter counts match the reference implementation (openai/improved-diffusion) exactly,
e.g. 121,063,942 for the ImageNet 64x64 model with 128 channels.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# Default channel multipliers per image size (Nichol & Dhariwal 2021, Appendix A:
# (1,2,3,4) at 64px, (1,2,2,2) at 32px); 16px and 8px extend the pattern for small data.
DEFAULT_CHANNEL_MULT: dict[int, tuple[int, ...]] = {
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    16: (1, 2, 2),
    8: (1, 2),
}

GROUPNORM_GROUPS = 32


def _is_pos_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """Architecture of the UNet; frozen and hashable so FLOP counts can be cached on it.

    ``channel_mult=None`` resolves to the paper's default for ``image_size``
    (see ``DEFAULT_CHANNEL_MULT``); after construction it is always a tuple.
    """

    image_size: int  # side of the square input image, in pixels
    in_channels: int = 3  # image channels C
    model_channels: int  # base width; level i has model_channels * channel_mult[i] channels
    num_res_blocks: int  # residual blocks per resolution level (decoder gets one more)
    channel_mult: tuple[int, ...] | None = None  # per-level width multipliers
    attention_resolutions: tuple[int, ...] = (16, 8)  # feature-map sides that get attention
    num_heads: int = 4  # attention heads
    dropout: float = 0.0  # dropout before the last conv of each residual block
    learn_sigma: bool = True  # 2C outputs: eps and the variance interpolation v (Eq. 15)
    use_scale_shift_norm: bool = True  # timestep enters as GN(h) * (1 + s) + b
    num_classes: int | None = None  # class-conditional model when set

    def __post_init__(self) -> None:
        # Normalise sequences to tuples so the config stays hashable (lists from JSON).
        for name in ("channel_mult", "attention_resolutions"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        for name in ("image_size", "in_channels", "model_channels", "num_res_blocks", "num_heads"):
            value = getattr(self, name)
            if not _is_pos_int(value):
                raise ValueError(f"UNetConfig.{name} must be a positive int, got {value!r}")
        if self.num_classes is not None and not _is_pos_int(self.num_classes):
            raise ValueError(
                f"UNetConfig.num_classes must be None or a positive int, got {self.num_classes!r}"
            )
        if self.channel_mult is None:
            if self.image_size not in DEFAULT_CHANNEL_MULT:
                raise ValueError(
                    f"UNetConfig.channel_mult has no default for image_size={self.image_size}; "
                    f"defaults exist for sizes {sorted(DEFAULT_CHANNEL_MULT)}, "
                    "otherwise pass channel_mult explicitly"
                )
            object.__setattr__(self, "channel_mult", DEFAULT_CHANNEL_MULT[self.image_size])
        mult = self.channel_mult
        if not isinstance(mult, tuple) or not mult or not all(_is_pos_int(m) for m in mult):
            raise ValueError(
                f"UNetConfig.channel_mult must be a non-empty tuple of positive ints, got {mult!r}"
            )
        res = self.attention_resolutions
        if not isinstance(res, tuple) or not all(_is_pos_int(r) for r in res):
            raise ValueError(
                "UNetConfig.attention_resolutions must be a tuple of positive ints "
                f"(feature-map sides such as (16, 8)), got {res!r}"
            )
        for width in (self.model_channels, *(self.model_channels * m for m in mult)):
            if width % GROUPNORM_GROUPS:
                raise ValueError(
                    f"UNetConfig.model_channels * channel_mult must be divisible by "
                    f"{GROUPNORM_GROUPS} (GroupNorm groups) at every level; "
                    f"model_channels={self.model_channels}, channel_mult={mult} gives {width}"
                )
            if width % self.num_heads:
                raise ValueError(
                    f"UNetConfig.num_heads={self.num_heads} must divide every level's width; "
                    f"model_channels={self.model_channels}, channel_mult={mult} gives {width}"
                )
        factor = 2 ** (len(mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"UNetConfig.image_size={self.image_size} must be divisible by "
                f"2**(len(channel_mult)-1)={factor} for channel_mult={mult}"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("learn_sigma", "use_scale_shift_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"UNetConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def out_channels(self) -> int:
        """2C when the variance is learned (eps and v, Eq. 15), else C."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (tuples become lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        """Inverse of ``to_dict``; unknown keys raise ValueError naming them."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"UNetConfig got unknown keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep embedding, [N] -> [N, dim], cosine half first.

    Frequencies exp(-ln(max_period) * i / half) for i < half (Ho et al. 2020, after
    Vaswani et al. 2017); an odd ``dim`` gets one zero column at the end.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]  # [N, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [N, 2 * half]
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # [N, dim]
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, so bf16/fp16 stays stable."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """GroupNorm with 32 groups (Nichol & Dhariwal 2021 keep Ho et al.'s group norm)."""
    return GroupNorm32(GROUPNORM_GROUPS, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter, so residual branches and the output start as zero."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepBlock(nn.Module):
    """Marker base: a layer whose forward is ``forward(x, emb)``, emb [N, E] the timestep
    embedding. :class:`TimestepSequential` passes ``emb`` to these layers only."""


class TimestepSequential(nn.Sequential):
    """Sequential that passes ``emb`` to the layers that take it."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class ResBlock(TimestepBlock):
    """Residual block with the timestep embedding (Nichol & Dhariwal 2021, Appendix A).

    With ``use_scale_shift_norm`` the embedding gives (s, b) and the second norm becomes
    GN(h) * (1 + s) + b; otherwise it is added to h before the second norm (Ho et al. 2020).
    The last conv is zero-initialised, so the block starts as its skip path.
    """

    def __init__(
        self,
        channels: int,
        emb_dim: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = True,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_norm = normalization(out_channels)
        self.out_rest = nn.Sequential(
            nn.SiLU(),
            nn.Dropout(p=dropout, inplace=True),  # on SiLU's output, which backward never reads
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x [N, C_in, H, W], emb [N, E] -> [N, C_out, H, W]."""
        h = self.in_layers(x)
        e = self.emb_layers(emb)[:, :, None, None]  # [N, 2*C_out or C_out, 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)  # each [N, C_out, 1, 1]
            h = torch.addcmul(shift, self.out_norm(h), 1 + scale)  # GN(h) * (1 + s) + b
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_rest(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over spatial positions, with a residual connection.

    qkv is split head-major as in the reference: the 3C qkv channels are viewed as
    [heads, 3 * ch] and each head's slice holds its q, k, v (ch = C / heads). Scores
    use the standard 1/sqrt(ch) scaling (the reference scales q and k by ch^-1/4 each).
    The qkv and output projections are per-position linear maps, i.e. the reference's
    1x1 Conv1d layers with the same parameters; ``nn.Linear`` on [B, T, C] keeps q, k, v
    contiguous in their last dim, which lets SDPA use its fused CPU kernel.
    """

    def __init__(self, channels: int, num_heads: int = 4) -> None:
        super().__init__()
        assert channels % num_heads == 0, (channels, num_heads)
        self.num_heads = num_heads
        self.norm = normalization(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] -> [B, C, H, W]."""
        b, c, height, width = x.shape
        heads = self.num_heads
        ch = c // heads
        h = self.norm(x).reshape(b, c, height * width).transpose(1, 2)  # [B, T, C]
        qkv = self.qkv(h).reshape(b, height * width, heads, 3 * ch)  # [B, T, heads, 3ch]
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)  # each [B, heads, T, ch]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, ch]
        out = out.transpose(1, 2).reshape(b, height * width, c)  # [B, T, C]
        out = self.proj_out(out).transpose(1, 2).reshape(b, c, height, width)  # [B, C, H, W]
        return x + out


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (same channels)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv (same channels)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """The improved-DDPM UNet: (x_t [N, C, H, W], t [N]) -> [N, out_channels, H, W].

    Nichol & Dhariwal 2021, Appendix A (after Ho et al. 2020, Appendix B). With
    ``learn_sigma`` the first C output channels are eps and the last C the variance
    interpolation v of Eq. 15.
    ``t`` holds the original (un-respaced) timesteps in any numeric dtype.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        c = cfg.model_channels
        emb_dim = 4 * c
        mult = cfg.channel_mult
        assert mult is not None  # resolved in UNetConfig.__post_init__

        def res_block(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, cfg.dropout, ch_out, cfg.use_scale_shift_norm)

        def wants_attention(ds: int) -> bool:
            return cfg.image_size // ds in cfg.attention_resolutions

        self.time_embed = nn.Sequential(
            nn.Linear(c, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )
        self.label_emb = (
            nn.Embedding(cfg.num_classes, emb_dim) if cfg.num_classes is not None else None
        )

        self.input_blocks = nn.ModuleList(
            [TimestepSequential(nn.Conv2d(cfg.in_channels, c, 3, padding=1))]
        )
        input_block_chans = [c]
        ch = c
        ds = 1
        for level, m in enumerate(mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, m * c)]
                ch = m * c
                if wants_attention(ds):
                    layers.append(AttentionBlock(ch, cfg.num_heads))
                self.input_blocks.append(TimestepSequential(*layers))
                input_block_chans.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepSequential(
            res_block(ch, ch),
            AttentionBlock(ch, cfg.num_heads),
            res_block(ch, ch),
        )

        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res_block(ch + input_block_chans.pop(), m * c)]
                ch = m * c
                if wants_attention(ds):
                    layers.append(AttentionBlock(ch, cfg.num_heads))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        assert not input_block_chans and ds == 1

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)),
        )

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x [N, C, H, W], t [N], y [N] class labels (class-conditional only)."""
        if (y is None) != (self.label_emb is None):
            raise ValueError(
                "UNet.forward: pass y (class labels) exactly when config.num_classes is set; "
                f"num_classes={self.config.num_classes}, y given: {y is not None}"
            )
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))  # [N, 4C]
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)  # channels: h, then skip
        return self.out(h)


def _digits(
    channels: int, blocks: int, mult: tuple[int, ...], attention: tuple[int, ...] = (16, 8)
) -> UNetConfig:
    """A UNet for the 8x8 grayscale digits (dropout 0.1)."""
    return UNetConfig(
        image_size=8,
        in_channels=1,
        model_channels=channels,
        num_res_blocks=blocks,
        channel_mult=mult,
        attention_resolutions=attention,
        dropout=0.1,
    )


# Named model sizes (STYLE principle 8: add entries, never change existing ones).
MODEL_LADDER: dict[str, UNetConfig] = {
    # Nichol & Dhariwal 2021 scaling grid, ImageNet 64x64, 3 blocks, (1,2,3,4): 30.3M params
    "imagenet64-w64": UNetConfig(
        image_size=64, model_channels=64, num_res_blocks=3, channel_mult=(1, 2, 3, 4)
    ),
    # scaling grid, width 96: 68.1M params
    "imagenet64-w96": UNetConfig(
        image_size=64, model_channels=96, num_res_blocks=3, channel_mult=(1, 2, 3, 4)
    ),
    # scaling grid, width 128 (the paper's main ImageNet 64 model): 121.1M params
    "imagenet64-w128": UNetConfig(
        image_size=64, model_channels=128, num_res_blocks=3, channel_mult=(1, 2, 3, 4)
    ),
    # scaling grid, width 192: 272.3M params
    "imagenet64-w192": UNetConfig(
        image_size=64, model_channels=192, num_res_blocks=3, channel_mult=(1, 2, 3, 4)
    ),
    # the paper's CIFAR-10 model: 128 ch, 3 blocks, (1,2,2,2), dropout 0.3: 52.5M params
    "cifar10": UNetConfig(
        image_size=32,
        model_channels=128,
        num_res_blocks=3,
        channel_mult=(1, 2, 2, 2),
        dropout=0.3,
    ),
    # small CIFAR-10 model for CPU-scale runs: 64 ch, 2 blocks: 9.9M params, 3.26 GFLOP/img
    "cifar10-w64-b2": UNetConfig(
        image_size=32,
        model_channels=64,
        num_res_blocks=2,
        channel_mult=(1, 2, 2, 2),
        dropout=0.1,
    ),
    # smallest CIFAR-10 model: 32 ch, 1 block: 1.7M params
    "cifar10-w32-b1": UNetConfig(
        image_size=32,
        model_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2, 2, 2),
        dropout=0.1,
    ),
    # 8x8 grayscale digits, 32 ch, 1 block, attention at 8x8 and 4x4 (middle): 0.72M params
    "digits-xs": _digits(32, 1, (1, 2)),
    # 8x8 digits, 64 ch, 1 block: 2.9M params
    "digits-s": _digits(64, 1, (1, 2)),
    # 8x8 digits, 64 ch, 2 blocks: 4.1M params
    "digits-m": _digits(64, 2, (1, 2)),
    # The demo's ladder of tiny sizes (sweeps/demo.yaml), about 2x apart in parameters:
    # 32 ch, 1 block, one level (8x8), no attention: 0.18M params, 16 MFLOP/img
    "digits-3xs": _digits(32, 1, (1,), attention=()),
    # 32 ch, 1 block, levels 8x8 and 4x4, attention at 4x4: 0.32M params, 16 MFLOP/img
    "digits-2xs": _digits(32, 1, (1, 1), attention=(4,)),
    # 32 ch, 1 block, levels 8x8, 4x4 and 2x2 (64 ch below 8x8), attention at 4x4: 1.19M
    # params for 33 MFLOP/img (digits-xs's compute, 1.7x its parameters)
    "digits-xs3": _digits(32, 1, (1, 2, 2), attention=(4,)),
}


def get_model_config(name: str, **overrides: Any) -> UNetConfig:
    """Look up a named size in ``MODEL_LADDER``, optionally replacing fields."""
    if name not in MODEL_LADDER:
        raise ValueError(f"unknown model name {name!r}; known: {sorted(MODEL_LADDER)}")
    known = {field.name for field in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown UNetConfig overrides {unknown}; allowed: {sorted(known)}")
    return dataclasses.replace(MODEL_LADDER[name], **overrides)


def build_model(config_or_name: UNetConfig | str) -> UNet:
    """Build a UNet from a config or a ``MODEL_LADDER`` name."""
    if isinstance(config_or_name, str):
        config_or_name = get_model_config(config_or_name)
    return UNet(config_or_name)


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (what the paper's "params" column counts)."""
    return sum(p.numel() for p in model.parameters())
