"""Claims about trainables/normalization.py: the study's discriminator normalizations on small real layers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from trainables import config
from trainables.normalization import VARIANTS, advance_power_iterations, normalize, spectral_report

torch.set_num_threads(1)

EXAMPLE = torch.zeros(1, 3, 8, 8)  # the input size small_discriminator is built for


def small_discriminator() -> nn.Sequential:
    """A two-conv, one-linear D on (B, 3, 8, 8) with hidden layers named '0', '2' and output layer '5'."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1), nn.LeakyReLU(0.1), nn.Conv2d(8, 16, 4, 2, 1), nn.LeakyReLU(0.1),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 1),
    )


def spectral(layer: nn.Module):
    """The SpectralNormalization parametrization of a layer's weight."""
    return layer.parametrizations.weight[0]


def raw_weight(layer: nn.Module) -> torch.Tensor:
    return layer.parametrizations.weight.original


def out_reshape(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(c_out, c_in·k·k), written out independently of the module under test."""
    c_out = weight.shape[int(transposed)]
    return (weight.permute(1, 0, 2, 3) if transposed else weight).reshape(c_out, -1)


def in_reshape(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(c_in, c_out·k·k)."""
    c_in = weight.shape[int(not transposed)]
    return (weight if transposed else weight.permute(1, 0, 2, 3)).reshape(c_in, -1)


def power_iteration_updates(layer: nn.Module, n: int) -> None:
    """n updates of the stored u, v, each one power-iteration step on the (unchanged) weight."""
    for _ in range(n):
        advance_power_iterations(layer)


def relative_error(estimate: float, truth: float) -> float:
    return abs(estimate - truth) / abs(truth)


def explicit_operator(layer: nn.Module, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """The layer's bias-free linear map at input shape (C, H, W) as a matrix (out numel, in numel), built by
    applying the layer to every basis image."""
    bias_free = copy.deepcopy(layer)
    bias_free.bias = None
    n = math.prod(input_shape)
    with torch.no_grad():
        outputs = bias_free(torch.eye(n).reshape(n, *input_shape))
    return outputs.reshape(n, -1).T


# -- power iteration converges to the right matrix norms -----------------------------------------------------

RESHAPE_CASES = {
    "conv2d": lambda: nn.Conv2d(6, 10, 3),
    "conv_transpose2d": lambda: nn.ConvTranspose2d(6, 10, 3),
    "linear": lambda: nn.Linear(30, 12),
}


@pytest.mark.parametrize("variant", ["sn", "bsn"])
@pytest.mark.parametrize("kind", RESHAPE_CASES)
def test_sigma_estimates_converge_to_matrix_norm_of_each_reshape(kind: str, variant: str) -> None:
    torch.manual_seed(0)
    layer = normalize(RESHAPE_CASES[kind](), variant)
    power_iteration_updates(layer, 300)
    weight = raw_weight(layer).detach()
    if kind == "linear":
        sigma_out = sigma_in = torch.linalg.matrix_norm(weight, ord=2).item()
    else:
        transposed = kind == "conv_transpose2d"
        sigma_out = torch.linalg.matrix_norm(out_reshape(weight, transposed), ord=2).item()
        sigma_in = torch.linalg.matrix_norm(in_reshape(weight, transposed), ord=2).item()
        assert relative_error(sigma_out, sigma_in) > 0.05  # the two reshapes differ, so a swap would show
    report = spectral_report(layer)[""]
    expected = sigma_out if variant == "sn" or kind == "linear" else (sigma_out + sigma_in) / 2
    assert relative_error(report["sigma"], expected) <= 1e-3
    assert relative_error(report["sigma_out"], sigma_out) <= 1e-3
    assert relative_error(report["sigma_in"], sigma_in) <= 1e-3


@pytest.mark.parametrize(
    "make_layer, input_shape",
    [
        (lambda: nn.Conv2d(2, 3, 3, stride=1, padding=1), (2, 6, 6)),
        (lambda: nn.Conv2d(2, 3, 4, stride=2, padding=1), (2, 6, 6)),
        (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=0), (2, 7, 6)),  # the adjoint needs output padding
        (lambda: nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=2), (4, 5, 5)),
        (lambda: nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1), (3, 3, 3)),
    ],
    ids=["k3s1p1", "k4s2p1", "k3s2p0-odd", "same-dilated-grouped", "transposed-k4s2p1"],
)
def test_strict_sigma_equals_top_singular_value_of_explicit_conv_matrix(make_layer, input_shape) -> None:
    torch.manual_seed(0)
    raw = make_layer()
    truth = torch.linalg.matrix_norm(explicit_operator(raw, input_shape), ord=2).item()

    strict = normalize(copy.deepcopy(raw), "strict_sn", scale=1.3, example_input=torch.zeros(1, *input_shape))
    power_iteration_updates(strict, 300)
    assert relative_error(spectral_report(strict)[""]["sigma"], truth) <= 1e-3
    # The normalized layer's operator has σ = c.
    strict.eval()
    normalized = torch.linalg.matrix_norm(explicit_operator(strict, input_shape), ord=2).item()
    assert relative_error(normalized, 1.3) <= 1e-3

    # spectral_report's on-demand sigma_conv of another variant agrees with the same matrix.
    plain = normalize(copy.deepcopy(raw), "sn", example_input=torch.zeros(1, *input_shape))
    assert relative_error(spectral_report(plain, conv_operator=True)[""]["sigma_conv"], truth) <= 1e-3


