"""fd_digits: an offline stand-in for FID on digit data (the built-in digits, MNIST, tests). It is not FID.

The Fréchet distance in the penultimate-layer features (64-d, after ReLU) of a small CNN classifier trained by
this project on scikit-learn's `load_digits` (1797 images, 8×8, intensities 0..16): fixed seed, CPU, single
thread, a few seconds, about 98 % held-out accuracy. The trained weights are cached under `cache_dir`, keyed
by a hash of the training settings, and loaded with `weights_only=True`.

Images reach the classifier as in training, each colour channel as its own digit image: uint8 (B, 3, H, W)
-> the square around the real data's ink (`ink_box`: MNIST's 20 px digits in their 32 px frame, the whole
frame for the built-in digits) -> 8×8 (area averaging) -> [0, 1], i.e. uint8 value v stands for digits
intensity 16·v/255 (ink bright on a dark background). The feature of an image is its three channels'
features side by side (192-d): gray data has three equal blocks, so colour (a green field, a red digit) is as
far from the data as it looks, where a grayscale conversion would have hidden it.

What it ranks (tests/test_metrics.py, measured there): held-out real digits ≪ a diverse but imperfect
generator (blurred, shifted, noisy real digits) ≪ one repeated sample, a flat colour field, uniform noise.
A generator with no variety scores at least tr(sigma_real) (its covariance term alone), whatever it paints:
that is the metric's constant-generator level (trainables.metrics.Evaluator.constant_level).
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
INK_LEVEL = 0.02  # of its maximum: where the real data's mean image has ink (ink_box)


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
        torch.save({"state_dict": model.state_dict(), "heldout_accuracy": accuracy,
                    "settings": json.dumps(asdict(settings))}, partial)
    return model, accuracy


def ink_box(real_images: torch.Tensor) -> tuple[int, int]:
    """(start, stop): the square [start, stop)² around where the mean of real images uint8 (N, C, R, R) has
    ink (above INK_LEVEL of its maximum), centred on it and inside the frame; the whole frame when blank."""
    mean = real_images.float().mean(dim=(0, 1))
    side = mean.shape[-1]
    rows, cols = torch.nonzero(mean > INK_LEVEL * mean.max(), as_tuple=True)
    if mean.max() <= 0 or rows.numel() == 0:
        return 0, side
    lows, highs = (int(rows.min()), int(cols.min())), (int(rows.max()) + 1, int(cols.max()) + 1)
    extent = max(high - low for low, high in zip(lows, highs, strict=True))
    centre = sum(low + high for low, high in zip(lows, highs, strict=True)) / 4
    start = min(max(0, round(centre - extent / 2)), side - extent)
    return start, start + extent


def to_classifier_input(images: torch.Tensor, box: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W), any H, W -> (B, C, 8, 8) float32 in [0, 1], the classifier's training scale, each
    channel on its own. box: (start, stop) of the square to keep first (`ink_box`); None: the whole image."""
    if box is not None:
        images = images[..., box[0]:box[1], box[0]:box[1]]
    pixels = images.float()
    if pixels.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        # Area averaging: an antialiased box filter, the exact inverse of a nearest-neighbour upsampling.
        pixels = F.interpolate(pixels, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
    return pixels / 255.0


class DigitsFeatureExtractor:
    """Features (N, 3 · feature_dim) float64 of uint8 images (N, 3, H, W), and the classifier's labels.

    box: the square every image is cropped to first (`ink_box` of the real images); None: the whole image.
    """

    def __init__(self, cache_dir: str | Path, device: torch.device,
                 settings: ClassifierSettings = ClassifierSettings(), box: tuple[int, int] | None = None):
        model, self.heldout_accuracy = load_or_train_classifier(cache_dir, settings)
        self.model, self.device, self.box = model.to(device), device, box
        framing = "" if box is None else f"-box{box[0]}-{box[1]}"
        self.name = f"fd_digits-{settings.digest()}-rgb{framing}"  # the extractor field of the reference key

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        features = []
        for start in range(0, images.shape[0], BATCH_SIZE):
            channels = to_classifier_input(images[start : start + BATCH_SIZE].to(self.device), self.box)
            b, c = channels.shape[:2]
            digits = channels.reshape(b * c, 1, INPUT_SIZE, INPUT_SIZE)  # each channel a digit image
            features.append(self.model.features(digits).reshape(b, -1))
        return torch.cat(features).double().cpu().numpy()

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted digit labels (B,) on the CPU of uint8 images (B, 3, H, W), from their luma."""
        gray = TF.rgb_to_grayscale(images.to(self.device).float()).round().to(torch.uint8)
        return self.model(to_classifier_input(gray, self.box)).argmax(1).cpu()

    def of_generated(self, generate: Callable[[int], torch.Tensor], n: int) -> np.ndarray:
        """Features (n, 3 · feature_dim) of n images from `generate(b) -> (b, 3, H, W) uint8`, in batches."""
        sizes = [min(BATCH_SIZE, n - start) for start in range(0, n, BATCH_SIZE)]
        return np.concatenate([self(generate(size)) for size in sizes])
