"""The theory panel (trainables.diagnostics.theory_metrics, ConvOperatorProbe): the paper's predictions and
the quantities they are checked against, logged by every variant, on small real layers and a real trial."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_normalization import EXAMPLE, explicit_operator, small_discriminator
from test_train import TINY, Recorder
from torch import nn

from trainables.config import VARIANTS
from trainables.diagnostics import THEORY_QUANTITIES, ConvOperatorProbe, theory_metrics
from trainables.normalization import advance_power_iterations, normalize, raw_weight
from trainables.train import train

torch.set_num_threads(1)
LAYERS = ("0", "2", "5")  # small_discriminator's weight layers
SCALED = {"ssn": 1.5, "bssn": 1.5, "strict_sn": 1.5}


def normalized(variant: str, *, warm: int = 0) -> nn.Module:
    """small_discriminator under `variant`, after `warm` updates of its power iterations (one step each)."""
    torch.manual_seed(0)
    d = normalize(small_discriminator(), variant, scale=SCALED.get(variant, 1.0), example_input=EXAMPLE)
    for _ in range(warm):
        advance_power_iterations(d)
    return d


def layer_names(variant: str) -> tuple[str, ...]:
    # layer_norm and batch_norm wrap each hidden conv in nn.Sequential(conv, norm).
    return ("0.0", "2.0", "5") if variant in ("layer_norm", "batch_norm") else LAYERS


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_logs_each_theory_quantity_of_every_d_layer(variant):
    d = normalized(variant)
    metrics = theory_metrics(d)
    assert set(metrics) == {f"{q}/{layer}" for q in THEORY_QUANTITIES for layer in layer_names(variant)}
    assert all(math.isfinite(value) for value in metrics.values())
    sigma_conv = ConvOperatorProbe(d, EXAMPLE)()
    assert set(sigma_conv) == {f"sigma_conv/{layer}" for layer in layer_names(variant)}


def test_none_measures_its_own_weights_and_is_held_to_sns_prediction():
    d = normalized("none")
    metrics = theory_metrics(d)
    conv = d[2].weight.detach()  # (16, 8, 4, 4)
    sigma = torch.linalg.matrix_norm(conv.reshape(16, -1), ord=2).item()
    assert metrics["sigma_raw/2"] == pytest.approx(sigma, rel=1e-5)
    assert metrics["sigma_eff/2"] == metrics["sigma_raw/2"]
    assert metrics["weight_std/2"] == pytest.approx(conv.std().item(), rel=1e-6)
    assert metrics["weight_std_pred/2"] == pytest.approx(1 / (math.sqrt(16) + math.sqrt(8 * 16)))
    assert metrics["weight_std_pred/5"] == pytest.approx(1 / (1 + math.sqrt(256)))


@pytest.mark.parametrize("variant, scale", [("sn", 1.0), ("ssn", 1.5), ("strict_sn", 1.5)])
def test_sn_family_effective_sigma_is_c_once_the_power_iteration_has_converged(variant, scale):
    d = normalized(variant, warm=300)
    metrics = theory_metrics(d)
    for layer in ("0", "2") if variant != "strict_sn" else ():
        assert metrics[f"sigma_eff/{layer}"] == pytest.approx(scale, rel=1e-3)
    assert metrics["sigma_eff/5"] == pytest.approx(scale, rel=1e-3)  # a Linear layer: plain SN times c
    # weight_std_pred is c times SN's value for the shape, strict_sn's too (the value it falls below)
    assert metrics["weight_std_pred/2"] == pytest.approx(scale / (math.sqrt(16) + math.sqrt(8 * 16)))


def test_bsn_prediction_is_the_mean_of_both_reshapes_and_symmetric_in_fan_in_and_fan_out():
    metrics = {variant: theory_metrics(normalized(variant)) for variant in ("sn", "bsn", "bssn")}
    # conv '0': (8, 3, 3, 3); (c_out, c_in·k·k) = (8, 27) and (c_in, c_out·k·k) = (3, 72)
    sn = 1 / (math.sqrt(8) + math.sqrt(27))
    bsn = 2 / (math.sqrt(8) + math.sqrt(27) + math.sqrt(3) + math.sqrt(72))
    assert metrics["sn"]["weight_std_pred/0"] == pytest.approx(sn)
    assert metrics["bsn"]["weight_std_pred/0"] == pytest.approx(bsn)
    assert metrics["bssn"]["weight_std_pred/0"] == pytest.approx(1.5 * bsn)  # c as a gain
    swapped = normalize(nn.Sequential(nn.Conv2d(8, 3, 3)), "bsn")  # c_in and c_out exchanged
    assert theory_metrics(swapped)["weight_std_pred/0"] == pytest.approx(bsn)
    assert metrics["bsn"]["weight_std_pred/5"] == pytest.approx(1 / (1 + math.sqrt(256)))  # linear: SN


def test_sn_holds_a_random_layers_effective_std_at_the_lecun_like_prediction():
    # The prediction's premise: a matrix of m x n i.i.d. entries has σ ≈ s(√m + √n) (Bai-Yin), so W/σ has
    # entries of std ≈ 1/(√m + √n), whatever s; at 256 x 1152 the estimate is within a few percent.
    torch.manual_seed(0)
    for std in (0.02, 1.0):
        layer = nn.Conv2d(128, 256, 3)
        nn.init.normal_(layer.weight, std=std)
        d = normalize(nn.Sequential(layer), "sn", n_power_iterations=200)
        d[0].train()
        d[0].weight  # noqa: B018 - one training forward: 200 power-iteration steps
        metrics = theory_metrics(d)
        assert metrics["weight_std/0"] == pytest.approx(metrics["weight_std_pred/0"], rel=0.05)


def test_weight_norm_effective_sigma_is_measured_on_its_own_weight():
    d = normalized("weight_norm")
    metrics = theory_metrics(d)
    with torch.no_grad():
        effective = d[2].weight.reshape(16, -1)
        raw = raw_weight(d[2]).reshape(16, -1)
    for key, weight in (("sigma_eff/2", effective), ("sigma_raw/2", raw)):
        assert metrics[key] == pytest.approx(torch.linalg.matrix_norm(weight, ord=2).item(), rel=1e-5)


def test_reading_the_theory_advances_no_power_iteration():
    d = normalized("bsn", warm=3)
    before = copy.deepcopy(d.state_dict())
    theory_metrics(d)
    ConvOperatorProbe(d, EXAMPLE)()
    assert all(torch.equal(before[key], value) for key, value in d.state_dict().items())


@pytest.mark.parametrize("variant", ["none", "sn"])
def test_conv_operator_sigma_is_the_norm_of_the_explicit_operator_and_exceeds_the_reshapes(variant):
    d = normalized(variant)
    probe = ConvOperatorProbe(d, EXAMPLE)
    sigma_conv = probe()
    shapes = {"0": (3, 8, 8), "2": (8, 8, 8)}
    for layer, shape in shapes.items():
        raw = copy.deepcopy(d[int(layer)])
        if variant != "none":  # the operator of the raw weight, as the probe measures it
            raw = nn.Conv2d(raw.in_channels, raw.out_channels, raw.kernel_size, raw.stride, raw.padding)
            raw.weight.data.copy_(raw_weight(d[int(layer)]).detach())
        truth = torch.linalg.matrix_norm(explicit_operator(raw, shape), ord=2).item()
        assert sigma_conv[f"sigma_conv/{layer}"] == pytest.approx(truth, rel=1e-3)
    assert probe()["sigma_conv/2"] == pytest.approx(sigma_conv["sigma_conv/2"], rel=1e-3)  # warm start


def test_a_trial_without_normalization_logs_the_theory_and_sigma_conv(tmp_path):
    recorder = Recorder()
    train(TINY | {"variant": "none", "iterations": 10, "eval_every": 10}, recorder, workdir=tmp_path)
    log, evaluation = recorder.reports[0], recorder.reports[-1]
    layers = {key.removeprefix("grad_norm/D/") for key in log if key.startswith("grad_norm/D/")}
    for quantity in THEORY_QUANTITIES:
        assert {key.split("/", 1)[1] for key in log if key.startswith(f"{quantity}/")} == layers
    assert {key.split("/", 1)[1] for key in evaluation if key.startswith("sigma_conv/")} == layers
    assert not any(key.startswith("sigma/") for key in log)  # the official code's σ: SN family only
