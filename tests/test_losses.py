"""Claims about trainables.losses: each loss against values worked out by hand, and the WGAN-GP penalty
against discriminators whose input gradient is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainables.losses import discriminator_loss, generator_loss, gradient_penalty
from trainables.networks import build_discriminator
from trainables.normalization import advance_power_iterations, normalize

torch.set_num_threads(1)


def test_hinge_losses_match_hand_computed_values():
    d_real = torch.tensor([2.0, 0.5, -1.0])
    d_fake = torch.tensor([-2.0, 0.0, 0.5])
    # max(0, 1 - real) = (0, 0.5, 2) -> 5/6; max(0, 1 + fake) = (0, 1, 1.5) -> 5/6
    assert discriminator_loss("hinge", d_real, d_fake).item() == pytest.approx(5 / 3)
    assert generator_loss("hinge", d_fake).item() == pytest.approx(0.5)  # -mean(-2, 0, 0.5)


def test_non_saturating_losses_match_hand_computed_values():
    ln3 = math.log(3)
    d_real = torch.tensor([0.0, ln3])
    d_fake = torch.tensor([0.0, -ln3])
    # -log σ(0) = ln 2, -log σ(ln 3) = ln(4/3); -log(1 - σ(0)) = ln 2, -log(1 - σ(-ln 3)) = ln(4/3)
    expected_d = (math.log(2) + math.log(4 / 3)) / 2 * 2
    assert discriminator_loss("non_saturating", d_real, d_fake).item() == pytest.approx(expected_d)
    # -log σ(0) = ln 2, -log σ(-ln 3) = ln 4
    assert generator_loss("non_saturating", d_fake).item() == pytest.approx((math.log(2) + math.log(4)) / 2)


def test_non_saturating_losses_stay_finite_and_exact_for_huge_logits():
    d_real, d_fake = torch.tensor([1000.0]), torch.tensor([-1000.0])
    assert discriminator_loss("non_saturating", d_real, d_fake).item() == 0.0
    assert generator_loss("non_saturating", d_fake).item() == pytest.approx(1000.0)


def test_wgan_critic_loss_is_mean_fake_minus_mean_real():
    d_real = torch.tensor([1.0, 3.0])
    d_fake = torch.tensor([-1.0, 0.5])
    assert discriminator_loss("wgan_gp", d_real, d_fake).item() == pytest.approx(-0.25 - 2.0)
    assert generator_loss("wgan_gp", d_fake).item() == pytest.approx(0.25)


def test_losses_are_scalars_that_backpropagate_to_the_logits():
    d_real = torch.tensor([0.3, -0.2], requires_grad=True)
    d_fake = torch.tensor([0.1, 0.4], requires_grad=True)
    loss = discriminator_loss("hinge", d_real, d_fake)
    assert loss.shape == ()
    loss.backward()
    torch.testing.assert_close(d_real.grad, torch.tensor([-0.5, -0.5]))  # d/dx mean(1 - x) inside the hinge
    torch.testing.assert_close(d_fake.grad, torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("call", [lambda: discriminator_loss("wgan", torch.zeros(2), torch.zeros(2)),
                                  lambda: generator_loss("bce", torch.zeros(2))])
def test_unknown_loss_names_the_argument_and_valid_values(call):
    with pytest.raises(ValueError, match=r"loss: '\w+' is not known; valid: hinge, non_saturating, wgan_gp"):
        call()


def linear_critic(w: torch.Tensor) -> nn.Module:
    """D(x) = w·x + 0.3 on flattened images: ∇ₓD = w everywhere."""
    layer = nn.Linear(w.numel(), 1)
    with torch.no_grad():
        layer.weight.copy_(w.flatten()[None])
        layer.bias.fill_(0.3)
    return nn.Sequential(nn.Flatten(), layer)


def test_penalty_of_a_linear_critic_is_lambda_times_norm_minus_one_squared():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4)
    w = w * (3.0 / w.norm())  # ‖w‖ = 3
    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    penalty = gradient_penalty(linear_critic(w), real, fake, weight=10.0)
    assert penalty.item() == pytest.approx(10.0 * (3.0 - 1.0) ** 2, rel=1e-5)  # 40
    assert gradient_penalty(linear_critic(w), real, fake, weight=2.5).item() == pytest.approx(10.0, rel=1e-5)


def test_penalty_is_taken_at_per_image_interpolates_drawn_from_the_generator():
    # D(x) = ½‖x‖²: ∇ₓD = x, so the norm at x̂ = α·real + (1 - α)·fake with fake = 0 is α‖real‖.
    class HalfSquaredNorm(nn.Module):
        def forward(self, x):
            return 0.5 * x.flatten(1).pow(2).sum(dim=1)

    real = torch.stack([torch.full((1, 2, 2), v) for v in (1.0, 2.0, 3.0, 4.0)])  # ‖real_i‖ = 2v
    fake = torch.zeros_like(real)
    penalty = gradient_penalty(HalfSquaredNorm(), real, fake, weight=10.0,
                               generator=torch.Generator().manual_seed(7))
    alpha = torch.rand(4, 1, 1, 1, generator=torch.Generator().manual_seed(7)).flatten()
    expected = 10.0 * ((alpha * torch.tensor([2.0, 4.0, 6.0, 8.0]) - 1) ** 2).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    assert len(set(alpha.tolist())) == 4  # one α per image


def test_penalty_gradient_reaches_the_critic_weights_analytically():
    # d/dw λ(‖w‖ - 1)² = 2λ(‖w‖ - 1) w / ‖w‖
    torch.manual_seed(1)
    w = torch.randn(2, 3, 3)
    critic = linear_critic(w)
    real, fake = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    gradient_penalty(critic, real, fake, weight=10.0).backward()
    expected = 2 * 10.0 * (w.norm() - 1) * w.flatten() / w.norm()
    torch.testing.assert_close(critic[1].weight.grad[0], expected, rtol=1e-4, atol=1e-6)
    assert critic[1].bias.grad is None or critic[1].bias.grad.abs().max() == 0  # the bias has no slope


def test_penalty_sends_no_gradient_to_the_images_or_their_generator():
    scale = torch.tensor(2.0, requires_grad=True)  # stands for G's parameters
    fake = scale * torch.randn(3, 1, 2, 2)
    real = torch.randn(3, 1, 2, 2, requires_grad=True)
    gradient_penalty(linear_critic(torch.ones(1, 2, 2)), real, fake).backward()
    assert scale.grad is None and real.grad is None


def test_penalty_of_a_constant_critic_is_lambda_and_finite():
    # ∇ = 0: the norm's derivative would be 0/0 without the official code's 1e-8 under the square root.
    critic = linear_critic(torch.zeros(1, 2, 2))
    critic[1].weight.requires_grad_(True)
    penalty = gradient_penalty(critic, torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2), weight=10.0)
    penalty.backward()
    assert penalty.item() == pytest.approx(10.0 * (1 - 1e-4) ** 2, rel=1e-6)
    assert torch.isfinite(critic[1].weight.grad).all()


def power_iteration_vector(discriminator: nn.Module) -> torch.Tensor:
    return discriminator.blocks.conv1.parametrizations.weight[0].estimators["out"].u.clone()


def test_penalty_on_a_spectrally_normalized_critic_stores_no_power_iteration():
    torch.manual_seed(0)
    discriminator = normalize(build_discriminator("standard_cnn", 32, width=0.125), "sn",
                              example_input=torch.zeros(1, 3, 32, 32))
    real, fake = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    before = power_iteration_vector(discriminator)
    penalty = gradient_penalty(discriminator, real, fake)
    penalty.backward()
    torch.testing.assert_close(power_iteration_vector(discriminator), before, rtol=0, atol=0)
    assert all(m.training for m in discriminator.modules())
    advance_power_iterations(discriminator)  # while the update after a D step moves u: the check can fail
    assert not torch.equal(power_iteration_vector(discriminator), before)


def test_penalty_sees_the_normalized_weights_of_the_steps_own_forward():
    # train.py's D step: logits and penalty on the same W/σ, as the official code (its NO_OPS forward).
    torch.manual_seed(0)
    discriminator = normalize(build_discriminator("standard_cnn", 32, width=0.125), "sn",
                              example_input=torch.zeros(1, 3, 32, 32))
    real, fake = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    step_weight = discriminator.blocks.conv1.weight.detach().clone()  # a training forward's W/σ
    loss = discriminator_loss("wgan_gp", discriminator(real), discriminator(fake))
    loss = loss + gradient_penalty(discriminator, real, fake)
    loss.backward()
    torch.testing.assert_close(discriminator.blocks.conv1.weight, step_weight, rtol=0, atol=0)
    assert all(torch.isfinite(p.grad).all() for p in discriminator.parameters() if p.grad is not None)


def test_penalty_rejects_mismatched_images_and_negative_weight():
    critic = linear_critic(torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match=r"same shape, got \(2, 1, 2, 2\) and \(3, 1, 2, 2\)"):
        gradient_penalty(critic, torch.zeros(2, 1, 2, 2), torch.zeros(3, 1, 2, 2))
    with pytest.raises(ValueError, match="weight: the penalty's lambda must be >= 0"):
        gradient_penalty(critic, torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), weight=-1.0)
