"""CIFAR-style ResNets (He et al., 2016): 3x3 stem, no max-pool, BasicBlocks, width multiplier.

`resnet18` is [2, 2, 2, 2] blocks with 64/128/256/512 channels at width 1 (width 0.25 gives
16/32/64/128, 0.70 M parameters); `resnet8` ([1, 1, 1] blocks, 32/64/128 channels at width 1)
is a small variant for tests and quick runs.
"""

from __future__ import annotations

import torch
from torch import nn

from dmm.models.registry import register_architecture


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stages of BasicBlocks; stage i has `channels[i]` channels and stride 2 from stage 2 on."""

    def __init__(
        self,
        blocks: list[int],
        channels: list[int],
        *,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], channels[0]
        for i, (n, c) in enumerate(zip(blocks, channels, strict=True)):
            layers = [BasicBlock(cin if j == 0 else c, c, 2 if (i > 0 and j == 0) else 1)
                      for j in range(n)]
            stages.append(nn.Sequential(*layers))
            cin = c
        self.layers = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in self.layers:
            x = stage(x)
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _widths(base: list[int], width: float) -> list[int]:
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return [max(1, int(round(c * width))) for c in base]


@register_architecture("resnet18")
def resnet18(*, width: float = 1.0, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet([2, 2, 2, 2], _widths([64, 128, 256, 512], width),
                  num_classes=num_classes, in_channels=in_channels)


@register_architecture("resnet8")
def resnet8(*, width: float = 1.0, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """Three stages of one block, 32/64/128 channels at width 1: quick runs and tests."""
    return ResNet([1, 1, 1], _widths([32, 64, 128], width),
                  num_classes=num_classes, in_channels=in_channels)
