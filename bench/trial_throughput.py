"""One trial's speed, and what FID-10k costs at the paper's schedule (not a timed test: prints figures).

    python bench/trial_throughput.py [--device cuda] [--iters 200] [--inception-images 1000] [--no-fid]

1. `train()` of the standard CNN at 32 px, batch 64, for `sn` and `bssn`, eager and with `compile: true` (the
   fast trial), in one run: iterations per second (one iteration = n_dis D steps + 1 G step), read from the
   trial's own `it_per_s` reports after a warm-up window (which holds the compilation), and their ratio.
2. One FID-10k evaluation: generating 10k images plus torch-fidelity's Inception forward on them (timed on
   `--inception-images` and scaled to 10k; the network is built with random weights, which costs the same as
   the real ones, so this runs offline), plus the 2048-d Fréchet distance. The real statistics are cached and
   not counted. Printed as a share of the training time between two evaluations (10k iterations apart).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from unittest import mock

import numpy as np
import torch
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from trainables.networks import build_generator
from trainables.train import resolve_device, train

PAPER_EVAL_EVERY = 10_000  # the official code's FID schedule, in generator iterations
FID_GENERATED = 10_000


def trial_speed(variant: str, args: argparse.Namespace, device: torch.device,
                compiled: bool = False) -> float:
    """Iterations per second of one trial after its first logging window (warm-up) is dropped."""
    speeds: list[float] = []
    config = {
        "variant": variant, "scale": 1.5 if variant == "bssn" else 1.0, "width": args.width,
        "batch_size": args.batch_size, "n_dis": args.n_dis, "iterations": args.iters,
        "log_every": args.iters // 4, "eval_every": 10 * args.iters, "checkpoint_every": 10 * args.iters,
        "eval_generated": 64, "eval_real": 64, "device": str(device), "compile": compiled,
    }
    with tempfile.TemporaryDirectory() as workdir:
        train(config, lambda metrics, checkpoint=None: speeds.append(metrics["it_per_s"]), workdir=workdir)
    return float(np.mean(speeds[1:]))


def inception_without_weights(device: torch.device) -> torch.nn.Module:
    """torch-fidelity's InceptionV3 (FID's 2048-d features) with random weights: same cost, no download."""
    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: None),
        mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
    ):
        network = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    return network.to(device).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def fid_cost(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Seconds for one FID-10k evaluation, by part."""
    generator = build_generator("standard_cnn", 32, width=args.width).to(device).eval()
    inception = inception_without_weights(device)
    batch, n = 500 if device.type == "cuda" else 50, args.inception_images
    def generate_batch() -> torch.Tensor:
        images = generator(torch.randn(batch, 128, device=device))
        return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    images = generate_batch()
    inception(images[:8])  # warm-up
    synchronize(device)

    start = time.perf_counter()
    for _ in range(FID_GENERATED // batch):
        generate_batch()
    synchronize(device)
    generate = time.perf_counter() - start

    features = []
    start = time.perf_counter()
    for _ in range(max(1, n // batch)):
        features.append(inception(images)[0].double().cpu())
    synchronize(device)
    extract = (time.perf_counter() - start) * FID_GENERATED / (max(1, n // batch) * batch)

    fake = torch.randn(FID_GENERATED, 2048, dtype=torch.float64).numpy()  # a full-size 2048-d sample
    real_stats = fid_features_to_statistics(torch.randn(5_000, 2048, dtype=torch.float64))
    start = time.perf_counter()
    fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(fake)), real_stats, verbose=False)
    frechet = time.perf_counter() - start
    return {"generate 10k": generate, "inception 10k": extract, "frechet 2048-d": frechet}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iters", type=int, default=40, help="generator iterations timed per variant")
    parser.add_argument("--n-dis", type=int, default=1, help="the paper's setting B: n_dis 1")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--inception-images", type=int, default=200,
                        help="images timed through Inception, scaled to 10k")
    parser.add_argument("--no-fid", action="store_true", help="time the trials only")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({torch.get_num_threads()} threads)")
    print(f"device: {name}; torch {torch.__version__}; standard CNN 32 px, width {args.width}, "
          f"batch {args.batch_size}, n_dis {args.n_dis}")

    speeds = {}
    for variant in ("sn", "bssn"):
        speeds[variant] = trial_speed(variant, args, device)
        fast = trial_speed(variant, args, device, compiled=True)
        print(f"  {variant:5s} eager {speeds[variant]:8.2f} it/s; compiled {fast:8.2f} it/s; "
              f"ratio {fast / speeds[variant]:5.2f}x (goal on an H100: >= 4x)")
    if args.no_fid:
        return
    parts = fid_cost(args, device)
    evaluation = sum(parts.values())
    print("FID-10k evaluation: " + ", ".join(f"{part} {seconds:.1f} s" for part, seconds in parts.items())
          + f"; total {evaluation:.1f} s")
    for variant, speed in speeds.items():
        between = PAPER_EVAL_EVERY / speed
        print(f"  {variant:5s} training between evaluations {between:9.1f} s; evaluation share "
              f"{evaluation / (between + evaluation):6.1%} (goal <= 10%)")


if __name__ == "__main__":
    main()