# -- the formulas ------------------------------------------------------------------------------------------


def stored_sigma_by_hand(layer: nn.Module, key: str, matrix: torch.Tensor) -> torch.Tensor:
    estimator = spectral(layer).estimators[key]
    return estimator.u @ matrix @ estimator.v


@pytest.mark.parametrize("kind", ["conv2d", "linear"])
def test_ssn_weight_is_c_times_w_over_sigma_and_bias_is_not_scaled(kind: str) -> None:
    torch.manual_seed(0)
    layer = normalize(nn.Conv2d(4, 6, 3) if kind == "conv2d" else nn.Linear(12, 5), "ssn", scale=1.7)
    x = torch.randn(2, 4, 5, 5) if kind == "conv2d" else torch.randn(2, 12)
    op = F.conv2d if kind == "conv2d" else F.linear
    w = raw_weight(layer).detach()
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        with parametrize.cached():  # one evaluation of the weight for both reads below
            out, weight = layer(x), layer.weight
        # Training mode: σ from this forward's power iteration, which the update then stores (the weight is
        # unchanged); eval mode: from the stored u, v.
        if mode == "train":
            advance_power_iterations(layer)
        sigma = stored_sigma_by_hand(layer, "out", w.reshape(w.shape[0], -1))
        torch.testing.assert_close(weight, 1.7 * w / sigma, rtol=1e-6, atol=0)
        torch.testing.assert_close(out, op(x, 1.7 * w / sigma, layer.bias), rtol=1e-5, atol=1e-6)
    assert not parametrize.is_parametrized(layer, "bias")


@pytest.mark.parametrize("variant, c", [("bsn", 1.0), ("bssn", 0.8)])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_bsn_weight_is_c_times_w_over_mean_of_both_reshaped_sigmas(variant: str, c: float,
                                                                   transposed: bool) -> None:
    torch.manual_seed(0)
    c_in, c_out = 4, 7
    layer = nn.ConvTranspose2d(c_in, c_out, 3) if transposed else nn.Conv2d(c_in, c_out, 3)
    normalize(layer, variant, scale=c)
    estimators = spectral(layer).estimators
    assert estimators["out"].u.shape == (c_out,) and estimators["in"].u.shape == (c_in,)
    weight = layer.weight
    advance_power_iterations(layer)  # stores the vectors of the forward's power iterations
    w = raw_weight(layer).detach()
    sigma_1 = stored_sigma_by_hand(layer, "out", out_reshape(w, transposed))
    sigma_2 = stored_sigma_by_hand(layer, "in", in_reshape(w, transposed))
    torch.testing.assert_close(weight, c * w / ((sigma_1 + sigma_2) / 2), rtol=1e-6, atol=0)
    assert not parametrize.is_parametrized(layer, "bias")


