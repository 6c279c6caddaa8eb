"""One trial's speed, and what FID-10k costs at the paper's schedule (not a timed test: prints figures).

    python bench/trial_throughput.py [--device cuda] [--iters 200] [--inception-images 1000] [--no-fid]

1. `train()` of the standard CNN at 32 px, batch 64, for `sn` and `bssn`, eager and with `compile: true` (the
   fast trial), in one run: iterations per second (one iteration = n_dis D steps + 1 G step), read from the
   trial's own `it_per_s` reports after a warm-up window (which holds the compilation), and their ratio.
2. One FID-10k evaluation by the trial's own path (bench/evaluation.py's `fid_seconds`: generating the
   images plus torch-fidelity's Inception on them, timed on `--inception-images` and scaled to 10k, with
   random Inception weights, which cost the same as the real ones; plus the 2048-d statistics and Fréchet
   distance). The real statistics are cached and not counted. Printed as a share of the training time
   between two evaluations (10k iterations apart).
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from evaluation import fid_seconds
from iteration_time import device_name

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
    print(f"device: {device_name(device)}; torch {torch.__version__}; standard CNN 32 px, "
          f"width {args.width}, batch {args.batch_size}, n_dis {args.n_dis}")

    speeds = {}
    for variant in ("sn", "bssn"):
        speeds[variant] = trial_speed(variant, args, device)
        fast = trial_speed(variant, args, device, compiled=True)
        print(f"  {variant:5s} eager {speeds[variant]:8.2f} it/s; compiled {fast:8.2f} it/s; "
              f"ratio {fast / speeds[variant]:5.2f}x (goal on an H100: >= 4x)")
    if args.no_fid:
        return
    evaluation = fid_seconds(device, args.inception_images, FID_GENERATED)
    print(f"FID-10k evaluation: {evaluation:.1f} s")
    for variant, speed in speeds.items():
        between = PAPER_EVAL_EVERY / speed
        print(f"  {variant:5s} training between evaluations {between:9.1f} s; evaluation share "
              f"{evaluation / (between + evaluation):6.1%} (goal <= 10%)")


if __name__ == "__main__":
    main()
