"""Shared fixtures: tiny synthetic image data and tiny models, built in the test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dmm.data.base import ImageDataset
from dmm.federated import TrainConfig, train_local
from dmm.models import create

torch.set_num_threads(2)

SHAPE = (1, 16, 16)  # the (C, H, W) of make_dataset's images and tiny_model's input


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


def write_npz(path, n_train: int = 120, n_test: int = 40):
    """A tiny data set in dmm's .npz format (NCHW uint8 images, int labels)."""
    d = make_dataset(n_train=n_train, n_test=n_test)
    np.savez(path, x_train=d.x_train.numpy(), y_train=d.y_train.numpy(),
             x_test=d.x_test.numpy(), y_test=d.y_test.numpy())
    return path


@pytest.fixture
def npz_file(tmp_path):
    return write_npz(tmp_path / "tiny.npz")


@pytest.fixture
def tiny_data() -> ImageDataset:
    return make_dataset()


def tiny_model(seed: int = 0, classes: int = 4, channels: int = 1):
    torch.manual_seed(seed)
    return create("resnet8", width=0.25, num_classes=classes, in_channels=channels)


def trained_model(data, seed=0, steps=30, classes=None):
    """A tiny model trained briefly on `data` (optionally only on some classes)."""
    m = tiny_model(seed)
    x, y = data.x_train, data.y_train
    if classes is not None:
        keep = torch.isin(y, torch.tensor(classes))
        x, y = x[keep], y[keep]
    train_local(m, x, y, data.normalize, TrainConfig(local_iters=steps, batch_size=32,
                                                     lr=0.05, bf16=False),
                generator=torch.Generator().manual_seed(seed))
    return m.eval()


@pytest.fixture(scope="module")
def data():
    return make_dataset(n_train=240, n_test=80)


@pytest.fixture(scope="module")
def experts(data):
    """Four briefly trained experts, each on two of the four classes."""
    return [trained_model(data, seed=k, classes=[k % 4, (k + 1) % 4]) for k in range(4)]


def run_cli(*args, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m dmm.cli ARGS` in a subprocess (tests/ importable for user architectures)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "PYTHONWARNINGS": "ignore",
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "dmm.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def expect_cli_error(r: subprocess.CompletedProcess, needle: str, out=None) -> None:
    """Exit status 2, one line on stderr naming `needle`, no traceback, no output file."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    if out is not None:
        assert not Path(out).exists() or (Path(out).is_dir() and not any(Path(out).iterdir()))
