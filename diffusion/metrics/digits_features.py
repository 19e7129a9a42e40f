"""An offline feature network for the 8x8 digits: a small CNN classifier trained here, whose
penultimate layer (pre-activation) gives the features. Its Frechet distance is "digits_fd"
("Frechet distance in digits-classifier feature space"): like FID (Heusel et al. 2017) in
spirit, but in a different feature space, so never to be reported as, or compared with, an FID.

Training is deterministic (fixed seed, fixed epochs, one CPU thread, no nondeterministic
ops), takes a few seconds, and is cached in a file keyed by ``DIGITS_CLASSIFIER_VERSION``
and the seed: bump the version whenever the architecture or the recipe changes. Features are
only comparable between runs that use the same weights; ``info["weights_sha256"]`` names them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.data.digits import load_digits_uint8
from diffusion.images import images_to_unit_range
from diffusion.metrics.base import FeatureExtractor

__all__ = [
    "DIGITS_CLASSIFIER_VERSION",
    "DigitsClassifier",
    "DigitsFeatureExtractor",
    "default_cache_dir",
    "load_or_train_digits_classifier",
    "train_digits_classifier",
]

logger = logging.getLogger(__name__)

DIGITS_CLASSIFIER_VERSION = "v1"  # bump on any change to DigitsClassifier or the recipe
EPOCHS = 12
BATCH_SIZE = 50
LEARNING_RATE = 2e-3
FEATURE_DIM = 128


class DigitsClassifier(nn.Module):
    """conv3x3(16) - conv3x3(32) - maxpool - fc(128) [features] - relu - fc(10);
    input [B, 1, 8, 8] in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # [B, 32, 4, 4]
            nn.Flatten(),  # [B, 512]
            nn.Linear(32 * 4 * 4, FEATURE_DIM),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(FEATURE_DIM, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer pre-activations [B, 128]. Taken before the ReLU because about
        half of the units never fire on digits, which would leave constant feature dims."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, 10]."""
        return self.head(self.body(x))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Bit-reproducible CPU training: one intra-op thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits_uint8(split)
    return images_to_unit_range(images), torch.from_numpy(labels)


@torch.no_grad()
def _accuracy(model: DigitsClassifier, split: str) -> float:
    x, y = _split(split)
    return (model(x).argmax(1) == y).double().mean().item()


def train_digits_classifier(seed: int = 0) -> tuple[DigitsClassifier, float]:
    """Train on the digits train split (Adam, fixed epochs, seeded init and shuffling);
    returns the model in eval mode and its test-split accuracy."""
    x, y = _split("train")
    generator = torch.Generator().manual_seed(seed)
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # parameter init only; the global RNG is restored on exit
        model = DigitsClassifier()
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        model.train()
        for _ in range(EPOCHS):
            order = torch.randperm(x.shape[0], generator=generator)
            for i in range(0, x.shape[0], BATCH_SIZE):
                idx = order[i : i + BATCH_SIZE]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        model.eval()
        accuracy = _accuracy(model, "test")
    logger.info("trained the digits classifier (seed %d): test accuracy %.4f", seed, accuracy)
    return model, accuracy


def _weights_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/diffscale, by default ~/.cache/diffscale."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "diffscale"


def load_or_train_digits_classifier(
    path: str | Path | None = None, *, cache_dir: str | Path | None = None, seed: int = 0
) -> tuple[DigitsClassifier, dict[str, object]]:
    """The cached classifier if ``path`` (default ``cache_dir``/digits_classifier_<version>
    _seed<seed>.pt) holds this version and seed, else train it and write that file.
    Returns (model in eval mode, info: version, seed, test_accuracy, weights_sha256, path)."""
    if path is None:
        name = f"digits_classifier_{DIGITS_CLASSIFIER_VERSION}_seed{seed}.pt"
        path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / name
    path = Path(path)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("version") == DIGITS_CLASSIFIER_VERSION and saved.get("seed") == seed:
            model = DigitsClassifier()
            model.load_state_dict(saved["state_dict"])
            info = {k: saved[k] for k in ("version", "seed", "test_accuracy", "weights_sha256")}
            logger.info(
                "loaded the digits classifier from %s (test accuracy %.4f)",
                path,
                info["test_accuracy"],
            )
            return model.eval(), {**info, "path": str(path)}
        logger.warning(
            "%s holds version %r seed %r, need %r seed %r: retraining",
            path,
            saved.get("version"),
            saved.get("seed"),
            DIGITS_CLASSIFIER_VERSION,
            seed,
        )
    model, accuracy = train_digits_classifier(seed)
    info = {
        "version": DIGITS_CLASSIFIER_VERSION,
        "seed": seed,
        "test_accuracy": accuracy,
        "weights_sha256": _weights_sha256(model),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save({**info, "state_dict": model.state_dict()}, tmp)
    tmp.replace(path)  # atomic: concurrent workers never read half a file
    logger.info("cached the digits classifier at %s", path)
    return model, {**info, "path": str(path)}


class DigitsFeatureExtractor(FeatureExtractor):
    """Penultimate features [N, 128] of the digits classifier, for 1 x 8 x 8 images; Frechet
    distance = "digits_fd" (not FID)."""

    name = "digits"
    dim = FEATURE_DIM
    fd_metric = "digits_fd"

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        batch_size: int = 500,
    ) -> None:
        super().__init__(device=device, batch_size=batch_size)
        model, info = load_or_train_digits_classifier(path, cache_dir=cache_dir, seed=seed)
        self.model = model.requires_grad_(False).to(self.device)
        self.info.update(info)

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if shape[1:] != (1, 8, 8):
            raise ValueError(f"images: the digits classifier takes [N, 1, 8, 8], got {shape}")

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)
