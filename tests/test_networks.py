"""Claims about trainables.networks: parameter counts that follow, layer by layer, the tables of SNGAN (Miyato
et al. 2018, appendix) and the official BSN code; output shapes and ranges; the width multiplier; the
initialisation of the official code; and errors that name the bad argument."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainables.networks import build_discriminator, build_generator

torch.set_num_threads(1)

BUILDS = [("standard_cnn", 32), ("standard_cnn", 48), ("standard_cnn", 64), ("resnet", 32), ("resnet", 128)]


# Parameter counts, written from the published layer tables (weights + biases; BN: scale + shift).
def conv(k: int, c_in: int, c_out: int, bias: bool = True) -> int:
    return k * k * c_in * c_out + (c_out if bias else 0)


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def bn(c: int) -> int:
    return 2 * c


def standard_cnn_generator_count(resolution: int, width: float, z_dim: int = 128) -> int:
    mg = resolution // 8
    c512, c256, c128, c64 = (round(c * width) for c in (512, 256, 128, 64))
    return (linear(z_dim, mg * mg * c512) + bn(mg * mg * c512)
            + conv(4, c512, c256) + bn(c256) + conv(4, c256, c128) + bn(c128) + conv(4, c128, c64) + bn(c64)
            + conv(3, c64, 3))


def standard_cnn_discriminator_count(resolution: int, width: float) -> int:
    mg = resolution // 8
    table = [(3, 3, 64), (4, 64, 64), (3, 64, 128), (4, 128, 128), (3, 128, 256), (4, 256, 256),
             (3, 256, 512)]  # (kernel, c_in, c_out)
    convs = sum(conv(k, 3 if c_in == 3 else round(c_in * width), round(c_out * width))
                for k, c_in, c_out in table)
    return convs + linear(mg * mg * round(512 * width), 1)


def up_block(c_in: int, c_out: int) -> int:
    return bn(c_in) + conv(3, c_in, c_out) + bn(c_out) + conv(3, c_out, c_out) + conv(1, c_in, c_out)


def down_block(c_in: int, c_out: int, shortcut: bool = True) -> int:
    return conv(3, c_in, c_out) + conv(3, c_out, c_out) + (conv(1, c_in, c_out) if shortcut else 0)


def resnet_generator_count(resolution: int, width: float, z_dim: int = 128) -> int:
    c = [round(ch * width) for ch in ((256,) * 4 if resolution == 32 else (1024, 1024, 512, 256, 128, 64))]
    blocks = sum(up_block(c_in, c_out) for c_in, c_out in zip(c[:-1], c[1:], strict=True))
    return linear(z_dim, 16 * c[0]) + blocks + bn(c[-1]) + conv(3, c[-1], 3)


def resnet_discriminator_count(resolution: int, width: float) -> int:
    if resolution == 32:  # SNGAN CIFAR: optimized block, down block, two blocks with identity shortcuts
        c = round(128 * width)
        return (down_block(3, c) + down_block(c, c) + 2 * down_block(c, c, shortcut=False)
                + linear(c, 1, bias=False))
    c = [round(ch * width) for ch in (64, 128, 256, 512, 1024, 1024)]
    return (down_block(3, c[0]) + sum(down_block(a, b) for a, b in zip(c[:-1], c[1:], strict=True))
            + linear(c[-1], 1))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("width", [1.0, 0.25])
@pytest.mark.parametrize("architecture,resolution", BUILDS)
def test_parameter_counts_match_the_published_layer_tables(architecture, resolution, width):
    if architecture == "standard_cnn":
        expected_g = standard_cnn_generator_count(resolution, width)
        expected_d = standard_cnn_discriminator_count(resolution, width)
    else:
        expected_g = resnet_generator_count(resolution, width)
        expected_d = resnet_discriminator_count(resolution, width)
    assert count(build_generator(architecture, resolution, width=width)) == expected_g
    assert count(build_discriminator(architecture, resolution, width=width)) == expected_d


def test_standard_cnn_discriminator_convs_follow_the_paper_table_in_order():
    convs = [m for m in build_discriminator("standard_cnn", 32).modules() if isinstance(m, nn.Conv2d)]
    assert [(m.kernel_size[0], m.stride[0], m.out_channels) for m in convs] == [
        (3, 1, 64), (4, 2, 64), (3, 1, 128), (4, 2, 128), (3, 1, 256), (4, 2, 256), (3, 1, 512)]


@pytest.mark.parametrize("resolution,sizes", [(32, [16, 8, 8, 8]), (128, [64, 32, 16, 8, 4, 4])])
def test_resnet_discriminator_blocks_downsample_as_sngan_and_bsn(resolution, sizes):
    discriminator = build_discriminator("resnet", resolution, width=0.125)
    seen = []
    for block in discriminator.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append(out.shape[-1]))
    discriminator(torch.randn(2, 3, resolution, resolution))
    assert seen == sizes


@pytest.mark.parametrize("architecture,resolution", BUILDS)
def test_shapes_are_images_to_one_logit_per_image(architecture, resolution):
    torch.manual_seed(0)
    generator = build_generator(architecture, resolution, z_dim=16, width=0.125)
    discriminator = build_discriminator(architecture, resolution, width=0.125)
    images = generator(torch.randn(3, 16))
    assert images.shape == (3, 3, resolution, resolution)
    assert discriminator(images).shape == (3,)


def test_gray_images_take_out_and_in_channels():
    generator = build_generator("standard_cnn", 32, width=0.125, out_channels=1)
    discriminator = build_discriminator("standard_cnn", 32, width=0.125, in_channels=1)
    images = generator(torch.randn(2, 128))
    assert images.shape == (2, 1, 32, 32) and discriminator(images).shape == (2,)


@pytest.mark.parametrize("architecture,resolution", BUILDS)
def test_generator_output_is_bounded_by_tanh_even_when_saturated(architecture, resolution):
    torch.manual_seed(0)
    generator = build_generator(architecture, resolution, width=0.125)
    with torch.no_grad():
        generator.to_rgb.weight.mul_(1e4)  # pre-activations far beyond [-1, 1]
    images = generator(torch.randn(4, 128))
    assert images.min() >= -1 and images.max() <= 1
    assert images.min() < -0.999 and images.max() > 0.999  # the bound is reached, so it was exercised


@pytest.mark.parametrize("architecture,resolution", BUILDS)
def test_discriminator_weights_are_conv_and_linear_only_and_head_is_the_output(architecture, resolution):
    discriminator = build_discriminator(architecture, resolution, width=0.125)
    with_weights = {type(m) for m in discriminator.modules() if list(m.parameters(recurse=False))}
    assert with_weights == {nn.Conv2d, nn.Linear}
    assert isinstance(discriminator.head, nn.Linear) and discriminator.head.out_features == 1
    with torch.no_grad():
        discriminator.head.weight.zero_()
        if discriminator.head.bias is not None:
            discriminator.head.bias.fill_(0.7)
    expected = 0.0 if discriminator.head.bias is None else 0.7
    logits = discriminator(torch.randn(2, 3, resolution, resolution))
    torch.testing.assert_close(logits, torch.full((2,), expected))


@pytest.mark.parametrize("resolution", [32, 128])
def test_resnet_head_reads_globally_sum_pooled_relu_features(resolution):
    torch.manual_seed(0)
    discriminator = build_discriminator("resnet", resolution, width=0.125)
    with torch.no_grad():
        discriminator.head.weight.fill_(1.0)
        if discriminator.head.bias is not None:
            discriminator.head.bias.zero_()
        x = torch.randn(2, 3, resolution, resolution)
        features = discriminator.blocks(x)
        torch.testing.assert_close(discriminator(x), features.relu().sum(dim=(1, 2, 3)))


def test_resnet_head_has_a_bias_at_128_px_only():
    # SNGAN's snresnet_32 builds its last linear layer with nobias=True; the BSN ImageNet code has a bias.
    assert build_discriminator("resnet", 32).head.bias is None
    assert build_discriminator("resnet", 128, width=0.125).head.bias is not None


@pytest.mark.parametrize("architecture,resolution", BUILDS)
def test_width_half_halves_every_hidden_channel_count(architecture, resolution):
    z_dim = 100  # distinct from every hidden width, so that it can be told apart
    for build, kwargs in ((build_generator, {"z_dim": z_dim}), (build_discriminator, {})):
        full = dict(build(architecture, resolution, width=1.0, **kwargs).named_parameters())
        half = dict(build(architecture, resolution, width=0.5, **kwargs).named_parameters())
        assert full.keys() == half.keys()
        for name, param in full.items():
            # image channels, z and the single logit stay; every hidden width halves
            expected = tuple(d if d in (1, 3, z_dim) else d // 2 for d in param.shape)
            if param.dim() == 4:
                expected = expected[:2] + tuple(param.shape[2:])  # kernel sizes stay
            assert tuple(half[name].shape) == expected, name


def test_width_rounds_half_up_and_keeps_at_least_one_channel():
    def conv_widths(width: float) -> list[int]:
        discriminator = build_discriminator("standard_cnn", 32, width=width)
        return [m.out_channels for m in discriminator.modules() if isinstance(m, nn.Conv2d)]

    assert conv_widths(5 / 128) == [3, 3, 5, 5, 10, 10, 20]  # 64 * 5/128 = 2.5 -> 3
    assert conv_widths(0.3) == [19, 19, 38, 38, 77, 77, 154]
    assert conv_widths(1e-3) == [1] * 7
    generator = build_generator("standard_cnn", 32, width=1e-3)
    assert generator(torch.randn(2, 128)).shape == (2, 3, 32, 32)


def normal_tail(k: float) -> float:
    """P(|X| > k) for a standard normal X."""
    return math.erfc(k / math.sqrt(2))


def truncated_std(k: float) -> float:
    """Standard deviation of a standard normal truncated to [-k, k]."""
    pdf = math.exp(-k * k / 2) / math.sqrt(2 * math.pi)
    return math.sqrt(1 - 2 * k * pdf / (1 - normal_tail(k)))


def test_standard_cnn_discriminator_convs_are_truncated_normal_std_002_at_two_std():
    torch.manual_seed(0)
    discriminator = build_discriminator("standard_cnn", 32)
    convs = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert weights.abs().max() <= 0.04
    assert weights.std().item() == pytest.approx(0.02 * truncated_std(2.0), rel=0.01)  # 0.0176
    inside_one_std = (weights.abs() < 0.02).float().mean().item()
    assert inside_one_std == pytest.approx((1 - normal_tail(1)) / (1 - normal_tail(2)), abs=0.003)  # 0.715
    for m in convs:  # every layer, not only the pooled weights
        assert m.weight.std().item() == pytest.approx(0.02 * truncated_std(2.0), rel=0.1)
        assert not m.bias.any()
    head = discriminator.head.weight
    assert head.std().item() == pytest.approx(0.02, rel=0.05) and head.abs().max() > 0.04  # normal, not cut
    assert not discriminator.head.bias.any()


def test_standard_cnn_generator_is_normal_std_002_with_zero_biases():
    torch.manual_seed(0)
    generator = build_generator("standard_cnn", 32)
    layers = [m for m in generator.modules() if isinstance(m, nn.Linear | nn.Conv2d | nn.ConvTranspose2d)]
    assert len(layers) == 5
    weights = torch.cat([m.weight.flatten() for m in layers])
    assert weights.std().item() == pytest.approx(0.02, rel=0.01)
    assert (weights.abs() > 0.04).float().mean().item() == pytest.approx(normal_tail(2), abs=0.002)
    for m in layers:
        assert m.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert not m.bias.any()
    for m in generator.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            assert (m.weight == 1).all() and not m.bias.any()


def glorot_bound(layer: nn.Conv2d | nn.Linear, gain: float) -> float:
    receptive = layer.weight[0, 0].numel()
    fan_in, fan_out = layer.weight.shape[1] * receptive, layer.weight.shape[0] * receptive
    return gain * math.sqrt(6 / (fan_in + fan_out))


@pytest.mark.parametrize("build", [build_generator, build_discriminator])
def test_resnet_is_glorot_uniform_gain_sqrt2_on_block_3x3_convs_and_1_elsewhere(build):
    torch.manual_seed(0)
    network = build("resnet", 32)
    layers = {name: m for name, m in network.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert layers
    for name, layer in layers.items():
        in_block = name.startswith("blocks.") and name.rsplit(".", 1)[1] in ("conv1", "conv2")
        gain = math.sqrt(2) if in_block else 1.0
        bound = glorot_bound(layer, gain)
        w = layer.weight
        assert w.abs().max() <= bound, name
        if w.numel() >= 1000:  # uniform: the bound is (nearly) reached and std = bound / sqrt(3)
            assert w.abs().max() > 0.99 * bound, name
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name
        assert layer.bias is None or not layer.bias.any(), name
    # the 3x3 convs inside blocks get sqrt(2); G's 3x3 output conv keeps gain 1 as SNGAN's and BSN's code
    if build is build_generator:
        assert network.to_rgb.weight.abs().max() <= glorot_bound(network.to_rgb, 1.0)


@pytest.mark.parametrize("build", [build_generator, build_discriminator])
def test_unknown_architecture_names_the_argument_and_valid_values(build):
    with pytest.raises(ValueError, match=r"architecture: 'dcgan'.*valid: standard_cnn, resnet"):
        build("dcgan", 32)


@pytest.mark.parametrize("architecture,resolution,valid", [("standard_cnn", 128, "32, 48, 64"),
                                                           ("resnet", 64, "32, 128")])
def test_unsupported_resolution_names_the_argument_and_valid_values(architecture, resolution, valid):
    for build in (build_generator, build_discriminator):
        with pytest.raises(ValueError, match=rf"resolution: {resolution} px.*valid: {valid}"):
            build(architecture, resolution)


@pytest.mark.parametrize("width", [0, -0.5, math.nan, math.inf])
def test_width_must_be_a_finite_positive_number(width):
    for build in (build_generator, build_discriminator):
        with pytest.raises(ValueError, match="width: must be a finite number > 0"):
            build("standard_cnn", 32, width=width)


def test_channel_arguments_must_be_positive_integers():
    with pytest.raises(ValueError, match="z_dim: must be an integer >= 1"):
        build_generator("standard_cnn", 32, z_dim=0)
    with pytest.raises(ValueError, match="out_channels: must be an integer >= 1"):
        build_generator("resnet", 32, out_channels=0)
    with pytest.raises(ValueError, match="in_channels: must be an integer >= 1"):
        build_discriminator("resnet", 32, in_channels=2.5)
