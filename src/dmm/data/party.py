"""One party's own data (data set name `party`): what a Flower SuperNode holds, and no more.

A *party file* is a `.npz` with
- `x`: uint8 images (N, C, H, W), `y`: integer labels (N,);
- `classes`: the class names (a str array), the same list for every party;
- `mean`, `std`: the per-channel normalization the parties agreed on (fractions of 255);
- `partition_id`, `num_partitions` (optional): which slice of a split it is.

With N = 0 it is a *description* of the data (image shape, classes, normalization) without a
single sample: what a server needs to build the model, and all it gets.

`--dataset party --data-root FILE` loads one as an `ImageDataset` whose test split is empty.
`write_parties` cuts a loaded data set along a Dirichlet partition into one file per party
plus the description, for a deployment rehearsed on one machine (`dmm.flower.deploy`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dmm.data.base import ImageDataset, register_dataset
from dmm.data.npz import _classes, _labels, _open, _take, to_nchw
from dmm.errors import DMMError


def write_party(path: str | Path, x: torch.Tensor, y: torch.Tensor, classes: list[str],
                mean: tuple[float, ...], std: tuple[float, ...], *, partition_id: int = -1,
                num_partitions: int = 0) -> Path:
    """Write one party file (see the module doc); `x` uint8 (N, C, H, W), `y` int labels."""
    from dmm.io import save_with

    path = Path(path)
    arrays = {"x": x.numpy().astype(np.uint8), "y": y.numpy().astype(np.int64),
              "classes": np.array(classes, dtype=str), "mean": np.array(mean, dtype=np.float64),
              "std": np.array(std, dtype=np.float64),
              "partition_id": np.array(partition_id, dtype=np.int64),
              "num_partitions": np.array(num_partitions, dtype=np.int64)}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    save_with(path, write)
    return path


def read_party(path: str | Path) -> tuple[ImageDataset, int, int]:
    """(the party's data as an ImageDataset with an empty test split, partition id,
    number of partitions); the id is -1 and the number 0 where the file names none."""
    path = Path(path)
    a = _open(path)
    x = to_nchw(_take(a, "x", path), str(path))
    y = _labels(_take(a, "y", path), len(x), str(path))
    classes = _classes(_take(a, "classes", path), str(path))
    mean = tuple(float(v) for v in np.atleast_1d(_take(a, "mean", path)))
    std = tuple(float(v) for v in np.atleast_1d(_take(a, "std", path)))
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise DMMError(f"{path}: mean and std need one value per channel ({x.shape[1]}), "
                       f"got {len(mean)} and {len(std)}")
    if any(not s > 0 for s in std):
        raise DMMError(f"{path}: std must be > 0, got {std}")
    if len(y) and int(y.max()) >= len(classes):
        raise DMMError(f"{path}: label {int(y.max())} but only {len(classes)} classes")
    pid = int(a.get("partition_id", np.array(-1)))
    n_parts = int(a.get("num_partitions", np.array(0)))
    xt = torch.from_numpy(x)
    data = ImageDataset("party", xt, torch.from_numpy(y), xt[:0], torch.from_numpy(y)[:0],
                        classes, mean, std)
    return data, pid, n_parts


@register_dataset("party")
def load_party(root: Path | None) -> ImageDataset:
    if root is None:
        raise DMMError("dataset party needs --data-root: a party file (.npz)")
    return read_party(root)[0]


def write_parties(data: ImageDataset, indices: list, folder: str | Path) -> tuple[Path, list[Path]]:
    """Cut `data`'s training split along `indices` (one index list per party, e.g. a
    `Partition`'s) into `party_<k>.npz` files and write `description.npz` (no sample) beside
    them; returns (description, party files)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    k = len(indices)
    files = []
    for pid, idx in enumerate(indices):
        idx = torch.as_tensor(idx, dtype=torch.long)
        files.append(write_party(folder / f"party_{pid}.npz", data.x_train[idx],
                                 data.y_train[idx], data.classes, data.mean, data.std,
                                 partition_id=pid, num_partitions=k))
    desc = write_party(folder / "description.npz", data.x_train[:0], data.y_train[:0],
                       data.classes, data.mean, data.std, num_partitions=k)
    return desc, files
