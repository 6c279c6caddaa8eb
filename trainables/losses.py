"""GAN losses on discriminator logits, and the WGAN-GP gradient penalty.

Logits are D's raw outputs, shape (B,). Every loss is a mean over the batch (a 0-dim tensor), to be minimised:

  hinge           D: E[max(0, 1 - D(real))] + E[max(0, 1 + D(fake))]   G: -E[D(fake)]
  non_saturating  D: E[softplus(-D(real))] + E[softplus(D(fake))]       G: E[softplus(-D(fake))]
  wgan_gp         D: E[D(fake)] - E[D(real)]  (+ gradient_penalty)      G: -E[D(fake)]

The hinge loss is the paper's default; the learned-gamma SN baselines use WGAN-GP with lambda = 10.
softplus(x) = log(1 + e^x) = -log sigmoid(-x), so the non-saturating losses are finite for any finite logit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from trainables.config import LOSSES

# Added under the square root of ‖∇‖², as the official code: keeps the norm's gradient finite at ∇ = 0.
GRADIENT_NORM_EPS = 1e-8


def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss: {loss!r} is not known; valid: {', '.join(LOSSES)}")


def discriminator_loss(loss: str, d_real: Tensor, d_fake: Tensor) -> Tensor:
    """D's loss from its logits on real (B,) and generated (B',) images; a 0-dim tensor.

    For wgan_gp this is the critic's E[D(fake)] - E[D(real)] only; the caller adds `gradient_penalty`.
    """
    check_loss(loss)
    if loss == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    if loss == "non_saturating":
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    return d_fake.mean() - d_real.mean()


def generator_loss(loss: str, d_fake: Tensor) -> Tensor:
    """G's loss from D's logits on generated images (B,); a 0-dim tensor."""
    check_loss(loss)
    if loss == "non_saturating":
        return F.softplus(-d_fake).mean()
    return -d_fake.mean()  # hinge and wgan_gp train G alike


def gradient_penalty(discriminator: nn.Module, real: Tensor, fake: Tensor, *, weight: float = 10.0,
                     generator: torch.Generator | None = None) -> Tensor:
    """WGAN-GP's penalty λ·E[(‖∇ₓ̂ D(x̂)‖₂ − 1)²] on x̂ = α·real + (1 − α)·fake, α ~ U[0, 1) per image.

    real, fake: (B, C, H, W) images on one device; weight: λ (≥ 0); generator: the torch.Generator (on the
    images' device) that draws α, for reproducible runs. Returns a 0-dim tensor whose graph reaches D's
    parameters (create_graph), not G's: the images are detached. The norm is sqrt(‖∇‖² + 1e-8) as the
    official code. Its D forward is one like the step's own: the power iteration from the stored u, not stored
    (the official code builds the interpolates' D with NO_OPS).
    """
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have the same shape, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    if not weight >= 0:
        raise ValueError(f"weight: the penalty's lambda must be >= 0, got {weight!r}")
    alpha_shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    alpha = torch.rand(alpha_shape, generator=generator, device=real.device, dtype=real.dtype)
    interpolates = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    logits = discriminator(interpolates)
    (grad,) = torch.autograd.grad(logits.sum(), interpolates, create_graph=True)
    norms = (grad.flatten(1).pow(2).sum(dim=1) + GRADIENT_NORM_EPS).sqrt()
    return weight * (norms - 1).pow(2).mean()
