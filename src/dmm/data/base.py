"""The in-memory dataset type and the dataset registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dmm.errors import DMMError


@dataclass
class ImageDataset:
    """Train and test images as uint8 tensors (N, C, H, W), labels as int64 tensors."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32, standardized per channel."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (x.float().div_(255.0) - mean) / std

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image."""
        return tuple(self.x_train.shape[1:])

    @property
    def pixel_range(self) -> tuple[float, float]:
        return pixel_range(self.mean, self.std)

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> ImageDataset:
        """The first n_train / n_test samples (for quick runs and tests)."""
        return ImageDataset(
            self.name,
            self.x_train[:n_train],
            self.y_train[:n_train],
            self.x_test[:n_test],
            self.y_test[:n_test],
            self.classes,
            self.mean,
            self.std,
        )


def pixel_range(mean: tuple[float, ...] | list[float], std: tuple[float, ...] | list[float]
                ) -> tuple[float, float]:
    """The widest (min, max) that pixels in [0, 1] take after per-channel normalization."""
    lo = min((0.0 - m) / s for m, s in zip(mean, std, strict=True))
    hi = max((1.0 - m) / s for m, s in zip(mean, std, strict=True))
    return lo, hi


Loader = Callable[[Path | None], ImageDataset]
_REGISTRY: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Register `fn(root) -> ImageDataset` under `name`."""

    def wrap(fn: Loader) -> Loader:
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_datasets() -> list[str]:
    return sorted(_REGISTRY)


def load_dataset(name: str, root: str | Path | None = None, *, n_train: int | None = None,
                 n_test: int | None = None) -> ImageDataset:
    """Load a registered dataset; `root` is the data folder (None: the dataset's default);
    `n_train` / `n_test` keep only the first samples of each split (quick runs)."""
    if name not in _REGISTRY:
        raise DMMError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    if root is not None:
        root = Path(root)
        if not root.exists():
            raise DMMError(f"data root {str(root)!r} does not exist")
    data = _REGISTRY[name](root)
    return data.subset(n_train, n_test) if (n_train or n_test) else data