def test_bssn_weight_is_c_times_the_bsn_weight_of_the_same_state() -> None:
    torch.manual_seed(0)
    bsn = normalize(nn.Conv2d(3, 5, 3), "bsn")
    bssn = normalize(nn.Conv2d(3, 5, 3), "bssn", scale=2.5)
    bssn.load_state_dict(bsn.state_dict())
    torch.testing.assert_close(bssn.weight, 2.5 * bsn.weight, rtol=1e-6, atol=0)
    torch.testing.assert_close(bssn.bias, bsn.bias, rtol=0, atol=0)


def test_bsn_on_a_linear_layer_is_plain_sn() -> None:
    torch.manual_seed(0)
    layer = normalize(nn.Linear(9, 4), "bsn")
    assert list(spectral(layer).estimators) == ["out"]
    weight = layer.weight
    advance_power_iterations(layer)
    sigma = stored_sigma_by_hand(layer, "out", raw_weight(layer).detach())
    torch.testing.assert_close(weight, raw_weight(layer).detach() / sigma, rtol=1e-6, atol=0)


# -- Lipschitz constants -----------------------------------------------------------------------------------


def max_ratio(f, xs: torch.Tensor, ys: torch.Tensor) -> float:
    with torch.no_grad():
        return ((f(xs) - f(ys)).flatten(1).norm(dim=1) / (xs - ys).flatten(1).norm(dim=1)).max().item()


def test_ssn_linear_layer_is_c_lipschitz_and_the_bound_is_tight() -> None:
    torch.manual_seed(0)
    c = 1.7
    layer = normalize(nn.Linear(20, 12), "ssn", scale=c)
    power_iteration_updates(layer, 300)
    layer.eval()
    xs, ys = torch.randn(1000, 20), torch.randn(1000, 20)
    assert max_ratio(layer, xs, ys) <= c * (1 + 1e-3)
    top_direction = torch.linalg.svd(raw_weight(layer).detach()).Vh[0]
    assert max_ratio(layer, top_direction[None], torch.zeros(1, 20)) >= c * (1 - 1e-3)


def test_strict_sn_conv_is_1_lipschitz_at_its_input_size_while_reshape_sn_is_not() -> None:
    torch.manual_seed(0)
    raw = nn.Conv2d(3, 4, 3, padding=1)
    shape = (3, 6, 6)
    strict = normalize(copy.deepcopy(raw), "strict_sn", example_input=torch.zeros(1, *shape))
    plain = normalize(copy.deepcopy(raw), "sn")
    power_iteration_updates(strict, 300)
    power_iteration_updates(plain, 300)
    strict.eval()
    plain.eval()
    xs, ys = torch.randn(500, *shape), torch.randn(500, *shape)
    assert max_ratio(strict, xs, ys) <= 1 + 1e-3
    # The conv operator's σ exceeds the reshaped kernel's, so dividing by the latter leaves a gain above 1.
    assert torch.linalg.matrix_norm(explicit_operator(plain, shape), ord=2).item() > 1.2


# -- state, modes and conventions ----------------------------------------------------------------------------


def hinge_step(d: nn.Module, optimizer: torch.optim.Optimizer, real: torch.Tensor,
               fake: torch.Tensor) -> None:
    optimizer.zero_grad()
    loss = F.relu(1 - d(real)).mean() + F.relu(1 + d(fake)).mean()
    loss.backward()
    optimizer.step()
    advance_power_iterations(d)


