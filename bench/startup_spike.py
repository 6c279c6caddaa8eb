"""The start-up gradient spike of SN-family trials at a large learning rate, measured (issue 12).

Runs train()'s own iteration (trainables.trial.train_iteration over train.py's SingleStep, on a trial built
by Trial.build: hinge loss, n_dis 1, the trial's seeding) for the first iterations and prints, per
iteration, D's and G's total gradient norms and how far the σ each step divides by is from the exact σ of
D's layers: max and product over layers of exact σ / σ used (1 = exact; 947 means W/σ is 947 times too
large over D's layers). Two starts of the power iteration:

  official  this project's order, fjxmlzn/BSN's: each D forward (D step and G step) runs one step from the
            stored u without storing it; the stored u advances one step after D's optimiser step, on the
            new weights (`spectral_norm_update_ops`); u starts random, with no warm-up
  warm15    the same after 15 power-iteration steps at registration (PyTorch's parametrizations.spectral_norm)

Measured before the project took the official order (G's step then divided by σ from u, v frozen at the
weights before D's step): in the reported case ×947 in G's step at iteration 1, |∇G| 5.6e5, |∇D| 1.4e5.

    python bench/startup_spike.py            # the reported case, both starts
    python bench/startup_spike.py --sweep    # digits / MNIST format x none, sn, bssn x beta1 x seeds

Data: the built-in digits, or load_digits written as MNIST's raw idx files at 28 px (bilinear) and read by
the `mnist` loader, the reporter's 28x28 grayscale setting.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from trainables import normalization
from trainables.config import parse_config
from trainables.normalization import advance_power_iterations
from trainables.train import SingleStep
from trainables.trial import Trial, build_evaluation, train_iteration, training_images

ORDERS = ("official", "warm15")


def write_mnist(root: Path) -> None:
    """load_digits at 28 px (bilinear) as MNIST's raw idx files under root/MNIST/raw."""
    digits = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16
    images = F.interpolate(digits, size=28, mode="bilinear", align_corners=False) * 255
    images = images.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    labels = load_digits().target.astype(np.uint8)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, array in {"train-images-idx3-ubyte": images, "train-labels-idx1-ubyte": labels,
                        "t10k-images-idx3-ubyte": images[:10], "t10k-labels-idx1-ubyte": labels[:10]}.items():
        header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
        (raw / name).write_bytes(header + array.tobytes())


def run(dataset: str, root: Path, variant: str, scale: float, beta1: float, seed: int, order: str, *,
        lr: float = 1e-2, iterations: int = 10, width: float = 0.125, batch: int = 64) -> list[tuple]:
    """Per iteration: (|∇D|, |∇G|, D-step σ error (max, prod), G-step σ error (max, prod))."""
    cfg = parse_config({"dataset": dataset, "data_root": str(root), "variant": variant, "scale": scale,
                        "beta1": beta1, "seed": seed, "g_lr": lr, "d_lr": lr, "width": width,
                        "batch_size": batch, "iterations": iterations, "device": "cpu",
                        "metrics": ["fd_digits"], "cache_dir": str(root / "cache")})
    source = training_images(cfg)
    unused = root / "unused"  # never created: only logging steps write, and none runs
    trial = Trial.build(cfg, lambda metrics, checkpoint_dir=None: None, source, build_evaluation(cfg, source),
                        workdir=unused, checkpoint_dir=unused)
    if order == "warm15":
        for _ in range(15):
            advance_power_iterations(trial.discriminator)
    ratios: list[float] = []  # exact σ / the σ each SpectralNormalization forward divided by

    def record(module, args, output):
        weight, normalized = args[0].detach(), output.detach().flatten()
        i = int(weight.flatten().abs().argmax())
        exact = [float(normalization._exact_sigma(weight, e.row_dim)) for e in module.estimators.values()]
        ratios.append(sum(exact) / len(exact) / (module.scale * float(weight.flatten()[i] / normalized[i])))

    layers = [m for m in trial.discriminator.modules() if isinstance(m, normalization.SpectralNormalization)]
    for module in layers:
        module.register_forward_hook(record)
    step, rows = SingleStep(trial), []
    for iteration in range(1, iterations + 1):
        ratios.clear()
        _, d, g = train_iteration(step, trial.monitor, cfg, iteration, trial.sampler.next, trial.latents)
        d_ratios, g_ratios = ratios[:len(layers)], ratios[len(layers):]  # n_dis 1: D's step, then G's
        rows.append((float(d.grad_norm), float(g.grad_norm), max(d_ratios, default=1.0), math.prod(d_ratios),
                     max(g_ratios, default=1.0), math.prod(g_ratios)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", choices=("digits", "mnist"))
    parser.add_argument("--variant", default="bssn")
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--beta1", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="peaks over datasets, variants, beta1, seeds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_mnist(root)
        if not args.sweep:
            for order in ORDERS:
                print(f"# {args.dataset} {args.variant} c={args.scale} beta1={args.beta1} seed={args.seed} "
                      f"lr={args.lr}: {order}")
                rows = run(args.dataset, root, args.variant, args.scale, args.beta1, args.seed, order,
                           lr=args.lr, iterations=args.iterations)
                for it, (gd, gg, dmax, dprod, gmax, gprod) in enumerate(rows, start=1):
                    print(f"it {it:2d}  |grad D| {gd:9.3g}  |grad G| {gg:9.3g}  sigma error in D's step: max "
                          f"{dmax:6.3f} prod {dprod:7.3g}  in G's step: max {gmax:6.3f} prod {gprod:7.3g}")
            return
        print(f"lr {args.lr}: peak |grad D|, |grad G| over iterations 1-3 @ iteration; median of 4-"
              f"{args.iterations}")
        variants = (("none", 1.0), ("sn", 1.0), ("bssn", 1.5))
        cases = itertools.product(("digits", "mnist"), variants, (0.0, 0.5), (0, 1))
        for dataset, (variant, scale), beta1, seed in cases:
            line = f"{dataset:6s} {variant:4s} c={scale} beta1={beta1} seed={seed}"
            for order in ORDERS if variant != "none" else ("official",):
                rows = run(dataset, root, variant, scale, beta1, seed, order, lr=args.lr,
                           iterations=args.iterations)
                peak_d = max(range(3), key=lambda i: rows[i][0])  # noqa: B023
                peak_g = max(range(3), key=lambda i: rows[i][1])  # noqa: B023
                median_d = statistics.median(r[0] for r in rows[3:])
                median_g = statistics.median(r[1] for r in rows[3:])
                line += (f" | {order}: D {rows[peak_d][0]:7.2g}@{peak_d + 1} G {rows[peak_g][1]:7.2g}@"
                         f"{peak_g + 1} median {median_d:5.2g}/{median_g:5.2g}")
            print(line, flush=True)


if __name__ == "__main__":
    main()
