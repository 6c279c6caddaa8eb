"""The generators and discriminators of the BSN paper (Lin, Sekar, Fanti, arXiv:2009.02773), as its official
code (fjxmlzn/BSN) and SNGAN's (Miyato et al., pfnet-research/sngan_projection) build them.

`build_generator(architecture, resolution)`: z (B, z_dim) -> images (B, C, R, R) in [-1, 1].
`build_discriminator(architecture, resolution)`: images (B, C, R, R) -> logits (B,).

Standard CNN (R = 32, 48, 64; mg = R / 8), every conv padded to keep or halve the size ("SAME"):

  G  z -> linear mg*mg*512 -> BN, ReLU -> deconv 4x4 s2 256 -> BN, ReLU -> deconv 4x4 s2 128 -> BN, ReLU
     -> deconv 4x4 s2 64 -> BN, ReLU -> conv 3x3 s1 C -> tanh
  D  conv 3x3 s1 64, 4x4 s2 64, 3x3 s1 128, 4x4 s2 128, 3x3 s1 256, 4x4 s2 256, 3x3 s1 512 (each followed
     by leaky ReLU 0.1) -> linear 1
  Init: D convs truncated normal std 0.02 (cut at 2 std, TF's truncated_normal_initializer); linear layers
  and every G layer normal std 0.02; biases 0.

ResNet (pre-activation residual blocks, nearest-neighbour upsampling, 2x2 average-pool downsampling):

  32 px (SNGAN's CIFAR-10 model, resnet_32 / snresnet_32):
  G  z -> linear 4*4*256 -> 3 up-blocks 256 -> BN, ReLU -> conv 3x3 C -> tanh
  D  down-block 128 (first: no pre-activation), down-block 128, block 128, block 128 (identity shortcuts)
     -> ReLU -> global sum pool -> linear 1 (no bias, as SNGAN)
  128 px (the BSN ImageNet model, no_gamma-ResNet):
  G  z -> linear 4*4*1024 -> up-blocks 1024, 512, 256, 128, 64 -> BN, ReLU -> conv 3x3 C -> tanh
  D  down-blocks 64 (first), 128, 256, 512, 1024, then a block 1024 without downsampling -> ReLU
     -> global sum pool -> linear 1; hidden width = output width and every shortcut is a 1x1 conv, as the
     BSN code (SNGAN's snresnet_128 differs: hidden = input width, identity shortcut in the last block).
  Init: Glorot (Xavier) uniform, gain sqrt(2) on the 3x3 convs inside residual blocks, gain 1 on shortcuts,
  linear layers and G's output conv (as both codes); biases 0.

`width` multiplies every hidden channel count (rounded half up, at least 1); 1.0 is the paper's network.
Discriminators hold only Conv2d and Linear weight layers (trainables.normalization parametrizes all of
them); the output layer is `D.head`. Layer names are what MLflow metrics show: `blocks.conv3`,
`blocks.res2.shortcut`, `head`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from itertools import pairwise

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from trainables.config import ARCHITECTURES, check_resolution

STANDARD_CNN_STD = 0.02  # N(0, 0.02) initialisation of the standard CNN (DCGAN's, kept by SNGAN and BSN)
LEAK = 0.1  # the standard CNN discriminator's leaky ReLU slope
RESNET_BOTTOM = 4  # spatial size of the ResNet generator's first feature map

# Standard CNN discriminator: (kernel, stride, output channels) per conv, in order.
STANDARD_D_CONVS = ((3, 1, 64), (4, 2, 64), (3, 1, 128), (4, 2, 128), (3, 1, 256), (4, 2, 256), (3, 1, 512))
STANDARD_G_CHANNELS = (512, 256, 128, 64)  # the linear layer's feature maps, then each deconv's output


def scaled_channels(channels: int, width: float) -> int:
    """A channel count times the width multiplier, rounded half up, at least 1."""
    return max(1, math.floor(channels * width + 0.5))


class StandardGenerator(nn.Module):
    """SNGAN's standard CNN generator: z (B, z_dim) -> (B, out_channels, 8*mg, 8*mg) in [-1, 1]."""

    def __init__(self, mg: int, *, z_dim: int = 128, width: float = 1.0, out_channels: int = 3):
        super().__init__()
        c = [scaled_channels(ch, width) for ch in STANDARD_G_CHANNELS]
        self.mg, self.base_channels = mg, c[0]
        self.project = nn.Linear(z_dim, mg * mg * c[0])
        # BN over each of the mg*mg*C linear outputs, before the reshape, as SNGAN's and BSN's code.
        self.project_bn = nn.BatchNorm1d(mg * mg * c[0])
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (c_in, c_out) in enumerate(pairwise(c), start=1):
            layers[f"deconv{i}"] = nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1)
            layers[f"bn{i}"] = nn.BatchNorm2d(c_out)
            layers[f"relu{i}"] = nn.ReLU()
        self.blocks = nn.Sequential(layers)
        self.to_rgb = nn.Conv2d(c[-1], out_channels, kernel_size=3, stride=1, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d | nn.ConvTranspose2d):
                nn.init.normal_(module.weight, std=STANDARD_CNN_STD)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                module.reset_parameters()

    def forward(self, z: Tensor) -> Tensor:
        h = F.relu(self.project_bn(self.project(z)))
        h = h.view(-1, self.base_channels, self.mg, self.mg)
        return torch.tanh(self.to_rgb(self.blocks(h)))