@pytest.mark.parametrize("variant", ["sn", "bsn", "strict_sn", "sn_gamma_shared"])
def test_u_survives_state_dict_round_trip_and_training_resumes_identically(variant: str) -> None:
    real, fake = torch.randn(2, 4, 3, 8, 8)
    torch.manual_seed(0)
    a = normalize(small_discriminator(), variant, example_input=EXAMPLE)
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-3, betas=(0.5, 0.999))
    for _ in range(3):
        hinge_step(a, opt_a, real, fake)

    torch.manual_seed(1)
    b = normalize(small_discriminator(), variant, example_input=EXAMPLE)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-3, betas=(0.5, 0.999))
    u_keys = [key for key in a.state_dict() if key.endswith(".u")]
    assert len(u_keys) == (5 if variant == "bsn" else 3)
    assert not all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in u_keys)
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # in memory, loading would share Adam's moments
    for key in u_keys:
        assert torch.equal(a.state_dict()[key], b.state_dict()[key])

    for _ in range(3):
        hinge_step(a, opt_a, real, fake)
        hinge_step(b, opt_b, real, fake)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


@pytest.mark.parametrize("variant", ["sn", "bsn", "strict_sn"])
def test_no_forward_updates_u_and_the_update_after_a_step_does(variant: str) -> None:
    torch.manual_seed(0)
    d = normalize(small_discriminator(), variant, example_input=EXAMPLE)
    x = torch.randn(2, 3, 8, 8)
    buffers = {name: b.clone() for name, b in d.named_buffers()}
    for mode in ("eval", "train"):
        getattr(d, mode)()
        first, second = d(x), d(x)
        assert all(torch.equal(b, buffers[name]) for name, b in d.named_buffers())
        assert torch.equal(first, second)
    advance_power_iterations(d)
    # The conv layers' u move (the 1-output linear layer's u is ±1, already a fixed point).
    conv_us = [name for name, _ in d.named_buffers() if name.startswith(("0.", "2.")) and name.endswith(".u")]
    assert len(conv_us) >= 2 and all(not torch.equal(d.get_buffer(name), buffers[name]) for name in conv_us)


def test_a_training_forward_takes_the_power_iteration_steps_the_update_then_stores() -> None:
    torch.manual_seed(0)
    three = normalize(nn.Conv2d(3, 6, 3), "bsn", n_power_iterations=3)
    one = normalize(nn.Conv2d(3, 6, 3), "bsn", n_power_iterations=1)
    one.load_state_dict(three.state_dict())
    weight_three = three.weight  # a training forward: three steps from the stored u
    advance_power_iterations(three)
    power_iteration_updates(one, 3)
    for key, value in three.state_dict().items():
        torch.testing.assert_close(value, one.state_dict()[key], rtol=1e-6, atol=1e-7)
    one.eval()  # σ from the stored u, v: those of three's forward
    torch.testing.assert_close(weight_three, one.weight, rtol=1e-6, atol=0)


def conv_with_fresh_u(grad_through: bool, variant: str = "sn") -> nn.Conv2d:
    torch.manual_seed(0)
    return normalize(nn.Conv2d(3, 6, 3), variant, grad_through_power_iteration=grad_through)


