"""The start-up gradient spike of SN-family trials at a large learning rate, measured (issue 12).

Runs train.py's step (hinge loss, n_dis 1, the trial's seeding) for the first iterations and prints, per
iteration, D's and G's total gradient norms and how far the σ each step divides by is from the exact σ of
D's layers: max and product over layers of exact σ / σ used (1 = exact; 947 means W/σ is 947 times too large
over D's layers). Three ways to run the power iteration around the step:

  ours      this project (trainables.normalization + train.py): D's training forward runs one power-
            iteration step from the stored u and stores it; G's step evaluates D with u, v frozen (0 steps
            on the weights D's optimiser step has just changed)
  warm15    ours plus 15 power-iteration steps at registration (PyTorch's parametrizations.spectral_norm)
  official  fjxmlzn/BSN's order: each D forward (D step and G step) runs one step from the stored u without
            storing it; the stored u advances one step after D's optimiser step, on the new weights
            (`spectral_norm_update_ops`, run after `d_op` in gan.py's training loop)

    python bench/startup_spike.py            # the reported case, all three orders
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
from torch.nn.utils import parametrize

from trainables import normalization
from trainables.data import BatchSampler, load_images
from trainables.losses import discriminator_loss, generator_loss
from trainables.networks import build_discriminator, build_generator

ORDERS = ("ours", "warm15", "official")


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


def spectral_layers(discriminator):
    return [(module, next(p for p in module.parametrizations.weight
                          if isinstance(p, normalization.SpectralNormalization)))
            for module in discriminator.modules() if parametrize.is_parametrized(module, "weight")]


def sigma_error(layers, used: list[float]) -> tuple[float, float]:
    """(max, product) over layers of exact σ / the σ the forward divided by (BSN: means of both reshapes)."""
    ratios = []
    for (module, spectral), sigma in zip(layers, used, strict=True):
        weight = module.parametrizations.weight.original.detach()
        exact = [float(normalization._exact_sigma(weight, e.row_dim)) for e in spectral.estimators.values()]
        ratios.append(sum(exact) / len(exact) / sigma)
    return max(ratios, default=1.0), math.prod(ratios)


def run(dataset: str, root: Path, variant: str, scale: float, beta1: float, seed: int, order: str, *,
        lr: float = 1e-2, iterations: int = 10, width: float = 0.125, batch: int = 64) -> list[tuple]:
    """Per iteration: (|∇D|, |∇G|, D-step σ error (max, prod), G-step σ error (max, prod))."""
    torch.manual_seed(seed)  # as train(): the networks, then the normalization's u from the global stream
    sampler = BatchSampler(load_images(dataset, root, 32), batch, seed=seed)
    noise = torch.Generator().manual_seed(seed + 1)
    generator = build_generator("standard_cnn", 32, z_dim=128, width=width)
    discriminator = build_discriminator("standard_cnn", 32, width=width)
    normalization.normalize(discriminator, variant, scale=scale, example_input=torch.zeros(1, 3, 32, 32))
    layers = spectral_layers(discriminator)
    estimators = [e for _, spectral in layers for e in spectral.estimators.values()]

    def advance(steps: int) -> None:  # stored power-iteration steps on the current weights
        with torch.no_grad():
            for module, spectral in layers:
                for e in spectral.estimators.values():
                    _, u, v = normalization._power_iteration(
                        *e.operators(module.parametrizations.weight.original), e.u, steps, e.eps)
                    e.u.copy_(u)
                    e.v.copy_(v)

    if order == "warm15":
        advance(15)
    used: list[float] = []  # the σ each SpectralNormalization forward divided by

    def record(module, args, output):
        weight, normalized = args[0].detach().flatten(), output.detach().flatten()
        i = int(weight.abs().argmax())
        used.append(module.scale * float(weight[i] / normalized[i]))

    for _, spectral in layers:
        spectral.register_forward_hook(record)

    def stored_vectors() -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(e.u.clone(), e.v.clone()) for e in estimators]

    def restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:  # an official forward stores nothing
        with torch.no_grad():
            for e, (u, v) in zip(estimators, saved, strict=True):
                e.u.copy_(u)
                e.v.copy_(v)

    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(beta1, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(beta1, 0.999))
    d_params, g_params = list(discriminator.parameters()), list(generator.parameters())
    rows = []
    for _ in range(iterations):
        real = sampler.next()
        with torch.no_grad():
            fake = generator(torch.randn(batch, 128, generator=noise))
        used.clear()
        saved = stored_vectors()
        d_out = discriminator(torch.cat([real, fake]))
        if order == "official":
            restore(saved)
        d_error = sigma_error(layers, used) if layers else (1.0, 1.0)
        loss_d = discriminator_loss("hinge", d_out[:batch], d_out[batch:])
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        grad_d = float(torch.nn.utils.get_total_norm([p.grad for p in d_params]))
        opt_d.step()
        if order == "official":
            advance(1)
        for p in d_params:
            p.requires_grad_(False)
        z = torch.randn(batch, 128, generator=noise)
        used.clear()
        if order == "official":
            saved = stored_vectors()
            loss_g = generator_loss("hinge", discriminator(generator(z)))
            restore(saved)
        else:
            with normalization.frozen_parametrizations(discriminator):
                loss_g = generator_loss("hinge", discriminator(generator(z)))
        g_error = sigma_error(layers, used) if layers else (1.0, 1.0)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        for p in d_params:
            p.requires_grad_(True)
        grad_g = float(torch.nn.utils.get_total_norm([p.grad for p in g_params]))
        opt_g.step()
        rows.append((grad_d, grad_g, *d_error, *g_error))
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
            for order in ORDERS if variant != "none" else ("ours",):
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