class StandardDiscriminator(nn.Module):
    """SNGAN's standard CNN discriminator: (B, in_channels, 8*mg, 8*mg) -> logits (B,)."""

    def __init__(self, mg: int, *, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = in_channels
        for i, (kernel, stride, channels) in enumerate(STANDARD_D_CONVS, start=1):
            c_out = scaled_channels(channels, width)
            # padding 1 is TF's "SAME" for both 3x3 s1 and 4x4 s2 on even sizes.
            layers[f"conv{i}"] = nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride, padding=1)
            layers[f"lrelu{i}"] = nn.LeakyReLU(LEAK)
            c_in = c_out
        self.blocks = nn.Sequential(layers)
        self.head = nn.Linear(mg * mg * c_in, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = STANDARD_CNN_STD
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x).flatten(1)).squeeze(1)


def glorot_(layer: nn.Conv2d | nn.Linear, gain: float = 1.0) -> None:
    """Glorot (Xavier) uniform weights, as TF's variance_scaling(gain**2, fan_avg, uniform); bias 0."""
    nn.init.xavier_uniform_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class UpBlock(nn.Module):
    """Generator residual block: BN, ReLU, 2x nearest upsample, conv 3x3, BN, ReLU, conv 3x3; shortcut:
    upsample, conv 1x1. (B, c_in, H, W) -> (B, c_out, 2H, 2W)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, kernel_size=1)
        glorot_(self.conv1, math.sqrt(2))
        glorot_(self.conv2, math.sqrt(2))
        glorot_(self.shortcut)

    def forward(self, x: Tensor) -> Tensor:
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class DownBlock(nn.Module):
    """Discriminator residual block: [ReLU], conv 3x3, ReLU, conv 3x3, [2x2 average pool]; shortcut: a 1x1
    conv (pooled too) or the identity. (B, c_in, H, W) -> (B, c_out, H/2 or H, W/2 or W).

    first: the block that sees the images (SNGAN's OptimizedBlock): no pre-activation, and its shortcut
    pools before the 1x1 conv (the two commute; pooling 3 channels first is cheaper).
    """

    def __init__(self, c_in: int, c_hidden: int, c_out: int, *, downsample: bool, first: bool = False,
                 learnable_shortcut: bool = True):
        super().__init__()
        self.downsample, self.first = downsample, first
        self.conv1 = nn.Conv2d(c_in, c_hidden, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c_hidden, c_out, kernel_size=3, padding=1)
        glorot_(self.conv1, math.sqrt(2))
        glorot_(self.conv2, math.sqrt(2))
        if learnable_shortcut:
            self.shortcut = nn.Conv2d(c_in, c_out, kernel_size=1)
            glorot_(self.shortcut)
        elif c_in != c_out or downsample:
            raise ValueError("an identity shortcut needs c_in == c_out and no downsampling")
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x if self.first else F.relu(x))
        h = self.conv2(F.relu(h))
        if self.first:
            return F.avg_pool2d(h, 2) + self.shortcut(F.avg_pool2d(x, 2))
        s = self.shortcut(x)
        if self.downsample:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class ResNetGenerator(nn.Module):
    """z (B, z_dim) -> linear -> (B, c[0], 4, 4) -> one UpBlock per later entry of c -> BN, ReLU, conv 3x3,
    tanh: (B, out_channels, 4 * 2**(len(c) - 1), ...) in [-1, 1]."""

    def __init__(self, channels: tuple[int, ...], *, z_dim: int = 128, out_channels: int = 3):
        super().__init__()
        self.base_channels = channels[0]
        self.project = nn.Linear(z_dim, RESNET_BOTTOM * RESNET_BOTTOM * channels[0])
        self.blocks = nn.Sequential(OrderedDict(
            (f"up{i}", UpBlock(c_in, c_out)) for i, (c_in, c_out) in enumerate(pairwise(channels), 1)
        ))
        self.bn = nn.BatchNorm2d(channels[-1])
        self.to_rgb = nn.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1)
        glorot_(self.project)
        glorot_(self.to_rgb)

    def forward(self, z: Tensor) -> Tensor:
        h = self.project(z).view(-1, self.base_channels, RESNET_BOTTOM, RESNET_BOTTOM)
        return torch.tanh(self.to_rgb(F.relu(self.bn(self.blocks(h)))))


class ResNetDiscriminator(nn.Module):
    """(B, C, R, R) -> DownBlocks -> ReLU -> sum over H, W -> linear `head` -> logits (B,)."""

    def __init__(self, blocks: list[DownBlock], *, head_bias: bool):
        super().__init__()
        self.blocks = nn.Sequential(OrderedDict((f"res{i}", block) for i, block in enumerate(blocks, 1)))
        self.head = nn.Linear(blocks[-1].conv2.out_channels, 1, bias=head_bias)
        glorot_(self.head)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.blocks(x)).sum(dim=(2, 3))).squeeze(1)


def resnet_discriminator(resolution: int, width: float, in_channels: int) -> ResNetDiscriminator:
    if resolution == 32:  # SNGAN snresnet_32: 128 channels throughout, identity shortcuts in blocks 3 and 4
        c = scaled_channels(128, width)
        blocks = [
            DownBlock(in_channels, c, c, downsample=True, first=True),
            DownBlock(c, c, c, downsample=True),
            DownBlock(c, c, c, downsample=False, learnable_shortcut=False),
            DownBlock(c, c, c, downsample=False, learnable_shortcut=False),
        ]
        return ResNetDiscriminator(blocks, head_bias=False)
    c = [scaled_channels(ch, width) for ch in (64, 128, 256, 512, 1024, 1024)]  # BSN no_gamma-ResNet, 128 px
    blocks = [DownBlock(in_channels, c[0], c[0], downsample=True, first=True)]
    # The last block keeps 4x4 (no downsampling), yet has a 1x1-conv shortcut in the BSN code.
    blocks += [DownBlock(c_in, c_out, c_out, downsample=i < 4) for i, (c_in, c_out) in enumerate(pairwise(c))]
    return ResNetDiscriminator(blocks, head_bias=True)


def check_architecture(architecture: str, resolution: int, width: float) -> None:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture: {architecture!r} is not known; valid: {', '.join(ARCHITECTURES)}")
    check_resolution(architecture, resolution)
    if not (isinstance(width, int | float) and math.isfinite(width) and width > 0):
        raise ValueError(f"width: must be a finite number > 0 (1.0 is the paper's network), got {width!r}")


def check_positive(name: str, value: int) -> None:
    if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")


def build_generator(architecture: str, resolution: int, *, z_dim: int = 128, width: float = 1.0,
                    out_channels: int = 3) -> nn.Module:
    """The paper's generator: forward(z: (B, z_dim)) -> (B, out_channels, R, R) in [-1, 1].

    architecture: one of trainables.config.ARCHITECTURES; resolution: R in RESOLUTIONS[architecture] (px).
    """
    check_architecture(architecture, resolution, width)
    check_positive("z_dim", z_dim)
    check_positive("out_channels", out_channels)
    if architecture == "standard_cnn":
        return StandardGenerator(resolution // 8, z_dim=z_dim, width=width, out_channels=out_channels)
    widths = (256, 256, 256, 256) if resolution == 32 else (1024, 1024, 512, 256, 128, 64)
    channels = tuple(scaled_channels(ch, width) for ch in widths)
    return ResNetGenerator(channels, z_dim=z_dim, out_channels=out_channels)


def build_discriminator(architecture: str, resolution: int, *, width: float = 1.0,
                        in_channels: int = 3) -> nn.Module:
    """The paper's discriminator: forward(x: (B, in_channels, R, R)) -> (B,) logits; output layer `.head`.

    Only Conv2d and Linear layers carry weights (no normalization here: trainables.normalization adds it).
    """
    check_architecture(architecture, resolution, width)
    check_positive("in_channels", in_channels)
    if architecture == "standard_cnn":
        return StandardDiscriminator(resolution // 8, width=width, in_channels=in_channels)
    return resnet_discriminator(resolution, width, in_channels)