def loss_and_grad(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = layer(x)
    (out * g).sum().backward()
    return out.detach(), raw_weight(layer).grad.clone()


def test_gradient_conventions_give_the_same_forward_but_different_gradients() -> None:
    x, g = torch.randn(2, 3, 6, 6), torch.randn(2, 6, 4, 4)
    out_through, grad_through = loss_and_grad(conv_with_fresh_u(True), x, g)
    out_constant, grad_constant = loss_and_grad(conv_with_fresh_u(False), x, g)
    torch.testing.assert_close(out_through, out_constant, rtol=1e-5, atol=1e-6)
    assert (grad_through - grad_constant).norm() > 1e-3 * grad_constant.norm()


def test_u_constant_gradient_equals_torch_spectral_norm_with_the_same_u_v() -> None:
    x, g = torch.randn(2, 3, 6, 6), torch.randn(2, 6, 4, 4)
    ours = conv_with_fresh_u(False)
    theirs = nn.Conv2d(3, 6, 3)
    theirs.load_state_dict({"weight": raw_weight(ours).detach(), "bias": ours.bias.detach()})
    out_ours, grad_ours = loss_and_grad(ours, x, g)
    advance_power_iterations(ours)  # stores the u, v our forward used (its weight is unchanged)

    torch.nn.utils.parametrizations.spectral_norm(theirs)
    torch_sn = theirs.parametrizations.weight[0]
    torch_sn._u.copy_(spectral(ours).estimators["out"].u)
    torch_sn._v.copy_(spectral(ours).estimators["out"].v)
    theirs.eval()  # eval: PyTorch uses the stored u, v as constants, σ = uᵀWv
    out_theirs, grad_theirs = loss_and_grad(theirs, x, g)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-6)


def official_sigma(kernel_tf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """σ as fjxmlzn/BSN gan/sn.py computes it, in TF layout: kernel (kh, kw, c_in, c_out), u (1, c_out)."""
    w_reshaped = kernel_tf.reshape(-1, kernel_tf.shape[-1])
    v = u @ w_reshaped.T
    v = v / (v.pow(2).sum().sqrt() + 1e-12)
    u_final = v @ w_reshaped
    u_final = u_final / (u_final.pow(2).sum().sqrt() + 1e-12)
    return (v @ w_reshaped @ u_final.T)[0, 0]


@pytest.mark.parametrize("variant", ["sn", "bsn"])
def test_gradient_through_power_iteration_matches_the_official_bsn_code(variant: str) -> None:
    x, g = torch.randn(2, 3, 6, 6), torch.randn(2, 6, 4, 4)
    layer = conv_with_fresh_u(True, variant)
    estimators = spectral(layer).estimators
    u_out = estimators["out"].u.clone()[None]
    u_in = estimators["in"].u.clone()[None] if variant == "bsn" else None
    w = raw_weight(layer).detach().clone().requires_grad_(True)
    _, grad_ours = loss_and_grad(layer, x, g)

    kernel_tf = w.permute(2, 3, 1, 0)  # (kh, kw, c_in, c_out)
    sigma = official_sigma(kernel_tf, u_out)
    if variant == "bsn":  # gan/op.py: the second σ from the kernel transposed to (kh, kw, c_out, c_in)
        sigma = (sigma + official_sigma(kernel_tf.permute(0, 1, 3, 2), u_in)) / 2
    (F.conv2d(x, w / sigma, layer.bias) * g).sum().backward()
    torch.testing.assert_close(grad_ours, w.grad, rtol=1e-4, atol=1e-6)


# -- learned gamma -----------------------------------------------------------------------------------------


def gamma_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if name.endswith("gamma")}


def test_sn_gamma_shared_has_exactly_one_gamma_for_the_network() -> None:
    d = normalize(small_discriminator(), "sn_gamma_shared")
    n_raw = len(list(small_discriminator().parameters()))
    assert len(gamma_parameters(d)) == 1
    assert len(list(d.parameters())) == n_raw + 1
    gammas = {id(p.gamma) for layer in (d[0], d[2], d[5])
              for name in ("weight", "bias") for p in layer.parametrizations[name] if hasattr(p, "gamma")}
    assert len(gammas) == 1


def test_sn_gamma_layer_has_one_gamma_per_layer_shared_by_its_weight_and_bias() -> None:
    d = normalize(small_discriminator(), "sn_gamma_layer")
    assert len(gamma_parameters(d)) == 3
    for layer in (d[0], d[2], d[5]):
        assert layer.parametrizations.weight[1].gamma is layer.parametrizations.bias[0].gamma


