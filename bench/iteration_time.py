"""Time one training iteration per discriminator normalization, as a ratio to `none` timed in the same run.

One iteration is train()'s own, without its logging steps: `trainables.trial.train_iteration` over train.py's
`SingleStep` on a trial built by `Trial.build` (n_dis D steps: G's samples without gradients, one D forward
on real and fake together, hinge loss, Adam, the power-iteration update; one G step through frozen D;
the device-side divergence monitor after each). Standard CNN at 32 px, batch 64, random real images already
on the device (no data loading). Every variant's networks start from the same seed. `torch_sn` is the
reference row: PyTorch's stock torch.nn.utils.parametrizations.spectral_norm on every Conv2d and Linear of D.

The variants are timed in interleaved rounds (one iteration of each per round, in a rotating order), so that a
slow spell of a shared machine hits them all alike; each row is the median of its timed iterations.

    python bench/iteration_time.py                              # CUDA if available, else CPU
    python bench/iteration_time.py --n-dis 1 --iters 3 --variants none sn bsn torch_sn
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainables.config import VARIANTS, TrialConfig
from trainables.data import load_images
from trainables.train import SingleStep
from trainables.trial import Trial, build_evaluation, train_iteration

ARCHITECTURE, RESOLUTION = "standard_cnn", 32
REFERENCE = "torch_sn"  # PyTorch's stock spectral norm, for scale
CHOICES = (*VARIANTS, REFERENCE)


@dataclass
class Trainee:
    """One variant's trial (its networks, optimisers, latents and monitor) and the step train() runs on it."""

    variant: str
    trial: Trial
    step: SingleStep


def make_trainee(variant: str, config: TrialConfig, device: torch.device) -> Trainee:
    """A trial built as train() builds it; `torch_sn`: none of our normalizations, PyTorch's stock SN."""
    cfg = config.model_copy(update={"variant": "none" if variant == REFERENCE else variant,
                                    "device": str(device)})
    workdir = Path("unused-bench-workdir")  # never created: only logging steps write, and none runs
    source = load_images("digits", "", RESOLUTION)
    trial = Trial.build(cfg, lambda metrics, checkpoint_dir=None: None, source, build_evaluation(cfg, source),
                        workdir=workdir, checkpoint_dir=workdir)
    if variant == REFERENCE:  # the parametrization keeps the Parameter objects Adam already holds
        for layer in list(trial.discriminator.modules()):
            if isinstance(layer, nn.Conv2d | nn.Linear):
                torch.nn.utils.parametrizations.spectral_norm(layer)
    return Trainee(variant, trial, SingleStep(trial))


def training_iteration(t: Trainee, real: torch.Tensor) -> None:
    """One iteration of train()'s loop on real images (B, 3, R, R) in [-1, 1]: its step, without logging."""
    train_iteration(t.step, t.trial.monitor, t.trial.config, 1, lambda: real, t.trial.latents)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(trainees: list[Trainee], real: torch.Tensor, *, warmup: int,
                  iters: int) -> dict[str, float]:
    """Median seconds per iteration of each trainee, over `iters` interleaved rounds after `warmup` rounds."""
    seconds: dict[str, list[float]] = {t.variant: [] for t in trainees}
    for round_ in range(warmup + iters):
        shift = round_ % len(trainees)
        for t in trainees[shift:] + trainees[:shift]:  # rotating order: no variant always runs first
            synchronize(real.device)
            start = time.perf_counter()
            training_iteration(t, real)
            synchronize(real.device)
            if round_ >= warmup:
                seconds[t.variant].append(time.perf_counter() - start)
    return {variant: statistics.median(values) for variant, values in seconds.items()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []
    model = models[0] if models else (platform.processor() or platform.machine())
    return f"{model}; torch threads: {torch.get_num_threads()}"


def int_at_least(low: int):
    """An argparse type: an integer >= low."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"  # argparse names the type in its error for non-integers
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--n-dis", type=int_at_least(1), default=5, help="D steps per G step (default 5)")
    parser.add_argument("--width", type=float, default=1.0,
                        help="channel multiplier; 1.0 is the paper's network (default)")
    parser.add_argument("--batch-size", type=int_at_least(2), default=64,
                        help="images per batch, >= 2 for G's batch norm (default 64)")
    parser.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--iters", type=int_at_least(1), default=10, help="timed rounds (default 10)")
    parser.add_argument("--variants", nargs="+", choices=CHOICES, default=list(CHOICES), metavar="VARIANT",
                        help=f"variants to time; 'none' is always added (choices: {', '.join(CHOICES)})")
    parser.add_argument("--threads", type=int_at_least(1), default=torch.get_num_threads(),
                        help="CPU threads for torch (default: torch's own choice)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = TrialConfig(architecture=ARCHITECTURE, resolution=RESOLUTION, width=args.width,
                         batch_size=args.batch_size, n_dis=args.n_dis)
    variants = ["none"] + [v for v in dict.fromkeys(args.variants) if v != "none"]
    trainees = [make_trainee(v, config, device) for v in variants]
    real = torch.rand(args.batch_size, 3, RESOLUTION, RESOLUTION, device=device) * 2 - 1
    seconds = time_variants(trainees, real, warmup=args.warmup, iters=args.iters)

    print(f"device: {device} ({device_name(device)}); torch {torch.__version__}")
    print(f"{ARCHITECTURE} {RESOLUTION} px, width {args.width}, batch {args.batch_size}, n_dis {args.n_dis}, "
          f"hinge, Adam; median of {args.iters} iterations after {args.warmup} warm-up rounds")
    print(f"{'variant':<16} {'ms/iteration':>12} {'it/s':>8} {'ratio to none':>14}")
    for variant in variants:
        ms = 1000 * seconds[variant]
        print(f"{variant:<16} {ms:>12.1f} {1000 / ms:>8.2f} {seconds[variant] / seconds['none']:>14.2f}")


if __name__ == "__main__":
    main()
