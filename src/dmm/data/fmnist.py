"""Fashion-MNIST from the idx files (Debian package `dataset-fashion-mnist`), padded to 32x32.

Xiao et al., 2017, arXiv:1708.07747. The default folder is the Debian package's; `DMM_DATA_DIR`
or `--data-root` points elsewhere. Images are padded with zeros from 28x28 to 32x32 so that the
CIFAR-style networks run unchanged.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from dmm.data.base import ImageDataset, register_dataset
from dmm.errors import DMMError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MEAN, STD = (0.2860,), (0.3530,)


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DMMError(f"{path}: cannot read idx file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DMMError(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - header != int(np.prod(dims)):
        raise DMMError(f"{path}: expected {int(np.prod(dims))} bytes of data for shape {dims}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).exists():
            return folder / name
    raise DMMError(
        f"Fashion-MNIST file {stem}[.gz] not found in {folder}; install the Debian package "
        "`dataset-fashion-mnist` (make setup does) or point --data-root / DMM_DATA_DIR at "
        "the idx files"
    )


@register_dataset("fmnist")
def load_fmnist(root: Path | None = None) -> ImageDataset:
    folder = Path(root) if root is not None else Path(os.environ.get("DMM_DATA_DIR", DEFAULT_DIR))
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
        if len(x) != len(y):
            raise DMMError(f"{folder}: {split} has {len(x)} images but {len(y)} labels")
        x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None]
        arrays[split] = (torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64)))
    return ImageDataset("fmnist", *arrays["train"], *arrays["test"], list(CLASSES), MEAN, STD)
