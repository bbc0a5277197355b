"""Users' own image data from `.npz` files (dataset name `npz`).

`--data-root` is either

* one `.npz` file with `x_train`, `y_train`, `x_test`, `y_test` and optionally `classes`, or
* a folder with `train.npz` and `test.npz`, each holding `x` and `y` (`train.npz` may also hold
  `classes`).

Images are uint8, NHWC or NCHW (or (N, H, W) for one channel); labels are integers in [0, C).
Files are loaded with `allow_pickle=False`, so store `classes` as a str array, not objects.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from dmm.data.base import ImageDataset, register_dataset
from dmm.errors import DMMError

_CHANNELS = (1, 3)
_CHUNK = 4096  # images per step when computing statistics, to bound float64 temporaries


def _open(path: Path) -> dict[str, np.ndarray]:
    """All arrays of one .npz file, read eagerly so the file is closed on return."""
    if not path.is_file():
        raise DMMError(f"{path}: file not found")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DMMError(f"{path}: not a readable .npz file ({e})") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DMMError(f"{path}: expected a .npz archive (np.savez), found a single array")
    arrays: dict[str, np.ndarray] = {}
    with loaded:
        for key in loaded.files:
            try:
                arrays[key] = loaded[key]
            except ValueError as e:  # object arrays need pickle, which is refused
                raise DMMError(
                    f"{path}: array {key!r} cannot be loaded without pickle ({e}); "
                    "store it with a plain dtype (e.g. classes as a str array)"
                ) from e
            except (OSError, EOFError, zipfile.BadZipFile) as e:
                raise DMMError(f"{path}: array {key!r} is unreadable ({e})") from e
    return arrays


def _take(arrays: dict[str, np.ndarray], key: str, path: Path) -> np.ndarray:
    if key not in arrays:
        raise DMMError(f"{path}: missing array {key!r} (has {', '.join(sorted(arrays)) or 'none'})")
    return arrays[key]


def to_nchw(x: np.ndarray, source: str) -> np.ndarray:
    """uint8 images in NHWC, NCHW or (N, H, W) -> contiguous NCHW.

    NHWC is assumed when the last dimension is 1 or 3 and dimension 1 is not; otherwise NCHW.
    """
    if x.dtype != np.uint8:
        raise DMMError(f"{source}: images must be uint8 (0..255), found dtype {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in _CHANNELS and x.shape[1] not in _CHANNELS:
            x = x.transpose(0, 3, 1, 2)
    else:
        raise DMMError(
            f"{source}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), "
            f"found shape {x.shape}"
        )
    return np.ascontiguousarray(x)


def _labels(y: np.ndarray, n: int, source: str) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        raise DMMError(f"{source}: labels must be integers, found dtype {y.dtype}")
    if y.ndim == 2 and y.shape[1] == 1:  # column vectors are a common export shape
        y = y[:, 0]
    if y.ndim != 1:
        raise DMMError(f"{source}: labels must be 1-D, found shape {y.shape}")
    if len(y) != n:
        raise DMMError(f"{source}: {len(y)} labels for {n} images")
    if n and y.min() < 0:
        raise DMMError(f"{source}: labels must be non-negative, found {int(y.min())}")
    return y.astype(np.int64)


def _classes(raw: np.ndarray, source: str) -> list[str]:
    if raw.ndim != 1 or raw.dtype.kind not in "US":
        raise DMMError(
            f"{source}: 'classes' must be a 1-D str array, found {raw.dtype} {raw.shape}"
        )
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in raw.tolist()]


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NCHW images, as fractions of 255."""
    c = x.shape[1]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    for i in range(0, len(x), _CHUNK):
        chunk = x[i : i + _CHUNK].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2, 3))
        total_sq += np.square(chunk).sum(axis=(0, 2, 3))
    count = max(1, x.shape[0] * x.shape[2] * x.shape[3])
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    # A constant channel would divide by zero in normalize(); leave it unscaled instead.
    std = np.where(std > 1e-6, std, 1.0)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def read_npz(root: Path) -> ImageDataset:
    """Read a `.npz` file or a folder with `train.npz` and `test.npz` (see the module doc)."""
    root = Path(root)
    classes_raw: np.ndarray | None = None
    if root.is_dir():
        train_path, test_path = root / "train.npz", root / "test.npz"
        train, test = _open(train_path), _open(test_path)
        xtr_raw, ytr_raw = _take(train, "x", train_path), _take(train, "y", train_path)
        xte_raw, yte_raw = _take(test, "x", test_path), _take(test, "y", test_path)
        classes_raw = train.get("classes")
        src_tr, src_te, src_cls = str(train_path), str(test_path), str(train_path)
    else:
        arrays = _open(root)
        xtr_raw, ytr_raw = _take(arrays, "x_train", root), _take(arrays, "y_train", root)
        xte_raw, yte_raw = _take(arrays, "x_test", root), _take(arrays, "y_test", root)
        classes_raw = arrays.get("classes")
        src_tr, src_te, src_cls = f"{root} (train)", f"{root} (test)", str(root)

    x_train, x_test = to_nchw(xtr_raw, src_tr), to_nchw(xte_raw, src_te)
    y_train = _labels(ytr_raw, len(x_train), src_tr)
    y_test = _labels(yte_raw, len(x_test), src_te)
    if len(x_train) == 0:
        raise DMMError(f"{src_tr}: no training images")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DMMError(
            f"{root}: train images are {x_train.shape[1:]} (C, H, W) but test images are "
            f"{x_test.shape[1:]}"
        )

    top = int(max(y_train.max(), y_test.max(initial=0)))
    if classes_raw is not None:
        classes = _classes(classes_raw, src_cls)
        if top >= len(classes):
            raise DMMError(f"{src_cls}: label {top} but only {len(classes)} classes given")
    else:
        classes = [str(i) for i in range(top + 1)]

    mean, std = channel_stats(x_train)
    return ImageDataset(
        name="npz",
        x_train=torch.from_numpy(x_train),
        y_train=torch.from_numpy(y_train),
        x_test=torch.from_numpy(x_test),
        y_test=torch.from_numpy(y_test),
        classes=classes,
        mean=mean,
        std=std,
    )


@register_dataset("npz")
def load_npz(root: Path | None) -> ImageDataset:
    """The `npz` dataset: `root` is a .npz file or a folder with train.npz and test.npz."""
    if root is None:
        raise DMMError(
            "npz needs --data-root pointing at a .npz file (x_train, y_train, x_test, y_test) "
            "or a folder with train.npz and test.npz (x, y)"
        )
    return read_npz(root)
