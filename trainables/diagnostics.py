"""What the official BSN code logs, as flat `name -> float` dicts: σ per layer, gradient norms per layer,
‖∇ₓD(x)‖ on real and fake images, and the sample diversity and grids of an evaluation.

Everything here synchronises with the host, so it runs at logging and evaluation steps only.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from trainables.files import atomic_path
from trainables.normalization import spectral_report

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

    Measured in eval mode, so that the probe does not advance any power iteration (u stays as training left
    it).
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


def spectral_metrics(discriminator: nn.Module, *, conv_operator: bool = False) -> dict[str, float]:
    """σ of every normalized layer as `sigma/<layer>`, `sigma_out/...`, `sigma_in/...`, `gamma/...`, and with
    conv_operator=True only `sigma_conv/<layer>` (the convolution operator's σ, computed on demand)."""
    wanted = ("sigma_conv",) if conv_operator else ("sigma", "sigma_out", "sigma_in", "gamma")
    metrics = {}
    for layer, entries in spectral_report(discriminator, conv_operator=conv_operator).items():
        for key in wanted:
            if entries.get(key) is not None:
                metrics[f"{key}/{layer}"] = float(entries[key])
    return metrics


def sample_diversity(images: torch.Tensor) -> float:
    """Mean pairwise L2 distance per pixel between images (B, C, H, W) in [-1, 1]: 0 when all are equal."""
    flat = images.flatten(1).float()
    distances = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    b = flat.shape[0]
    return float(distances.sum() / (b * (b - 1)))


def save_sample_grid(images: torch.Tensor, path: Path) -> Path:
    """Write images (B, C, H, W) in [-1, 1] as one PNG grid, atomically."""
    with atomic_path(path) as partial:
        save_image(images.float().clamp(-1, 1), partial, nrow=8, normalize=True, value_range=(-1, 1),
                   format="png")
    return path
