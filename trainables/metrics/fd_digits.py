"""fd_digits: an offline stand-in for FID on the built-in digits data (and in tests). It is not FID.

The Fréchet distance in the penultimate-layer features (64-d, after ReLU) of a small CNN classifier trained by
this project on scikit-learn's `load_digits` (1797 images, 8×8, intensities 0..16): fixed seed, CPU, single
thread, a few seconds, about 98 % held-out accuracy. The trained weights are cached under `cache_dir`, keyed
by a hash of the training settings, and loaded with `weights_only=True`.

Images reach the classifier as in training: uint8 (B, 3, H, W) -> grayscale -> 8×8 (area averaging)
-> [0, 1], i.e. uint8 value v stands for digits intensity 16·v/255 (ink bright on a dark background).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from sklearn.datasets import load_digits
from torch import nn

from trainables.files import atomic_path

INPUT_SIZE = 8  # load_digits images are 8×8
DIGITS_MAX = 16.0  # load_digits intensities run 0..16
BATCH_SIZE = 500  # generated images per feature batch


@dataclass(frozen=True)
class ClassifierSettings:
    """Everything that determines the trained classifier; its hash names the cache file."""

    seed: int = 0
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3  # Adam
    holdout_fraction: float = 0.2  # of the 1797 images, kept out of training to measure accuracy
    feature_dim: int = 64  # width of the penultimate layer: the fd_digits feature space

    def digest(self) -> str:
        return hashlib.sha256(json.dumps({**asdict(self), "arch": 1}, sort_keys=True).encode()).hexdigest()[
            :10
        ]


class DigitsClassifier(nn.Module):
    """(B, 1, 8, 8) in [0, 1] -> logits (B, 10); `features` gives the penultimate layer (B, feature_dim)."""

    def __init__(self, feature_dim: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 32 × 4 × 4
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as classifier input (1797, 1, 8, 8) float32 in [0, 1]; labels (1797,) int64."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / DIGITS_MAX
    return images, torch.tensor(digits.target, dtype=torch.int64)


@contextmanager
def _single_thread() -> Iterator[None]:
    """One intra-op thread: the same float reductions, so the same weights, whatever the host's threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def holdout_split(settings: ClassifierSettings, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (held out, trained on) of the n digits: a permutation seeded by settings.seed."""
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed))
    n_holdout = int(settings.holdout_fraction * n)
    return permutation[:n_holdout], permutation[n_holdout:]


def train_classifier(settings: ClassifierSettings) -> tuple[DigitsClassifier, float]:
    """Train on CPU from settings.seed; return the model (eval mode) and its held-out accuracy in [0, 1]."""
    images, labels = digits_dataset()
    holdout, train = holdout_split(settings, len(images))
    order = torch.Generator().manual_seed(settings.seed + 1)  # minibatch order
    with _single_thread(), torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(settings.seed)
        model = DigitsClassifier(settings.feature_dim)
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
        for _ in range(settings.epochs):
            shuffled = train[torch.randperm(len(train), generator=order)]
            for start in range(0, len(shuffled), settings.batch_size):
                batch = shuffled[start : start + settings.batch_size]
                loss = F.cross_entropy(model(images[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(images[holdout]).argmax(1) == labels[holdout]).double().mean().item()
    return model, accuracy


def classifier_path(cache_dir: str | Path, settings: ClassifierSettings) -> Path:
    return Path(cache_dir).expanduser() / f"fd_digits-classifier-{settings.digest()}.pt"


def load_or_train_classifier(
    cache_dir: str | Path, settings: ClassifierSettings = ClassifierSettings()
) -> tuple[DigitsClassifier, float]:
    """The cached classifier for these settings (loaded weights_only), or train it once and cache it."""
    path = classifier_path(cache_dir, settings)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = DigitsClassifier(settings.feature_dim)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), float(saved["heldout_accuracy"])
    model, accuracy = train_classifier(settings)
    with atomic_path(path) as partial:
        torch.save(
            {
                "state_dict": model.state_dict(),
                "heldout_accuracy": accuracy,
                "settings": json.dumps(asdict(settings)),
            },
            partial,
        )
    return model, accuracy


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W), any H, W -> (B, 1, 8, 8) float32 in [0, 1], the classifier's training scale."""
    gray = TF.rgb_to_grayscale(images.float())  # ITU-R 601 luma; equal channels stay as they are
    if gray.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        # Area averaging: an antialiased box filter, the exact inverse of a nearest-neighbour upsampling.
        gray = F.interpolate(gray, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
    return gray / 255.0


class DigitsFeatureExtractor:
    """Penultimate-layer features (N, feature_dim) float64 of uint8 images (N, 3, H, W)."""

    def __init__(
        self, cache_dir: str | Path, device: torch.device, settings: ClassifierSettings = ClassifierSettings()
    ):
        model, self.heldout_accuracy = load_or_train_classifier(cache_dir, settings)
        self.model, self.device = model.to(device), device
        self.name = f"fd_digits-{settings.digest()}"  # the extractor field of the reference cache key

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        features = [
            self.model.features(to_classifier_input(images[start : start + BATCH_SIZE].to(self.device)))
            for start in range(0, images.shape[0], BATCH_SIZE)
        ]
        return torch.cat(features).double().cpu().numpy()

    def of_generated(self, generate: Callable[[int], torch.Tensor], n: int) -> np.ndarray:
        """Features (n, feature_dim) of n images drawn from `generate(b) -> (b, 3, H, W) uint8` in batches."""
        sizes = [min(BATCH_SIZE, n - start) for start in range(0, n, BATCH_SIZE)]
        return np.concatenate([self(generate(size)) for size in sizes])
