"""Iterations per second of K trials packed into one batched computation against separate trials.

One iteration is n_dis D steps and one G step of every member, as train_pack() runs it
(`trainables.trial.train_iteration` over trainables.packing.PackedStep: vmap over stacked parameters, grouped
convolutions, a per-member Adam, the packed divergence monitor); a separate trial is train()'s own iteration
(bench/iteration_time.py's `training_iteration`: train.py's SingleStep, torch.optim.Adam). Neither runs its
logging steps. Standard CNN at 32 px, random
real images already on the device (no data loading, no logging steps). Separate trials run one after another,
so K of them together make as many iterations per second as one: the table shows that rate once and each
pack's rate summed over its members, as absolute it/s and as a ratio.

    python bench/packing.py                                   # CUDA if available, else CPU; K = 1 4 16 64
    python bench/packing.py --width 0.25 --batch-size 16 --packs 1 4 16 --iters 3   # a small CPU run
    python bench/packing.py --profile 16                      # also: where one packed iteration's time goes
    python bench/packing.py --fid-images 1000                 # also: FID-10k's share of a pack's time

With --fid-images, one FID-10k evaluation is timed by the trial's own path (bench/evaluation.py, timed on that
many images and scaled) and each pack's evaluation share at the paper's schedule is printed: every member is
evaluated every 10k of its iterations, one after another, so the share is f / (f + 10k / R) for a pack
making R iterations per second in all.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from evaluation import fid_seconds
from iteration_time import (
    RESOLUTION,
    device_name,
    int_at_least,
    make_trainee,
    synchronize,
    training_iteration,
)

from trainables.config import TrialConfig
from trainables.data import load_images
from trainables.events import StepMonitor
from trainables.packing import PackedStep
from trainables.trial import Trial, build_evaluation, train_iteration

PAPER_EVAL_EVERY = 10_000  # generator iterations between two evaluations of a member (the official code)


def member_configs(k: int, args: argparse.Namespace) -> list[TrialConfig]:
    """K members of one pack: the default trial at the benchmark's settings, seeds and lrs of a small grid."""
    lrs = (1e-4, 2e-4)
    return [TrialConfig(architecture="standard_cnn", resolution=RESOLUTION, width=args.width,
                        variant=args.variant, n_dis=args.n_dis, batch_size=args.batch_size, seed=i,
                        g_lr=lrs[i % 2], d_lr=lrs[(i // 2) % 2], device=args.device) for i in range(k)]


class Pack:
    """K member trials built as train_pack() builds them, their packed step and monitor."""

    def __init__(self, configs: list[TrialConfig]):
        workdir = Path("unused-bench-workdir")  # never created: only logging steps write, and none runs
        source = load_images("digits", "", RESOLUTION)
        evaluation = build_evaluation(configs[0], source)
        trials = [Trial.build(cfg, lambda metrics, checkpoint_dir=None: None, source, evaluation,
                              workdir=workdir, checkpoint_dir=workdir) for cfg in configs]
        self.config = configs[0]  # what the members share: n_dis, batch sizes
        self.step = PackedStep(trials)
        self.monitor = StepMonitor.stack([trial.monitor for trial in trials])


def packed_iteration(pack: Pack, real: torch.Tensor) -> None:
    """One iteration of train_pack()'s loop without logging; real: (K, B, 3, R, R)."""
    train_iteration(pack.step, pack.monitor, pack.config, 1, lambda: real, pack.step.latents)


def median_seconds(step, device: torch.device, warmup: int, iters: int) -> float:
    """Median wall-clock seconds of `step()` over `iters` calls after `warmup` untimed ones."""
    seconds = []
    for i in range(warmup + iters):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def profile_packed_iteration(pack: Pack, real: torch.Tensor, device: torch.device, rows: int = 20) -> None:
    """Print torch.profiler's table of one packed iteration (after a warm-up one), by self device time."""
    from torch.profiler import ProfilerActivity, profile

    packed_iteration(pack, real)
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        packed_iteration(pack, real)
        synchronize(device)
    events = prof.key_averages()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=rows))
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"aten ops called per packed iteration (all levels): {ops}")
    if device.type == "cuda":
        kernels = sum(e.count for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"device kernels per packed iteration: {kernels}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--variant", default="sn", help="D normalization (default sn)")
    parser.add_argument("--n-dis", type=int_at_least(1), default=5, help="D steps per G step (default 5)")
    parser.add_argument("--width", type=float, default=1.0,
                        help="channel multiplier; 1.0 is the paper's network (default)")
    parser.add_argument("--batch-size", type=int_at_least(2), default=64,
                        help="images per batch (default 64)")
    parser.add_argument("--packs", type=int_at_least(1), nargs="+", default=[1, 4, 16, 64],
                        help="pack sizes K (default 1 4 16 64)")
    parser.add_argument("--warmup", type=int_at_least(0), default=2,
                        help="untimed iterations first (default 2)")
    parser.add_argument("--iters", type=int_at_least(1), default=10, help="timed iterations (default 10)")
    parser.add_argument("--threads", type=int_at_least(1), default=torch.get_num_threads(),
                        help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--profile", type=int_at_least(1), metavar="K",
                        help="also profile one iteration of a pack of K members")
    parser.add_argument("--fid-images", type=int_at_least(2), metavar="N",
                        help="also time FID-10k on N images (scaled) and print each pack's evaluation share")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    trainee = make_trainee(args.variant, member_configs(1, args)[0], device)
    real = torch.rand(args.batch_size, 3, RESOLUTION, RESOLUTION, device=device) * 2 - 1
    separate = median_seconds(partial(training_iteration, trainee, real), device, args.warmup, args.iters)

    print(f"device: {device} ({device_name(device)}); torch {torch.__version__}")
    print(f"standard_cnn {RESOLUTION} px, {args.variant}, width {args.width}, batch {args.batch_size}, "
          f"n_dis {args.n_dis}, hinge, Adam, fp32; median of {args.iters} iterations after {args.warmup} "
          "warm-up")
    print(f"separate trials, one after another: {1 / separate:.2f} it/s summed, whatever their number")
    fid = None if args.fid_images is None else fid_seconds(device, args.fid_images, PAPER_EVAL_EVERY)
    if fid is not None:
        print(f"FID-10k evaluation (generation included): {fid:.1f} s per member")
    share_header = f" {'eval share':>10}" if fid is not None else ""
    print(f"{'K':>4} {'ms/pack iteration':>18} {'packed it/s (sum)':>18} {'separate it/s':>14} {'ratio':>7}"
          + share_header)
    for k in args.packs:
        pack = Pack(member_configs(k, args))
        stacked_real = real.expand(k, *real.shape).contiguous()
        seconds = median_seconds(partial(packed_iteration, pack, stacked_real), device, args.warmup,
                                 args.iters)
        share = "" if fid is None else f" {fid / (fid + PAPER_EVAL_EVERY * seconds / k):>10.1%}"
        print(f"{k:>4} {1000 * seconds:>18.1f} {k / seconds:>18.2f} {1 / separate:>14.2f} "
              f"{k * separate / seconds:>7.2f}" + share, flush=True)
        del pack, stacked_real
    if args.profile is not None:
        k = args.profile
        print(f"\nprofile of one packed iteration, K = {k}:")
        pack = Pack(member_configs(k, args))
        profile_packed_iteration(pack, real.expand(k, *real.shape).contiguous(), device)


if __name__ == "__main__":
    main()
