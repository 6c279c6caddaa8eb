"""What one FID evaluation costs, generation included: ours against torch-fidelity's own path.

    python bench/evaluation.py                          # CUDA if available: FID-50k; CPU: 100 images, scaled
    python bench/evaluation.py --images 2000 --no-baseline

Both paths generate `--images` images with the standard CNN generator at 32 px (width 1.0) and take
torch-fidelity's TF-compatible InceptionV3 features of them, built with random weights (the real ones cost the
same and cannot be downloaded here), against the same 2048-d reference statistics (a trial has them cached;
not timed):

- ours: the steps of `trainables.metrics.Evaluator` (features in batches of 500 on CUDA, Inception in
  channels_last, kept on the device; FID's float64 statistics and distance there against the reference's
  square root computed once) and, at 50k images, one whole call of an Evaluator as a trial makes it;
- torch-fidelity's: its generative-model loop (batch 64, features to the CPU per batch, Inception in its
  own layout), its statistics and its eigenvalue formula on the CPU.

With fewer images than 50k the feature time is also scaled to 50k; the statistics and distance are timed at
full size (50k generated features) whatever --images is.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from iteration_time import device_name, synchronize
from torch_fidelity import GenerativeModelModuleWrapper
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.utils import get_featuresdict_from_generative_model

from trainables.metrics import Evaluator, FrechetReference
from trainables.metrics.inception import INCEPTION_FILE, build_extractor, generated_features
from trainables.networks import build_generator

FULL = 50_000
Z_DIM = 128
FEATURES = 2048


def random_inception_weights(folder: Path) -> Path:
    """torch-fidelity's InceptionV3 state_dict of a random network (its loading switched off)."""
    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: None),
        mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
    ):
        network = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = folder / INCEPTION_FILE
    torch.save(network.state_dict(), path)
    return path


class GeneratorImages(torch.nn.Module):
    """The trial's evaluation generator: latents -> G -> uint8 images, as train.py's `evaluate` makes them;
    also torch-fidelity's generative model (z_size 128, normal noise)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.generator = build_generator("standard_cnn", 32, z_dim=Z_DIM).to(device).eval()
        self.device = device

    @torch.no_grad()
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return ((self.generator(z.to(self.device)) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def draw(self, batch: int) -> torch.Tensor:
        return self(torch.randn(batch, Z_DIM, device=self.device))


def timed(step, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def reference_statistics() -> tuple[np.ndarray, np.ndarray]:
    """A full-rank 2048-d reference Gaussian (its values do not change the cost)."""
    features = torch.randn(4 * FEATURES, FEATURES, generator=torch.Generator().manual_seed(0))
    stats = fid_features_to_statistics(features)
    return stats["mu"], stats["sigma"]


def our_parts(extractor, images: GeneratorImages, device: torch.device, n_images: int,
              reference: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Seconds of our feature loop at n_images, and of our statistics + distance on 50k features."""
    features = timed(lambda: generated_features(extractor, images.draw, n_images, device), device)
    fid_reference = FrechetReference(*reference, device)  # once per trial: not counted
    full = torch.randn(FULL, FEATURES, device=device)
    distance = timed(lambda: fid_reference.distance_to_features(full), device)
    return {"features": features, "distance": distance}


def torch_fidelity_parts(extractor, images: GeneratorImages, device: torch.device, n_images: int,
                         reference: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Seconds of torch-fidelity's own feature loop at n_images, and of its statistics + formula on 50k."""
    model = GenerativeModelModuleWrapper(images, Z_DIM, "normal", 0)
    features = timed(lambda: get_featuresdict_from_generative_model(
        model, extractor, n_images, 64, device.type == "cuda", 0, verbose=False), device)
    full = torch.randn(FULL, FEATURES)
    mu, sigma = reference
    distance = timed(lambda: fid_statistics_to_metric(fid_features_to_statistics(full),
                                                      {"mu": mu, "sigma": sigma}, verbose=False), device)
    return {"features": features, "distance": distance}


def end_to_end(weights: Path, images: GeneratorImages, device: torch.device, workdir: Path) -> float:
    """Seconds of one FID-50k call of a trial's Evaluator (not counted: its construction, real statistics)."""
    real = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)
    evaluator = Evaluator(("fid",), real_images=real, n_generated=FULL, n_real=64, cache_dir=workdir,
                          reference_key={"dataset": "noise", "split": "train", "resolution": 32},
                          inception_weights=weights, device=device)
    return timed(lambda: evaluator(images.draw), device)


def fid_seconds(device: torch.device, n_images: int, scaled_to: int) -> float:
    """Seconds of one FID evaluation of `scaled_to` images by our path, timed on n_images (features) and
    50k features (statistics + distance): for trial_throughput.py's evaluation share."""
    with tempfile.TemporaryDirectory() as workdir:
        extractor = build_extractor(random_inception_weights(Path(workdir)), ("fid",), device)
        images = GeneratorImages(device)
        generated_features(extractor, images.draw, 8, device)  # warm-up
        parts = our_parts(extractor, images, device, n_images, reference_statistics())
    return parts["features"] * scaled_to / n_images + parts["distance"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, help="images generated and featurised (default: 50000 on CUDA, "
                                                    "100 on the CPU)")
    parser.add_argument("--no-baseline", action="store_true", help="time ours only")
    args = parser.parse_args()
    device = torch.device(args.device)
    n_images = args.images or (FULL if device.type == "cuda" else 100)
    print(f"device: {device_name(device)}; torch {torch.__version__}; FID of the standard CNN generator at "
          f"32 px, {n_images} images timed, scaled to {FULL}")
    reference = reference_statistics()
    with tempfile.TemporaryDirectory() as workdir:
        weights = random_inception_weights(Path(workdir))
        extractor = build_extractor(weights, ("fid",), device)
        images = GeneratorImages(device)
        generated_features(extractor, images.draw, 8, device)  # warm-up: cuDNN's algorithm choice, allocator
        paths = {"ours": our_parts(extractor, images, device, n_images, reference)}
        if not args.no_baseline:
            own_layout = build_extractor(weights, ("fid",), device).to(memory_format=torch.contiguous_format)
            paths["torch-fidelity"] = torch_fidelity_parts(own_layout, images, device, n_images, reference)
        if n_images == FULL:
            print(f"  ours, one FID-50k call of a trial's Evaluator: "
                  f"{end_to_end(weights, images, device, Path(workdir)):.1f} s (goal on an H100: <= 12 s)")
    totals = {}
    for path, parts in paths.items():
        totals[path] = parts["features"] * FULL / n_images + parts["distance"]
        print(f"  {path:15s} generation + features: {n_images / parts['features']:8.1f} img/s; statistics + "
              f"distance of 50k: {parts['distance']:6.2f} s; FID-50k {totals[path]:8.1f} s")
    if len(totals) == 2:
        print(f"  ratio torch-fidelity / ours: {totals['torch-fidelity'] / totals['ours']:.2f}x")


if __name__ == "__main__":
    main()
