"""Shared fixtures: tiny synthetic image data and tiny models, built in the test."""

from __future__ import annotations

import pytest
import torch

from dmm.data.base import ImageDataset
from dmm.models import create

torch.set_num_threads(2)


def make_dataset(n_train: int = 200, n_test: int = 100, classes: int = 4, size: int = 16,
                 channels: int = 1, seed: int = 0) -> ImageDataset:
    """Class-dependent blobs: each class brightens its own quadrant, so a net can learn it."""
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        y = torch.arange(n) % classes
        x = torch.randint(0, 80, (n, channels, size, size), generator=g)
        h = size // 2
        for c in range(classes):
            r, col = divmod(c % 4, 2)
            x[y == c, :, r * h:(r + 1) * h, col * h:(col + 1) * h] += 150
        return x.clamp(0, 255).to(torch.uint8), y

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return ImageDataset("tiny", xtr, ytr, xte, yte, [str(c) for c in range(classes)],
                        (0.3,) * channels, (0.3,) * channels)


@pytest.fixture
def tiny_data() -> ImageDataset:
    return make_dataset()


def tiny_model(seed: int = 0, classes: int = 4, channels: int = 1):
    torch.manual_seed(seed)
    return create("resnet8", width=0.25, num_classes=classes, in_channels=channels)
