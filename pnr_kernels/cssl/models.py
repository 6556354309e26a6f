"""Backbones and heads: a small CNN for digits, ResNet-18 (CIFAR or ImageNet stem), the MLP heads,
and the autocast of ``--precision`` around the backbone."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU layers (32, 64, 128 channels; strides 1, 2, 2) and global average
    pooling: a 128-d feature for 16x16 grayscale digits."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.layers = nn.Sequential(_conv_bn_relu(in_channels, 32, 1), _conv_bn_relu(32, 64, 2),
                                    _conv_bn_relu(64, 128, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18CIFAR(nn.Module):
    """ResNet-18 for 32x32 inputs: a 3x3 stride-1 stem without max-pooling, four stages of two
    basic blocks (64, 128, 256, 512 channels), global average pooling: a 512-d feature.

    ``imagenet_stem``: torchvision's stem instead (7x7 stride-2 conv-BN-ReLU, 3x3 stride-2
    max-pooling), as the authors' ResNet-18 on ImageNet-100 and DomainNet (their CIFAR runs swap
    it for the 3x3 one)."""

    def __init__(self, in_channels: int = 3, imagenet_stem: bool = False):
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = _conv_bn_relu(in_channels, 64, 1)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x)))


def mlp(in_dim: int, hidden: int, out_dim: int, *, layers: int = 2, batch_norm: bool = True) -> nn.Sequential:
    """``layers`` Linear layers with ``hidden``-wide (BatchNorm1d,) ReLU between them. The default
    (Linear, BatchNorm1d, ReLU, Linear) is the form of the default recipe's projectors, BYOL's
    predictor and the distillation predictor g."""
    modules, width = [], in_dim
    for _ in range(layers - 1):
        modules += [nn.Linear(width, hidden)] + ([nn.BatchNorm1d(hidden)] if batch_norm else []) + [nn.ReLU(inplace=True)]
        width = hidden
    return nn.Sequential(*modules, nn.Linear(width, out_dim))


def projector(recipe: str, method: str, in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """The projector of ``method`` under ``recipe``. ``paper`` follows the authors' code:
    SimCLR and MoCo Linear-ReLU-Linear (no BatchNorm), BYOL Linear-BN-ReLU-Linear, VICReg and
    Barlow Twins three Linear layers with BN-ReLU between them; ``default`` uses the two-layer BN
    MLP for every method."""
    if recipe == "paper":
        if method in ("simclr", "mocov2plus"):
            return mlp(in_dim, hidden, out_dim, batch_norm=False)
        if method in ("vicreg", "barlow"):
            return mlp(in_dim, hidden, out_dim, layers=3)
    return mlp(in_dim, hidden, out_dim)


PRECISION_DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def backbone_features(backbone: nn.Module, x: torch.Tensor, precision: str = "32") -> torch.Tensor:
    """``backbone(x)``, under ``torch.autocast`` at ``precision`` (bf16/fp16; "32": none), as float32."""
    dtype = PRECISION_DTYPES[precision]
    if dtype is None:
        return backbone(x)
    with torch.autocast(x.device.type, dtype=dtype):
        h = backbone(x)
    return h.float()


class Encoder(nn.Module):
    """Backbone followed by a projector; ``forward`` returns (features, projection).

    With ``precision`` bf16/fp16 the backbone runs under autocast and its features are cast back
    to float32: the projector, the predictors and every loss compute in float32."""

    def __init__(self, dataset: str, in_channels: int, proj_hidden: int, proj_dim: int, *,
                 recipe: str = "default", method: str = "simclr", precision: str = "32"):
        super().__init__()
        self.backbone = DigitsCNN(in_channels) if dataset == "digits" else ResNet18CIFAR(
            in_channels, imagenet_stem=dataset == "imagefolder")
        self.projector = projector(recipe, method, self.backbone.out_dim, proj_hidden, proj_dim)
        self.precision = precision

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = backbone_features(self.backbone, x, self.precision)
        return h, self.projector(h)


def reset_parameters(module: nn.Module) -> None:
    """Re-draw every parameter of ``module`` (from the global torch RNG) and reset BN statistics."""
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()
