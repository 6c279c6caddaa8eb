"""What the official BSN code logs, as flat `name -> float` dicts: σ per layer, gradient norms per layer,
‖∇ₓD(x)‖ on real and fake images; the paper's theory measured on every variant's D (`theory_metrics` at
logging steps, `ConvOperatorProbe` at evaluations); and at each evaluation the sample grid, its diversity
relative to real images' and, on digit data, the classes it covers (`DiversityProbe`).

Everything here synchronises with the host, so it runs at logging and evaluation steps only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from trainables.files import atomic_path
from trainables.metrics.fd_digits import DigitsFeatureExtractor, ink_box
from trainables.normalization import (
    LAYER_TYPES,
    conv_operator_sigma,
    raw_weight,
    record_input_shapes,
    spectral_report,
    weight_report,
)

DIGIT_DATASETS = ("digits", "mnist")  # datasets whose samples the digits classifier can label
DIGIT_CLASSES = 10
REAL_GRIDS = 16  # random real grids whose mean diversity is the reference of the diversity ratio

# Suffixes that torch.nn.utils.parametrize and plain layers add to a layer's parameter names.
PARAMETER_SUFFIXES = (".parametrizations.weight.original", ".parametrizations.bias.original",
                      ".parametrizations.weight.original0", ".parametrizations.weight.original1",
                      ".weight", ".bias")


def layer_of(parameter_name: str) -> str:
    """'blocks.0.parametrizations.weight.original' -> 'blocks.0' (the layer a parameter belongs to)."""
    for suffix in PARAMETER_SUFFIXES:
        if parameter_name.endswith(suffix):
            return parameter_name[: -len(suffix)]
    return parameter_name.rsplit(".", 1)[0] if "." in parameter_name else parameter_name


def gradient_norms(module: nn.Module, prefix: str) -> dict[str, float]:
    """L2 norm of the current gradients per layer (`{prefix}/<layer>`) and in total (`{prefix}`)."""
    squares: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(()))
    for name, param in module.named_parameters():
        if param.grad is not None:
            squares[layer_of(name)] = squares[layer_of(name)] + param.grad.detach().float().pow(2).sum().cpu()
    norms = {f"{prefix}/{layer}": float(total.sqrt()) for layer, total in squares.items()}
    norms[prefix] = float(sum(squares.values(), torch.zeros(())).sqrt())
    return norms


def input_gradient_norms(discriminator: nn.Module, images: torch.Tensor, prefix: str) -> dict[str, float]:
    """Per-image ‖∇ₓD(x)‖₂ over a batch (B, C, H, W): `{prefix}/mean|min|max`.

    Measured in eval mode: σ from the stored u, v, as spectral_report gives it.
    """
    was_training = discriminator.training
    discriminator.eval()
    try:
        x = images.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(discriminator(x).sum(), x)
    finally:
        discriminator.train(was_training)
    norms = grad.flatten(1).norm(dim=1)
    return {f"{prefix}/mean": float(norms.mean()), f"{prefix}/min": float(norms.min()),
            f"{prefix}/max": float(norms.max())}


def spectral_metrics(discriminator: nn.Module) -> dict[str, float]:
    """σ of every SN-family layer as the official code logs it: `sigma/<layer>` (what the layer divides by),
    `sigma_out/...`, `sigma_in/...` (both reshapes of the raw weight) and `gamma/...`."""
    metrics = {}
    for layer, entries in spectral_report(discriminator).items():
        for key in ("sigma", "sigma_out", "sigma_in", "gamma"):
            if entries.get(key) is not None:
                metrics[f"{key}/{layer}"] = float(entries[key])
    return metrics


THEORY_QUANTITIES = ("sigma_raw", "sigma_eff", "weight_std", "weight_std_pred")


def theory_metrics(discriminator: nn.Module) -> dict[str, float]:
    """The paper's theory per D layer, every variant (trainables.normalization.weight_report):
    `sigma_raw/<layer>`, `sigma_eff/<layer>`, `weight_std/<layer>` and its prediction
    `weight_std_pred/<layer>`. One host sync for all layers."""
    report = weight_report(discriminator)
    keys = [f"{quantity}/{layer}" for layer in report for quantity in THEORY_QUANTITIES]
    if not keys:
        return {}
    values = torch.stack([report[layer][quantity].float().reshape(())
                          for layer in report for quantity in THEORY_QUANTITIES]).tolist()
    return dict(zip(keys, values, strict=True))


class ConvOperatorProbe:
    """σ of each D layer's convolution operator (its raw weight, bias left out, at the layer's input size) as
    `sigma_conv/<layer>`, every variant; Linear layers: their matrix σ. The layer's Lipschitz constant is
    sigma_conv · sigma_eff / sigma_raw; strict_sn divides by sigma_conv, the SN reshape σ is smaller.

    Built once per trial on its normalized D with a batch example_input (B, C, H, W); each call starts each
    layer's power iteration from the previous call's vector (kept here, not in any checkpoint), so calls after
    the first need a few steps instead of hundreds.
    """

    def __init__(self, discriminator: nn.Module, example_input: torch.Tensor):
        shapes = record_input_shapes(discriminator, example_input)
        self.layers = [(name, layer, shapes.get(layer)) for name, layer in discriminator.named_modules()
                       if isinstance(layer, LAYER_TYPES)]
        self.starts: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        sigmas = {}
        for name, layer, input_shape in self.layers:
            weight = raw_weight(layer).detach()
            if not bool(torch.isfinite(weight).all()):  # a diverged weight has no σ to find
                continue
            if isinstance(layer, nn.Linear):
                sigmas[name] = torch.linalg.matrix_norm(weight.float(), ord=2)
            elif input_shape is not None:
                sigmas[name], self.starts[name] = conv_operator_sigma(layer, name, input_shape, weight,
                                                                      self.starts.get(name))
        values = torch.stack([s.float().reshape(()) for s in sigmas.values()]).tolist() if sigmas else []
        return {f"sigma_conv/{name}": value for name, value in zip(sigmas, values, strict=True)}


def sample_diversity(images: torch.Tensor) -> float:
    """Mean pairwise L2 distance per pixel between images (B, C, H, W) in [-1, 1]: 0 when all are equal.

    Computed in the images' float dtype (at least float32) from differences, not from the expansion
    |a|² + |b|² - 2ab, whose cancellation would make near-equal grids differ by ~1e-6."""
    flat = images.flatten(1)
    flat = flat if flat.is_floating_point() and flat.dtype != torch.float16 else flat.float()
    distances = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist") / flat.shape[1] ** 0.5
    b = flat.shape[0]
    return float(distances.sum() / (b * (b - 1)))


class DiversityProbe:
    """How varied an evaluation's sample grid is, relative to real images, and which digit classes it shows.

    real_images: uint8 (N, 3, R, R), the evaluation's real set; grid_size: images per evaluation grid. The
    reference diversity is the mean sample_diversity of REAL_GRIDS seeded random grids of grid_size real
    images (all N when fewer), so `diversity_ratio` is 1 for a grid as varied as the data, 0 for one
    repeated image. classify: uint8 images (B, 3, R, R) -> class labels (B,), or None (no class coverage).
    Setup cost: REAL_GRIDS grids' pairwise distances; each call: one grid's, plus one classification.
    """

    def __init__(self, real_images: torch.Tensor, *, grid_size: int,
                 classify: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        n = real_images.shape[0]
        size = min(grid_size, n)
        grids = [real_images[torch.randperm(n, generator=generator)[:size].to(real_images.device)]
                 for _ in range(REAL_GRIDS)]
        self.real_diversity = sum(sample_diversity(grid.float() / 127.5 - 1) for grid in grids) / REAL_GRIDS
        self.classify = classify

    @classmethod
    def for_dataset(cls, dataset: str, real_images: torch.Tensor, *, grid_size: int, cache_dir: str | Path,
                    device: torch.device | str = "cpu") -> DiversityProbe:
        """The probe of a trial: with the digits classifier's labels on digit datasets (DIGIT_DATASETS), which
        sees each image as fd_digits does (cropped to the real data's ink_box)."""
        classify = None
        if dataset in DIGIT_DATASETS:
            extractor = DigitsFeatureExtractor(cache_dir, torch.device(device), box=ink_box(real_images))
            classify = extractor.classify
        return cls(real_images, grid_size=grid_size, classify=classify)

    def __call__(self, grid: torch.Tensor) -> dict[str, float]:
        """{'diversity', 'diversity_ratio', and with a classifier 'class_coverage'} of a grid (B, 3, R, R)
        in [-1, 1]. class_coverage: the effective number of digit classes among its predicted labels (the
        exponential of their entropy, so a few misread samples of one class barely count) over 10."""
        diversity = sample_diversity(grid)
        out = {"diversity": diversity, "diversity_ratio": diversity / self.real_diversity}
        if self.classify is not None:
            images = ((grid.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            shares = torch.bincount(self.classify(images), minlength=DIGIT_CLASSES).double() / images.shape[0]
            entropy = -(shares * shares.clamp_min(1e-300).log()).sum()
            out["class_coverage"] = float(entropy.exp()) / DIGIT_CLASSES
        return out


def save_sample_grid(images: torch.Tensor, path: Path) -> Path:
    """Write images (B, C, H, W) in [-1, 1] as one PNG grid, atomically."""
    with atomic_path(path) as partial:
        save_image(images.float().clamp(-1, 1), partial, nrow=8, normalize=True, value_range=(-1, 1),
                   format="png")
    return path
