"""FID, IS and KID through torch-fidelity's TF-compatible InceptionV3 (`inception-v3-compat`).

torch-fidelity does the work: its feature extractor (uint8 input, its own TF-exact resize to 299 px), its
feature loop over a Dataset (the real images), and its statistics and IS / KID functions. This module adds
what a training loop needs around them: the weights found (or downloaded) up front with a clear error when
they cannot be; real-image statistics from our own cache (reference.py) rather than torch-fidelity's pickled
one; and an evaluation that stays on the device: the generated images' features are gathered there in large
batches, and FID's statistics and distance are computed there in float64 against the reference's square root
computed once (frechet.FrechetReference). torch-fidelity's statistics and general eigenvalue problem of
sigma1·sigma2 run on the CPU: 3.7 s of a FID-10k on 2 cores, more than the Inception passes of all 10k
images take on an H100 (2.1 s at 4,731 img/s). Steps: images -> features -> statistics -> metric.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.hub
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from trainables.metrics.frechet import FrechetReference
from trainables.metrics.reference import ReferenceStatistics

EXTRACTOR = "inception-v3-compat"
FEATURE_LAYER = {"fid": "2048", "kid": "2048", "is": "logits_unbiased"}  # torch-fidelity's defaults
INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]  # weights-inception-2015-12-05-6726825d.pth
INCEPTION_SHA256_PREFIX = INCEPTION_FILE.rsplit("-", 1)[1].removesuffix(".pth")  # as torch.hub names files
# Images per Inception forward: torch-fidelity's default on the CPU; on a GPU, batch 64 leaves it mostly idle.
BATCH_SIZE = {"cpu": 64, "cuda": 500}
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults; the size shrinks to fit small sets
IS_SPLITS = 10
CONNECT_TIMEOUT_S = 10.0  # how long a missing-weights download may take to reach the server before we give up


class InceptionWeightsMissingError(FileNotFoundError):
    """The InceptionV3 weights for FID/IS/KID are neither on disk nor downloadable."""


def hub_weights_path() -> Path:
    """Where torch.hub (and so torch-fidelity) keeps the weights: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _missing_message(expected: Path, reason: str, url: str) -> str:
    return (
        f"FID/IS/KID need torch-fidelity's InceptionV3 weights, expected at {expected} ({reason}). "
        f"Download {url} (sha256 starts with {INCEPTION_SHA256_PREFIX}) on a machine with internet, then "
        f"either copy it to {hub_weights_path()} (the torch hub cache; set TORCH_HOME to move it) or set the "
        f"trial config field `inception_weights` to its path. Without the weights, use the offline surrogate "
        f"`fd_digits` (metrics: [fd_digits]) instead."
    )


def _server_unreachable(url: str, timeout_s: float) -> str | None:
    """None when `url` answers within timeout_s, else why not; in a thread, because DNS ignores timeouts."""
    outcome: list[str | None] = [f"no answer within {timeout_s:g} s"]

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
                outcome[0] = None
        except (urllib.error.URLError, OSError) as exc:
            outcome[0] = f"download failed: {exc}"

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0]


def resolve_inception_weights(
    inception_weights: str | Path | None,
    *,
    url: str = INCEPTION_URL,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
) -> Path:
    """The InceptionV3 weights file, or InceptionWeightsMissingError within about connect_timeout_s.

    A configured path must exist (nothing is downloaded for it). Without one, the torch hub cache is used,
    and the file is downloaded there (hash-checked) when missing and the server answers in time.
    """
    if inception_weights is not None:
        path = Path(inception_weights).expanduser()
        if path.is_file():
            return path
        raise InceptionWeightsMissingError(
            _missing_message(path, "the file set by `inception_weights` does not exist", url)
        )
    path = hub_weights_path()
    if path.is_file():
        return path
    reason = _server_unreachable(url, connect_timeout_s)
    if reason is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(
                url, str(path), hash_prefix=INCEPTION_SHA256_PREFIX, progress=False
            )
            return path
        except (OSError, RuntimeError) as exc:  # RuntimeError: the hash did not match
            reason = f"download failed: {exc}"
    raise InceptionWeightsMissingError(_missing_message(path, f"not in the torch hub cache; {reason}", url))


def check_inception_weights(path: Path) -> None:
    """InceptionWeightsMissingError unless `path` is torch-fidelity's file: its sha256 starts with
    INCEPTION_SHA256_PREFIX, as torch.hub checks a download (a fraction of a second for its 91 MB)."""
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        raise InceptionWeightsMissingError(_missing_message(
            path, f"the file there is another one: its sha256 starts with {digest[:8]}", INCEPTION_URL))