@pytest.mark.parametrize("variant", ["sn_gamma_shared", "sn_gamma_layer"])
def test_gamma_scales_weight_and_bias_and_is_learned(variant: str) -> None:
    torch.manual_seed(0)
    d = normalize(small_discriminator(), variant)
    layer = d[2]
    gamma = layer.parametrizations.weight[1].gamma
    assert gamma.item() == 1.0
    with torch.no_grad():
        gamma.fill_(2.5)
    d.eval()
    w = raw_weight(layer).detach()
    sigma = stored_sigma_by_hand(layer, "out", w.reshape(w.shape[0], -1))
    torch.testing.assert_close(layer.weight, 2.5 * w / sigma, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.bias, 2.5 * layer.parametrizations.bias.original, rtol=0, atol=0)
    d.train()
    d(torch.randn(2, 3, 8, 8)).sum().backward()
    assert gamma.grad is not None and gamma.grad.abs().item() > 0


# -- invalid input -----------------------------------------------------------------------------------------


def test_variants_are_the_configs_and_an_unknown_one_is_rejected_listing_all() -> None:
    assert VARIANTS == config.VARIANTS
    with pytest.raises(ValueError, match="variant") as error:
        normalize(small_discriminator(), "spectral")
    assert all(name in str(error.value) for name in VARIANTS)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf, "2"])
def test_bad_scale_is_rejected_naming_scale_and_the_valid_range(scale) -> None:
    with pytest.raises(ValueError, match=r"scale: .*finite number > 0"):
        normalize(small_discriminator(), "ssn", scale=scale)


def test_scale_on_a_variant_without_c_is_rejected_naming_the_variants_that_take_it() -> None:
    with pytest.raises(ValueError, match=r"scale: .*'sn'.*ssn, bssn, strict_sn"):
        normalize(small_discriminator(), "sn", scale=2.0)


@pytest.mark.parametrize("n", [0, -2, 1.5])
def test_n_power_iterations_below_one_is_rejected(n) -> None:
    with pytest.raises(ValueError, match=r"n_power_iterations: must be an integer >= 1"):
        normalize(small_discriminator(), "sn", n_power_iterations=n)


def test_strict_sn_without_example_input_is_rejected_naming_example_input() -> None:
    with pytest.raises(ValueError, match="example_input: strict_sn needs"):
        normalize(small_discriminator(), "strict_sn")


def test_normalizing_a_module_twice_is_rejected() -> None:
    d = normalize(small_discriminator(), "sn")
    with pytest.raises(ValueError, match="already parametrized"):
        normalize(d, "bsn")


# -- spectral_report ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["bsn", "strict_sn", "sn_gamma_layer"])
def test_spectral_report_changes_no_state_and_draws_no_random_numbers(variant: str) -> None:
    torch.manual_seed(0)
    d = normalize(small_discriminator(), variant, example_input=EXAMPLE)
    d(torch.randn(2, 3, 8, 8))
    state = {key: value.clone() for key, value in d.state_dict().items()}
    rng = torch.get_rng_state()
    for conv_operator in (False, True):
        report = spectral_report(d, conv_operator=conv_operator)
        assert set(report) == {"0", "2", "5"}
        assert all(type(value) is float for entry in report.values() for value in entry.values())
        assert all(("sigma_conv" in entry) == conv_operator for entry in report.values())
        assert all(("gamma" in entry) == (variant == "sn_gamma_layer") for entry in report.values())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(value, state[key]) for key, value in d.state_dict().items())


def test_spectral_report_sigma_is_the_sigma_of_the_last_forward_once_stored() -> None:
    torch.manual_seed(0)
    d = normalize(small_discriminator(), "bssn", scale=1.5)
    weight = d[2].weight  # one training forward
    advance_power_iterations(d)  # stores its vectors (the weight is unchanged)
    sigma = (1.5 * raw_weight(d[2]).detach() / weight).mean().item()
    report = spectral_report(d)["2"]
    assert relative_error(report["sigma"], sigma) <= 1e-6
    assert report["scale"] == 1.5


