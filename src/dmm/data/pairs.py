"""Image + text pairs with a label (CrisisMMD, the offline emoji stand-in)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PairSplit:
    images: torch.Tensor           # uint8 (N, C, H, W)
    texts: list[str]
    labels: torch.Tensor           # int64 (N,)
    ids: list[str]                 # one id per row (e.g. CrisisMMD image_id)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class PairDataset:
    name: str
    splits: dict[str, PairSplit]   # "train", "dev", "test" (those that exist)
    classes: list[str]
    mean: tuple[float, ...]        # per-channel image statistics of the train split (0..1 scale)
    std: tuple[float, ...]
    info: dict = field(default_factory=dict)  # e.g. rows skipped and why

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(self.mean).view(1, -1, 1, 1)
        s = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x.float() / 255.0 - m) / s


def channel_stats(images: torch.Tensor, chunk: int = 1024) -> tuple[tuple[float, ...],
                                                                     tuple[float, ...]]:
    """Per-channel mean and std of uint8 images on the 0..1 scale (float64, chunked)."""
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    n = 0
    for i in range(0, len(images), chunk):
        x = images[i: i + chunk].to(torch.float64) / 255.0
        s += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    if n == 0:
        return (0.5,) * c, (0.5,) * c
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
