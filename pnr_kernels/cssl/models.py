"""Backbones and heads: a small CNN for digits, a CIFAR ResNet-18, and the MLP heads."""
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
    basic blocks (64, 128, 256, 512 channels), global average pooling: a 512-d feature."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
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


class Encoder(nn.Module):
    """Backbone followed by a projector; ``forward`` returns (features, projection)."""

    def __init__(self, dataset: str, in_channels: int, proj_hidden: int, proj_dim: int, *,
                 recipe: str = "default", method: str = "simclr"):
        super().__init__()
        self.backbone = DigitsCNN(in_channels) if dataset == "digits" else ResNet18CIFAR(in_channels)
        self.projector = projector(recipe, method, self.backbone.out_dim, proj_hidden, proj_dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        return h, self.projector(h)


def reset_parameters(module: nn.Module) -> None:
    """Re-draw every parameter of ``module`` (from the global torch RNG) and reset BN statistics."""
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()
