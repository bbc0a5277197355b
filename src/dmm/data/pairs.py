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

