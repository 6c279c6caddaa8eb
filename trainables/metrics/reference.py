"""Reference statistics of the real images, cached on disk.

One `.npz` file per (dataset, split, resolution, sample count, extractor, the data's identity): a readable
name plus a short hash of all key fields, e.g. `cifar10-train-32px-n5000-inception-v3-compat-2048-3f9a1c0b2e
.npz`. The data's identity is its location (`data_location`, a key field the trial adds) and the content
fingerprint of the very images that enter the statistics (`content_fingerprint`, always part of the hash):
another folder, or the same folder with other images, never reuses stale statistics. Files hold plain arrays
(mu, sigma, features), are written atomically (trainables.files, so concurrent trials never read half a file)
and read back with `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainables.files import atomic_path

REQUIRED_KEY_FIELDS = ("dataset", "split", "resolution")
CACHE_FORMAT = 2  # bump when the file layout or the key changes, so old files are not misread
BUILTIN_LOCATIONS = {"digits": "sklearn.datasets.load_digits"}  # datasets in a library, not in a folder


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


def data_location(dataset: str, data_root: str | Path) -> str:
    """Where a dataset's images come from, for the reference key's `location`: the resolved data_root, or the
    library of a built-in dataset (whose data_root is ignored)."""
    return BUILTIN_LOCATIONS.get(dataset) or str(Path(data_root).expanduser().resolve())


def content_fingerprint(images: torch.Tensor) -> str:
    """A SHA-256 (hex, 16 digits) of images' shape, dtype and bytes, e.g. the uint8 (N, 3, R, R) real set."""
    digest = hashlib.sha256(f"{tuple(images.shape)} {images.dtype}".encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def reference_path(
    cache_dir: str | Path, reference_key: dict[str, object], *, n_real: int, extractor: str, fingerprint: str
) -> Path:
    """Cache file of the reference statistics for these fields (reference_key must name dataset, split,
    resolution and should name the `location`; any further fields, e.g. a subset, also enter the hash).
    fingerprint: `content_fingerprint` of the real images the statistics are computed from."""
    check_reference_key(reference_key)
    fields = {**reference_key, "n_real": int(n_real), "extractor": extractor, "fingerprint": fingerprint,
              "format": CACHE_FORMAT}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]
    dataset, split, resolution = (reference_key[field] for field in REQUIRED_KEY_FIELDS)
    readable = f"{dataset}-{split}-{resolution}px-n{n_real}-{extractor}"
    return Path(cache_dir).expanduser() / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', readable)}-{digest}.npz"


def save_reference(path: Path, stats: ReferenceStatistics) -> None:
    """Write atomically: readers see the previous file or this one whole, never a part."""
    with atomic_path(path) as partial, partial.open("wb") as file:
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