def build_extractor(
    weights: Path, names: tuple[str, ...], device: torch.device
) -> FeatureExtractorInceptionV3:
    """torch-fidelity's InceptionV3 with the layers the metric names need, loaded from `weights`."""
    layers = sorted({FEATURE_LAYER[name] for name in names if name in FEATURE_LAYER})
    try:
        with _on(device):
            extractor = create_feature_extractor(
                EXTRACTOR,
                layers,
                cuda=device.type == "cuda",
                feature_extractor_weights_path=str(weights),
                verbose=False,
            )
    except (
        RuntimeError,
        TypeError,
        OSError,
        pickle.UnpicklingError,
    ) as exc:  # wrong keys/shapes, not a torch file
        raise ValueError(
            f"inception_weights: {weights} does not load as torch-fidelity's InceptionV3 state_dict "
            f"(expected {INCEPTION_FILE} from {INCEPTION_URL}): {exc}"
        ) from exc
    if device.type == "cuda":  # NHWC: cuDNN's tensor-core convolutions run without layout conversions
        extractor.to(memory_format=torch.channels_last)
    return extractor


class _ImageTensorDataset(torch.utils.data.Dataset):
    """A uint8 (N, 3, R, R) tensor as the Dataset of (3, R, R) tensors torch-fidelity iterates over."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def real_features(
    extractor: FeatureExtractorInceptionV3, images: torch.Tensor, device: torch.device
) -> np.ndarray:
    """Pool features (N, 2048) float32 of real uint8 images (N, 3, R, R)."""
    with _on(device):
        featuresdict = get_featuresdict_from_dataset(
            _ImageTensorDataset(images),
            extractor,
            BATCH_SIZE[device.type],
            device.type == "cuda",
            save_cpu_ram=True,
            verbose=False,  # save_cpu_ram: no DataLoader worker processes
        )
    return featuresdict[FEATURE_LAYER["fid"]].numpy()


def reference_statistics(features: np.ndarray) -> ReferenceStatistics:
    """FID's statistics exactly as torch-fidelity computes them (float32 mean, float64 covariance)."""
    stats = fid_features_to_statistics(torch.from_numpy(features))
    return ReferenceStatistics(mu=stats["mu"], sigma=stats["sigma"], features=features)


@torch.no_grad()
def generated_features(
    extractor: FeatureExtractorInceptionV3,
    generate: Callable[[int], torch.Tensor],
    n_generated: int,
    device: torch.device,
    *,
    keep: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """torch-fidelity's features of n_generated images from `generate(b) -> (b, 3, R, R) uint8`, batch by
    batch, kept on `device` (no host round trip per batch): {'2048': (n, 2048), 'logits_unbiased': (n, 1008)}
    for the layers the extractor was built with. As torch-fidelity's own generative-model loop, which draws
    latents the generator here draws itself.

    keep: how many images' features each layer keeps, the first ones drawn ({'2048': 10_000,
    'logits_unbiased': 50_000}: FID's 10k and IS's 50k from one pass of 50k); None: all n_generated.
    """
    keep = keep or {}
    batches: dict[str, list[torch.Tensor]] = {}
    batch_size = BATCH_SIZE[device.type]
    with _on(device):
        for start in range(0, n_generated, batch_size):
            images = generate(min(batch_size, n_generated - start)).to(device)
            features = extractor.convert_features_tuple_to_dict(extractor(images))
            for layer, value in features.items():
                wanted = keep.get(layer, n_generated) - start
                if wanted > 0:
                    batches.setdefault(layer, []).append(value[:wanted])
    return {layer: torch.cat(values) for layer, values in batches.items()}


def metrics_from_features(
    names: tuple[str, ...], generated: dict[str, torch.Tensor], reference: ReferenceStatistics | None,
    fid_reference: FrechetReference | None,
) -> dict[str, float]:
    """FID (against fid_reference, the reference statistics with their square root computed once, on the
    features' device), IS (mean over splits) and KID (mean over subsets) by torch-fidelity, for the names."""
    out: dict[str, float] = {}
    if "fid" in names:
        out["fid"] = fid_reference.distance_to_features(generated[FEATURE_LAYER["fid"]])
    if "is" in names:
        logits = generated[FEATURE_LAYER["is"]].cpu()
        out["is"] = isc_features_to_metric(logits, splits=inception_score_splits(logits.shape[0]))[
            KEY_METRIC_ISC_MEAN
        ]
    if "kid" in names:
        fake, real = generated[FEATURE_LAYER["kid"]].cpu(), torch.from_numpy(reference.features)
        subset_size = min(KID_SUBSET_SIZE, fake.shape[0], real.shape[0])
        out["kid"] = kid_features_to_metric(
            fake, real, kid_subsets=KID_SUBSETS, kid_subset_size=subset_size, verbose=False
        )[KEY_METRIC_KID_MEAN]
    return out


def inception_score_splits(n: int) -> int:
    """10 splits (the standard); fewer for tiny sets, since a one-image split always scores exactly 1."""
    return min(IS_SPLITS, max(1, n // 2))


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """torch-fidelity moves work with `.cuda()`, i.e. to the current CUDA device: make that `device`."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
