"""Image-quality metrics of a generator, by name: `fid`, `is`, `kid` (torch-fidelity's TF-exact InceptionV3)
and `fd_digits` (an offline Fréchet distance in a small digits classifier's features; never called FID).

    key = {"dataset": "cifar10", "split": "train", "resolution": 32}
    evaluator = Evaluator(("fid", "is", "kid"), real_images=real, reference_key=key,
                          n_generated=10_000, n_generated_is=50_000, n_real=5_000, cache_dir=...)
    evaluator(generate)  # -> {"fid": ..., "is": ..., "kid": ...}

Sample counts choose the protocol. The paper's (fjxmlzn/BSN gan/metric.py), at every evaluation: FID on 10k
generated vs 5k real, IS on 50k generated in 10 splits (the trial config's eval_generated, eval_real,
eval_generated_is); one pass of max(n_generated, n_generated_is) images feeds both, FID and KID reading the
first n_generated of them. The full FID protocol is 50k generated vs the whole training set.
The slow one-off work (weights, the digits classifier, the real statistics) happens at construction, so that
a missing file stops the trial before training starts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from trainables.config import METRICS
from trainables.metrics.fd_digits import DigitsFeatureExtractor, ink_box
from trainables.metrics.frechet import FrechetReference, gaussian_statistics
from trainables.metrics.inception import (
    EXTRACTOR,
    FEATURE_LAYER,
    InceptionWeightsMissingError,
    build_extractor,
    generated_features,
    metrics_from_features,
    real_features,
    reference_statistics,
    resolve_inception_weights,
)
from trainables.metrics.reference import (
    ReferenceStatistics,
    check_reference_key,
    content_fingerprint,
    load_or_compute_reference,
    reference_path,
)

__all__ = ["Evaluator", "FrechetReference", "InceptionWeightsMissingError", "gaussian_statistics"]

INCEPTION_METRICS = ("fid", "is", "kid")
REAL_SUBSET_SEED = 0  # which n_real of the given real images enter the statistics, when fewer than all


class Evaluator:
    """Computes the named metrics of `generate` against fixed real images.

    names: metric names from trainables.config.METRICS. real_images: uint8 (N, 3, R, R). reference_key: names
    the real data in the cache file (dataset, split, resolution required). n_generated: images of FID, KID and
    fd_digits per call. n_generated_is: images of IS per call (None: n_generated). n_real: real images in the
    statistics (<= N; a seeded subset when fewer). cache_dir: reference statistics and the digits
    classifier. inception_weights: path of torch-fidelity's InceptionV3 weights (None: torch
    hub cache, downloaded when possible). device: "cpu" or "cuda[:i]", where the feature extractors run.
    """

    def __init__(
        self,
        names: tuple[str, ...],
        *,
        real_images: torch.Tensor,
        reference_key: dict[str, object],
        n_generated: int,
        n_real: int,
        n_generated_is: int | None = None,
        cache_dir: str | Path,
        inception_weights: str | Path | None = None,
        device: torch.device | str = "cpu",
    ):
        self.names = _checked_names(names)
        if not (
            isinstance(real_images, torch.Tensor)
            and real_images.dtype == torch.uint8
            and real_images.dim() == 4
            and real_images.shape[1] == 3
            and real_images.shape[2] == real_images.shape[3]
        ):
            got = (
                f"{real_images.dtype} {tuple(real_images.shape)}"
                if isinstance(real_images, torch.Tensor)
                else type(real_images).__name__
            )
            raise ValueError(f"real_images: expected a uint8 tensor of shape (N, 3, R, R), got {got}")
        self.resolution = real_images.shape[-1]
        n_generated_is = n_generated if n_generated_is is None else n_generated_is
        counts = (("n_generated", n_generated), ("n_real", n_real), ("n_generated_is", n_generated_is))
        for field, value in counts:
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"{field}: expected an integer >= 2, got {value!r}")
        if n_real > real_images.shape[0]:
            raise ValueError(f"n_real: {n_real} exceeds the {real_images.shape[0]} real images given")
        check_reference_key(reference_key)
        if reference_key["resolution"] != self.resolution:
            raise ValueError(
                f"reference_key: resolution {reference_key['resolution']} does not match the "
                f"{self.resolution} px real images"
            )
        self.n_generated, self.n_real, self.n_generated_is = n_generated, n_real, n_generated_is
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device: {self.device} is not supported; valid: cpu, cuda, cuda:<index>")
        real = _subset(real_images.cpu(), n_real)
        fingerprint = content_fingerprint(real)  # the cache key names these very images

        self._inception = None
        self._inception_reference: ReferenceStatistics | None = None
        self._fid_reference: FrechetReference | None = None
        if any(name in INCEPTION_METRICS for name in self.names):
            self._inception = build_extractor(
                resolve_inception_weights(inception_weights), self.names, self.device
            )
            if "fid" in self.names or "kid" in self.names:
                path = reference_path(
                    cache_dir, reference_key, n_real=n_real, extractor=f"{EXTRACTOR}-{FEATURE_LAYER['fid']}",
                    fingerprint=fingerprint,
                )
                self._inception_reference = load_or_compute_reference(
                    path,
                    lambda: reference_statistics(real_features(self._inception, real, self.device)),
                    with_features="kid" in self.names,
                )
            if "fid" in self.names:
                reference = self._inception_reference
                self._fid_reference = FrechetReference(reference.mu, reference.sigma, self.device)

        self._digits = None
        self._digits_reference: FrechetReference | None = None
        if "fd_digits" in self.names:
            self._digits = DigitsFeatureExtractor(cache_dir, self.device, box=ink_box(real))
            path = reference_path(cache_dir, reference_key, n_real=n_real, extractor=self._digits.name,
                                  fingerprint=fingerprint)
            reference = load_or_compute_reference(path, lambda: _gaussian_reference(self._digits(real)))
            self._digits_reference = FrechetReference(reference.mu, reference.sigma)

    def constant_level(self, name: str) -> float | None:
        """The Fréchet distance `name` of the best constant generator, tr(sigma_real): any generator without
        variety scores at least this; None for the metrics that are not a Fréchet distance (is, kid)."""
        reference = {"fid": self._fid_reference, "fd_digits": self._digits_reference}.get(name)
        return None if reference is None else float(reference.trace)

    def __call__(self, generate: Callable[[int], torch.Tensor]) -> dict[str, float]:
        """Metrics of images from `generate(b) -> (b, 3, R, R) uint8`, keyed by the names: IS of the first
        n_generated_is, the others of the first n_generated (fd_digits: of n_generated drawn after them)."""

        def checked(batch: int) -> torch.Tensor:
            return _checked_batch(generate(batch), batch, self.resolution)

        out: dict[str, float] = {}
        if self._inception is not None:
            keep = {}
            if "fid" in self.names or "kid" in self.names:
                keep[FEATURE_LAYER["fid"]] = self.n_generated
            if "is" in self.names:
                keep[FEATURE_LAYER["is"]] = self.n_generated_is
            n_images = max(keep.values())
            features = generated_features(self._inception, checked, n_images, self.device, keep=keep)
            out |= metrics_from_features(self.names, features, self._inception_reference, self._fid_reference)
        if self._digits is not None:
            mu, sigma = gaussian_statistics(self._digits.of_generated(checked, self.n_generated))
            out["fd_digits"] = self._digits_reference.distance(mu, sigma)
        return {name: out[name] for name in self.names}


def _checked_names(names: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [name for name in names if name not in METRICS]
    if not names or unknown or len(set(names)) != len(names):
        problem = f"unknown {unknown}" if unknown else "duplicates" if names else "empty"
        raise ValueError(f"names: {problem} in {names!r}; valid (each at most once): {', '.join(METRICS)}")
    return names


def _checked_batch(images: object, batch: int, resolution: int) -> torch.Tensor:
    """`images` if a uint8 (batch, 3, resolution, resolution) tensor, else a ValueError naming generate."""
    expected = (batch, 3, resolution, resolution)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or tuple(images.shape) != expected:
        got = (
            f"{images.dtype} {tuple(images.shape)}"
            if isinstance(images, torch.Tensor)
            else type(images).__name__
        )
        raise ValueError(f"generate({batch}): expected a uint8 tensor of shape {expected}, got {got}")
    return images


def _subset(images: torch.Tensor, n: int) -> torch.Tensor:
    """All images when n == N, else a fixed random n of them (the same n for every trial)."""
    if n == images.shape[0]:
        return images
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(REAL_SUBSET_SEED))
    return images[order[:n].sort().values]


def _gaussian_reference(features) -> ReferenceStatistics:
    mu, sigma = gaussian_statistics(features)
    return ReferenceStatistics(mu=mu, sigma=sigma, features=features)
