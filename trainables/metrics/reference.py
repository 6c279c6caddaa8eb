"""Reference statistics of the real images, cached on disk.

One `.npz` file per (dataset, split, resolution, sample count, extractor): a readable name plus a short hash
of all key fields, e.g. `cifar10-train-32px-n5000-inception-v3-compat-2048-3f9a1c0b2e.npz`. Files hold plain
arrays (mu, sigma, features), are written atomically (temp file + rename, so concurrent trials never read half
a file) and read back with `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainables.files import atomic_path

REQUIRED_KEY_FIELDS = ("dataset", "split", "resolution")
CACHE_FORMAT = 1  # bump when the file layout changes, so old files are not misread


@dataclass(frozen=True)
class ReferenceStatistics:
    """Statistics of N real images in a D-dimensional feature space."""

    mu: np.ndarray  # (D,) feature mean
    sigma: np.ndarray  # (D, D) feature covariance
    features: np.ndarray | None  # (N, D) the features themselves (KID needs them); None when not loaded


def check_reference_key(reference_key: dict[str, object]) -> None:
    """ValueError unless reference_key names dataset, split and resolution (further fields are allowed)."""
    missing = [field for field in REQUIRED_KEY_FIELDS if field not in reference_key]
    if missing:
        raise ValueError(
            f"reference_key: missing field(s) {missing}; required: {', '.join(REQUIRED_KEY_FIELDS)}, "
            f"got {sorted(reference_key)}"
        )


def reference_path(
    cache_dir: str | Path, reference_key: dict[str, object], *, n_real: int, extractor: str
) -> Path:
    """Cache file of the reference statistics for these fields (reference_key must name dataset, split,
    resolution; any further fields, e.g. a subset, also enter the hash)."""
    check_reference_key(reference_key)
    fields = {**reference_key, "n_real": int(n_real), "extractor": extractor, "format": CACHE_FORMAT}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]
    dataset, split, resolution = (reference_key[field] for field in REQUIRED_KEY_FIELDS)
    readable = f"{dataset}-{split}-{resolution}px-n{n_real}-{extractor}"
    return Path(cache_dir).expanduser() / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', readable)}-{digest}.npz"


def save_reference(path: Path, stats: ReferenceStatistics) -> None:
    """Write atomically: a temp file in the same directory, then an atomic rename over `path`."""
    with atomic_path(path) as partial, open(partial, "wb") as file:  # a file object: savez adds no `.npz`
        np.savez(file, mu=stats.mu, sigma=stats.sigma, features=stats.features)


def load_reference(path: Path, *, with_features: bool = True) -> ReferenceStatistics:
    """Read a cache file; without features only mu and sigma are read (npz members load one by one)."""
    with np.load(path, allow_pickle=False) as arrays:
        features = arrays["features"] if with_features else None
        return ReferenceStatistics(mu=arrays["mu"], sigma=arrays["sigma"], features=features)


def load_or_compute_reference(
    path: Path, compute: Callable[[], ReferenceStatistics], *, with_features: bool = True
) -> ReferenceStatistics:
    """The cached statistics at `path`, or `compute()` them once and cache them there."""
    if path.is_file():
        return load_reference(path, with_features=with_features)
    stats = compute()
    if stats.features is None:
        raise ValueError("compute: must return the features too, so that the cache file is complete")
    save_reference(path, stats)
    return stats
