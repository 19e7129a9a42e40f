"""FID Inception features as the literature computes them (Heusel et al. 2017): pytorch-fid's
port of the TensorFlow Inception v3 graph (2015-12-05) with its FID-specific block patches,
2048-d features of the final average pool ("pool3").

Input handling follows pytorch-fid: images in [0, 1] (here from uint8 k/255 or float
(x + 1)/2), grey replicated to RGB as PIL's convert("RGB") does, bilinear resize to 299 x 299
(align_corners=False), then scaled to [-1, 1].

The weights are never fetched implicitly: they come from an explicit file, or from the torch
hub cache under pytorch-fid's file name, or (only with ``allow_download=True``) through
pytorch-fid's own downloader into that cache.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.metrics.base import FeatureExtractor

__all__ = [
    "InceptionFeatureExtractor",
    "build_fid_inception",
    "fid_inception_weights_path",
    "load_fid_inception",
]

logger = logging.getLogger(__name__)


def _pytorch_fid_inception():
    try:
        from pytorch_fid import inception
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Inception features need the 'pytorch-fid' package (pip install pytorch-fid)"
        ) from e
    return inception


def fid_inception_weights_path(weights_path: str | Path | None = None) -> Path:
    """The weights file used: ``weights_path`` if given, else pytorch-fid's file name
    (pt_inception-2015-12-05-6726825d.pth) under ``torch.hub.get_dir()/checkpoints``, where
    pytorch-fid's own downloader puts it."""
    if weights_path is not None:
        return Path(weights_path)
    file_name = os.path.basename(urlparse(_pytorch_fid_inception().FID_WEIGHTS_URL).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def build_fid_inception() -> nn.Module:
    """The FID Inception v3 architecture with uninitialised weights and no download: the same
    modules as ``pytorch_fid.inception.fid_inception_v3`` (1008 classes, no aux logits,
    FID-patched Mixed blocks), so its state_dict keys are those of the FID weights file."""
    fid = _pytorch_fid_inception()
    net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    return net


def load_fid_inception(
    weights_path: str | Path | None = None, *, allow_download: bool = False
) -> nn.Module:
    """The FID Inception v3 with its weights, in eval mode (see the module docstring for where
    the weights come from). A missing file raises FileNotFoundError naming the URL and path."""
    path = fid_inception_weights_path(weights_path)
    if not path.is_file():
        url = _pytorch_fid_inception().FID_WEIGHTS_URL
        if weights_path is None and allow_download:
            logger.info("downloading the FID Inception weights from %s to %s", url, path)
            return _pytorch_fid_inception().fid_inception_v3().eval()
        hint = "" if weights_path is not None else " or pass allow_download=True"
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}. Download {url} and save it as {path}"
            f"{hint}."
        )
    net = build_fid_inception()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    logger.info("loaded FID Inception weights from %s", path)
    return net.eval()


class _Pool3(nn.Module):
    """Inception v3 up to the final average pool, as pytorch-fid's InceptionV3 block 0-3."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            net.Conv2d_1a_3x3,
            net.Conv2d_2a_3x3,
            net.Conv2d_2b_3x3,
            nn.MaxPool2d(kernel_size=3, stride=2),
            net.Conv2d_3b_1x1,
            net.Conv2d_4a_3x3,
            nn.MaxPool2d(kernel_size=3, stride=2),
            net.Mixed_5b,
            net.Mixed_5c,
            net.Mixed_5d,
            net.Mixed_6a,
            net.Mixed_6b,
            net.Mixed_6c,
            net.Mixed_6d,
            net.Mixed_6e,
            net.Mixed_7a,
            net.Mixed_7b,
            net.Mixed_7c,
            nn.AdaptiveAvgPool2d(output_size=(1, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] in [0, 1] -> pool3 features [B, 2048]."""
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers(2 * x - 1).flatten(1)  # [B, 2048, 1, 1] -> [B, 2048]


class InceptionFeatureExtractor(FeatureExtractor):
    """pytorch-fid's FID Inception pool3 features [N, 2048]; Frechet distance = "fid"."""

    name = "inception"
    dim = 2048
    fd_metric = "fid"

    def __init__(
        self,
        weights_path: str | Path | None = None,
        *,
        allow_download: bool = False,
        device: str | torch.device = "cpu",
        batch_size: int = 50,
    ) -> None:
        super().__init__(device=device, batch_size=batch_size)
        net = load_fid_inception(weights_path, allow_download=allow_download)
        self.model = _Pool3(net).eval().requires_grad_(False).to(self.device)
        self.info["weights"] = str(fid_inception_weights_path(weights_path))

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if shape[1] not in (1, 3):
            raise ValueError(f"images: Inception takes 1 or 3 channels, got shape {shape}")

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB, as PIL's convert("RGB")
        return self.model(x)