def test_spectral_report_of_unnormalized_variants_is_empty() -> None:
    assert spectral_report(normalize(small_discriminator(), "none")) == {}
    assert spectral_report(normalize(small_discriminator(), "weight_norm")) == {}


def test_spectral_report_conv_operator_needs_the_recorded_input_size() -> None:
    d = normalize(small_discriminator(), "sn")
    assert set(spectral_report(d)) == {"0", "2", "5"}
    with pytest.raises(ValueError, match="no input size recorded for layer '0'.*example_input"):
        spectral_report(d, conv_operator=True)


# -- baselines ---------------------------------------------------------------------------------------------


def test_none_leaves_the_module_unchanged() -> None:
    torch.manual_seed(0)
    d = small_discriminator()
    state = {key: value.clone() for key, value in d.state_dict().items()}
    assert normalize(d, "none", example_input=EXAMPLE) is d
    assert not any(parametrize.is_parametrized(m) for m in d.modules())
    assert d.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in d.state_dict().items())


@pytest.mark.parametrize(
    "layer, output_dim",
    [(nn.Conv2d(3, 5, 3), 0), (nn.ConvTranspose2d(3, 5, 3), 1), (nn.Linear(4, 5), 0)],
    ids=["conv2d", "conv_transpose2d", "linear"],
)
def test_weight_norm_reparametrizes_each_output_channel_as_g_times_unit_v(layer: nn.Module,
                                                                          output_dim: int) -> None:
    before = layer.weight.detach().clone()
    normalize(layer, "weight_norm")
    g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    assert g.shape == tuple(5 if d == output_dim else 1 for d in range(v.ndim))
    torch.testing.assert_close(layer.weight, before, rtol=1e-6, atol=1e-7)  # identity at initialisation
    with torch.no_grad():
        g.mul_(3.0)
    dims = [d for d in range(v.ndim) if d != output_dim]
    unit_v = v / torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    torch.testing.assert_close(layer.weight, g * unit_v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant, norm_type", [("layer_norm", nn.GroupNorm), ("batch_norm", nn.BatchNorm2d)])
def test_norm_layer_follows_every_hidden_conv_but_not_the_output_layer(variant: str, norm_type: type) -> None:
    torch.manual_seed(0)
    d = normalize(small_discriminator(), variant, example_input=EXAMPLE)
    for index, channels in ((0, 8), (2, 16)):
        assert isinstance(d[index], nn.Sequential) and isinstance(d[index][0], nn.Conv2d)
        norm = d[index][1]
        assert isinstance(norm, norm_type)
        assert (norm.num_features if variant == "batch_norm" else (norm.num_groups, norm.num_channels)) == (
            channels if variant == "batch_norm" else (1, channels))
    assert type(d[5]) is nn.Linear
    hidden = d[0](torch.randn(4, 3, 8, 8))
    per_sample = hidden.flatten(1) if variant == "layer_norm" else hidden.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_sample.mean(dim=1), torch.zeros(per_sample.shape[0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(per_sample.var(dim=1, unbiased=False), torch.ones(per_sample.shape[0]),
                               rtol=0, atol=1e-3)
    assert d(torch.randn(2, 3, 8, 8)).shape == (2, 1)


class HeadRegisteredFirst(nn.Module):
    """A D whose output conv is registered before its hidden conv but runs after it."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(8, 1, 4)
        self.body = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.leaky_relu(self.body(x), 0.1))


def test_the_output_layer_is_the_last_to_run_on_example_input() -> None:
    d = normalize(HeadRegisteredFirst(), "layer_norm", example_input=torch.zeros(1, 3, 4, 4))
    assert isinstance(d.body, nn.Sequential) and isinstance(d.body[1], nn.GroupNorm)
    assert type(d.head) is nn.Conv2d


# -- the hot loop never synchronises -----------------------------------------------------------------------


@pytest.mark.parametrize("grad_through", [True, False])
@pytest.mark.parametrize("variant", ["bsn", "strict_sn", "sn_gamma_shared"])
def test_training_forward_and_backward_trace_to_one_graph(variant: str, grad_through: bool) -> None:
    """A single graph (fullgraph=True) means no .item() and no branching on tensor values in the forward."""
    torch.compiler.reset()  # each test's nn.Sequential adds to dynamo's cache of its forward (limit 8)
    d = normalize(small_discriminator(), variant, grad_through_power_iteration=grad_through,
                  example_input=EXAMPLE)
    compiled = torch.compile(d, backend="eager", fullgraph=True)
    compiled(torch.randn(2, 3, 8, 8)).sum().backward()
    assert raw_weight(d[0]).grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["sn", "bsn", "strict_sn", "sn_gamma_layer"])
def test_cuda_training_step_does_not_sync_and_sigma_converges(variant: str) -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    d = normalize(small_discriminator().to(device), variant, example_input=EXAMPLE.to(device))
    x = torch.randn(4, 3, 8, 8, device=device)
    d(x).sum().backward()  # warm-up: library initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # from here any synchronising call raises
    try:
        for _ in range(300):
            d.zero_grad(set_to_none=True)
            d(x).sum().backward()
            advance_power_iterations(d)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report = spectral_report(d, conv_operator=True)
    w = raw_weight(d[2]).detach()
    truth = torch.linalg.matrix_norm(w.reshape(16, -1), ord=2).item()
    assert relative_error(report["2"]["sigma_out"], truth) <= 1e-3
    if variant == "strict_sn":
        assert relative_error(report["2"]["sigma"], report["2"]["sigma_conv"]) <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "grad_through"), [("sn", True), ("sn", False), ("bssn", True),
                                                       ("strict_sn", True)])
def test_compiled_training_steps_give_the_eager_gradients_and_the_same_u(variant: str,
                                                                        grad_through: bool) -> None:
    """torch.compile (TrialConfig.compile: one graph) runs the same D steps: loss, every gradient (checked
    against finite differences too) and the u, v the update after each step stores, over three steps. The
    compiled forward only reads u (a graph that also overwrote it in place got the gradient through the power
    iteration 1-10% wrong)."""
    torch.compiler.reset()  # each test's nn.Sequential adds to dynamo's cache of its forward (limit 8)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 1)).double()
    normalize(net, variant, scale=1.5 if variant != "sn" else 1.0, grad_through_power_iteration=grad_through,
              example_input=torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    twin = copy.deepcopy(net)
    compiled = torch.compile(twin, fullgraph=True)
    for _ in range(3):
        start = copy.deepcopy(net.state_dict())
        x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
        net.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        loss = net(x).square().sum()
        loss.backward()
        compiled_loss = compiled(x).square().sum()
        compiled_loss.backward()
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-12, atol=0)
        for (name, p), q in zip(net.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
        advance_power_iterations(net)
        advance_power_iterations(twin)
        compiled_state = twin.state_dict()
        for name, b in net.named_buffers():
            torch.testing.assert_close(compiled_state[name], b, rtol=1e-12, atol=0, msg=name)

    if not grad_through:  # u, v held constant: the gradient is not the loss's derivative, by design
        return
    weight = net[0].parametrizations.weight.original  # central differences from the same u
    for index in [(0, 0, 0, 0), (3, 1, 2, 0)]:
        values = []
        for step in (1e-6, -1e-6):
            probe = copy.deepcopy(net)
            probe.load_state_dict(start)
            with torch.no_grad():
                probe[0].parametrizations.weight.original[index] += step
            values.append(probe(x).square().sum().item())
        assert (values[0] - values[1]) / 2e-6 == pytest.approx(weight.grad[index].item(), rel=1e-6)
