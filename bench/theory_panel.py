"""The cost of the theory panel (trainables.diagnostics.theory_metrics at every logging step,
ConvOperatorProbe at every evaluation) against one training iteration and against the logging step without it.

Per variant, on a trial built as train() builds it (bench/iteration_time.py's trainee: standard CNN at 32 px,
random real images on the device), in interleaved rounds: one training iteration, the logging step's
diagnostics that were there before the panel (spectral_metrics and ‖∇ₓD‖ on real and fake), the panel's
logging-step part, and the conv operator's σ from a warm start. Each row is the median of its rounds.
`per log_every` is the panel's share of the training time between two logging steps.

    python bench/theory_panel.py                          # CUDA if available, else CPU
    python bench/theory_panel.py --width 0.25 --variants sn bssn --log-every 50
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from bench.iteration_time import (
    Trainee,
    device_name,
    int_at_least,
    make_trainee,
    synchronize,
    training_iteration,
)
from trainables.config import VARIANTS, TrialConfig
from trainables.diagnostics import input_gradient_norms, spectral_metrics, theory_metrics

PARTS = ("iteration", "logging before", "theory (logging)", "sigma_conv (eval)")


def parts(t: Trainee, real: torch.Tensor) -> dict[str, Callable[[], object]]:
    """What each timed part runs on the trainee."""
    d = t.trial.discriminator
    return {
        "iteration": lambda: training_iteration(t, real),
        "logging before": lambda: (spectral_metrics(d), input_gradient_norms(d, real, "x"),
                                   input_gradient_norms(d, real, "y")),
        "theory (logging)": lambda: theory_metrics(d),
        "sigma_conv (eval)": t.trial.conv_operator,
    }


def time_parts(trainees: list[Trainee], real: torch.Tensor, *, warmup: int,
               iters: int) -> dict[str, dict[str, float]]:
    """Median seconds of each part of each trainee over `iters` interleaved rounds after `warmup`."""
    seconds = {t.variant: {part: [] for part in PARTS} for t in trainees}
    for round_ in range(warmup + iters):
        for t in trainees:
            for part, run in parts(t, real).items():
                synchronize(real.device)
                start = time.perf_counter()
                run()
                synchronize(real.device)
                if round_ >= warmup:
                    seconds[t.variant][part].append(time.perf_counter() - start)
    return {variant: {part: statistics.median(values) for part, values in by_part.items()}
            for variant, by_part in seconds.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=float, default=1.0, help="1.0 is the paper's network (default)")
    parser.add_argument("--batch-size", type=int_at_least(2), default=64)
    parser.add_argument("--n-dis", type=int_at_least(1), default=1)
    parser.add_argument("--log-every", type=int_at_least(1), default=TrialConfig().log_every,
                        help="iterations per logging step, for the share column (default: the config's)")
    parser.add_argument("--warmup", type=int_at_least(0), default=1)
    parser.add_argument("--iters", type=int_at_least(1), default=5)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        default=["none", "sn", "bssn", "strict_sn"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = TrialConfig(architecture="standard_cnn", resolution=32, width=args.width,
                         batch_size=args.batch_size, n_dis=args.n_dis)
    trainees = [make_trainee(v, config, device) for v in dict.fromkeys(args.variants)]
    real = torch.rand(args.batch_size, 3, 32, 32, device=device) * 2 - 1
    for t in trainees:
        t.trial.conv_operator()  # the first evaluation's cold start, left out: later ones start warm
    seconds = time_parts(trainees, real, warmup=args.warmup, iters=args.iters)

    print(f"device: {device} ({device_name(device)}); torch {torch.__version__}")
    print(f"standard_cnn 32 px, width {args.width}, batch {args.batch_size}, n_dis {args.n_dis}; median of "
          f"{args.iters} rounds after {args.warmup}; share per logging step every {args.log_every} "
          "iterations")
    print(f"{'variant':<12} {'iteration ms':>12} {'logging ms':>11} {'theory ms':>10} {'÷ iteration':>12} "
          f"{'÷ logging':>10} {'per log_every':>14} {'sigma_conv ms':>14}")
    for variant, s in seconds.items():
        theory = s["theory (logging)"]
        print(f"{variant:<12} {1000 * s['iteration']:>12.1f} {1000 * s['logging before']:>11.1f} "
              f"{1000 * theory:>10.2f} {theory / s['iteration']:>12.3f} "
              f"{theory / s['logging before']:>10.3f} "
              f"{theory / (args.log_every * s['iteration']):>13.2%} {1000 * s['sigma_conv (eval)']:>14.1f}")


if __name__ == "__main__":
    main()
