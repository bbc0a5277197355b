"""CIFAR-10 and CIFAR-100 from the official archives (Krizhevsky, 2009).

Both distributed layouts are read, either extracted under the data root or straight from the
`.tar.gz` as downloaded (members are read into memory, never extracted to disk):

* python: `cifar-10-batches-py/` (`data_batch_1..5`, `test_batch`, `batches.meta`) and
  `cifar-100-python/` (`train`, `test`, `meta`); pickles written by Python 2.
* binary: `cifar-10-batches-bin/` (`data_batch_1..5.bin`, `test_batch.bin`,
  `batches.meta.txt`) and `cifar-100-binary/` (`train.bin`, `test.bin`,
  `fine_label_names.txt`); fixed-size records of label byte(s) + 3072 pixel bytes.

The pickles are loaded with a restricted unpickler that admits only the globals a numpy array
needs, so a tampered download cannot run code. CIFAR-100 uses the 100 fine labels.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from dmm.data.base import ImageDataset, register_dataset
from dmm.errors import DMMError

PIXELS = 3 * 32 * 32
MEAN_STD: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass(frozen=True)
class _Layout:
    """Where one archive layout keeps its files, relative to its top folder."""

    folder: str
    archive: str
    train: tuple[str, ...]
    test: str
    meta: str
    binary: bool


_LAYOUTS: dict[int, tuple[_Layout, _Layout]] = {
    # Python layout first: it is the one preferred when both are present.
    10: (
        _Layout(
            "cifar-10-batches-py",
            "cifar-10-python.tar.gz",
            tuple(f"data_batch_{i}" for i in range(1, 6)),
            "test_batch",
            "batches.meta",
            binary=False,
        ),
        _Layout(
            "cifar-10-batches-bin",
            "cifar-10-binary.tar.gz",
            tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
            "test_batch.bin",
            "batches.meta.txt",
            binary=True,
        ),
    ),
    100: (
        _Layout("cifar-100-python", "cifar-100-python.tar.gz", ("train",), "test", "meta", False),
        _Layout(
            "cifar-100-binary",
            "cifar-100-binary.tar.gz",
            ("train.bin",),
            "test.bin",
            "fine_label_names.txt",
            binary=True,
        ),
    ),
}


# --------------------------------------------------------------------------- restricted pickle


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    # Python 3 writes bytes at protocol 2 as `_codecs.encode(str, "latin1")`; admit only that.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is admitted only as (str, 'latin1')")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    # Resolved here rather than by name so that `numpy.core` (a deprecated alias in numpy 2,
    # the name Python 2 pickles carry) never has to be imported.
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("_codecs", "encode"): _latin1_encode}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays."""

    def __init__(self, file: io.BytesIO, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DMMError(
                f"{self._source}: refusing to unpickle forbidden global {module}.{name} "
                "(a CIFAR batch holds only numpy arrays, lists and strings)"
            ) from None


def restricted_pickle_load(data: bytes, source: str) -> Any:
    """Unpickle `data` admitting only numpy-array globals; `source` names it in errors."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source).load()
    except DMMError:
        raise
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise DMMError(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from e


def _get(d: dict[Any, Any], key: str, source: str) -> Any:
    # encoding="bytes" keeps Python 2 keys as bytes; a re-saved file may have str keys.
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DMMError(f"{source}: missing key {key!r} (has {sorted(map(_as_str, d))})")


def _as_str(v: object) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


# --------------------------------------------------------------------------- batch parsers


def parse_python_batch(
    data: bytes, source: str, label_key: str = "labels"
) -> tuple[np.ndarray, np.ndarray]:
    """One python-layout batch: images uint8 (N, 3, 32, 32) and labels int64 (N,).

    `label_key` is "labels" for CIFAR-10 and "fine_labels" for CIFAR-100.
    """
    batch = restricted_pickle_load(data, source)
    if not isinstance(batch, dict):
        raise DMMError(f"{source}: expected a dict, found {type(batch).__name__}")
    x = _get(batch, "data", source)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != PIXELS:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DMMError(f"{source}: 'data' must be a uint8 array (N, {PIXELS}), found {desc}")
    y = _labels(_get(batch, label_key, source), len(x), source)
    return x.reshape(-1, 3, 32, 32), y


def _labels(raw: object, n: int, source: str) -> np.ndarray:
    if isinstance(raw, np.ndarray):
        ok = raw.ndim == 1 and np.issubdtype(raw.dtype, np.integer)
    else:
        ok = isinstance(raw, list) and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw
        )
    if not ok:
        raise DMMError(f"{source}: labels must be a list of ints")
    y = np.asarray(raw, dtype=np.int64)
    if len(y) != n:
        raise DMMError(f"{source}: {len(y)} labels for {n} images")
    if n and y.min() < 0:
        raise DMMError(f"{source}: negative label {int(y.min())}")
    return y


def parse_binary_batch(data: bytes, source: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One binary-layout file: images uint8 (N, 3, 32, 32) and labels int64 (N,).

    CIFAR-10 records are label + pixels; CIFAR-100 records are coarse + fine + pixels and the
    fine label is returned.
    """
    n_label_bytes = _label_bytes(num_classes)
    record = n_label_bytes + PIXELS
    if len(data) == 0 or len(data) % record:
        raise DMMError(
            f"{source}: {len(data)} bytes is not a whole number of {record}-byte records "
            "(truncated or not a CIFAR binary file)"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    y = records[:, n_label_bytes - 1].astype(np.int64)
    x = records[:, n_label_bytes:].reshape(-1, 3, 32, 32)
    return x, y


def _label_bytes(num_classes: int) -> int:
    if num_classes not in MEAN_STD:
        raise DMMError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    return 1 if num_classes == 10 else 2


def read_python_batch(path: Path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Read one python-layout batch file (e.g. `data_batch_1`, or CIFAR-100 `train`)."""
    key = "labels" if _label_bytes(num_classes) == 1 else "fine_labels"
    return parse_python_batch(_read_path(path), str(path), key)


def read_binary_batch(path: Path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Read one binary-layout file (e.g. `data_batch_1.bin`, or CIFAR-100 `train.bin`)."""
    return parse_binary_batch(_read_path(path), str(path), num_classes)


def _read_path(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DMMError(f"{path}: file not found") from None
    except OSError as e:
        raise DMMError(f"{path}: cannot read ({e.strerror or e})") from e


# --------------------------------------------------------------------------- sources


Reader = Callable[[str], tuple[bytes, str]]


def _folder_reader(folder: Path) -> Reader:
    def read(name: str) -> tuple[bytes, str]:
        path = folder / name
        return _read_path(path), str(path)

    return read


def _tar_reader(archive: Path, layout: _Layout) -> Reader:
    wanted = {f"{layout.folder}/{n}" for n in (*layout.train, layout.test, layout.meta)}
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar:
                name = _safe_member_name(m.name, archive)
                if name in wanted and m.isfile():
                    f = tar.extractfile(m)
                    if f is not None:
                        members[name] = f.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DMMError(f"{archive}: not a readable .tar.gz ({e})") from e

    def read(name: str) -> tuple[bytes, str]:
        source = f"{archive}:{layout.folder}/{name}"
        try:
            return members[f"{layout.folder}/{name}"], source
        except KeyError:
            raise DMMError(f"{source}: no such file in the archive") from None

    return read


def _safe_member_name(name: str, archive: Path) -> str:
    # Nothing is extracted, but such names only appear in crafted archives: refuse them.
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name:
        raise DMMError(f"{archive}: refusing unsafe member path {name!r}")
    return "/".join(part for part in p.parts if part != ".")


def _find_source(root: Path, num_classes: int) -> tuple[_Layout, Reader]:
    layouts = _LAYOUTS[num_classes]
    for layout in layouts:
        # Also accept --data-root pointing at the layout folder or the archive itself.
        if root.is_dir() and root.name == layout.folder:
            return layout, _folder_reader(root)
        if root.is_file() and root.name == layout.archive:
            return layout, _tar_reader(root, layout)
    for layout in layouts:
        if (root / layout.folder).is_dir():
            return layout, _folder_reader(root / layout.folder)
        if (root / layout.archive).is_file():
            return layout, _tar_reader(root / layout.archive, layout)
    expected = ", ".join(f"{lay.folder}/ or {lay.archive}" for lay in layouts)
    raise DMMError(f"no CIFAR-{num_classes} data under {root}: expected {expected}")


# --------------------------------------------------------------------------- whole dataset


def _class_names(data: bytes, source: str, layout: _Layout, num_classes: int) -> list[str]:
    if layout.binary:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DMMError(f"{source}: label names are not text ({e})") from e
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        meta = restricted_pickle_load(data, source)
        if not isinstance(meta, dict):
            raise DMMError(f"{source}: expected a dict, found {type(meta).__name__}")
        key = "label_names" if num_classes == 10 else "fine_label_names"
        raw = _get(meta, key, source)
        if not isinstance(raw, list) or not all(isinstance(v, (bytes, str)) for v in raw):
            raise DMMError(f"{source}: {key!r} must be a list of strings")
        names = [_as_str(v) for v in raw]
    if len(names) != num_classes:
        raise DMMError(f"{source}: {len(names)} label names, expected {num_classes}")
    return names


def read_cifar(root: Path, num_classes: int) -> ImageDataset:
    """Read CIFAR-10 (`num_classes=10`) or CIFAR-100 (`100`) from the archives under `root`."""
    n_label_bytes = _label_bytes(num_classes)
    root = Path(root)
    layout, read = _find_source(root, num_classes)

    def load(name: str) -> tuple[np.ndarray, np.ndarray]:
        data, source = read(name)
        if layout.binary:
            x, y = parse_binary_batch(data, source, num_classes)
        else:
            key = "labels" if n_label_bytes == 1 else "fine_labels"
            x, y = parse_python_batch(data, source, key)
        if len(y) and y.max() >= num_classes:
            raise DMMError(f"{source}: label {int(y.max())} out of range for {num_classes}")
        return x, y

    meta, meta_source = read(layout.meta)
    classes = _class_names(meta, meta_source, layout, num_classes)
    train = [load(name) for name in layout.train]
    x_test, y_test = load(layout.test)
    mean, std = MEAN_STD[num_classes]
    # np.concatenate copies, so the tensors own writable memory (frombuffer views are read-only).
    return ImageDataset(
        name=f"cifar{num_classes}",
        x_train=torch.from_numpy(np.concatenate([x for x, _ in train])),
        y_train=torch.from_numpy(np.concatenate([y for _, y in train])),
        x_test=torch.from_numpy(np.concatenate([x_test])),
        y_test=torch.from_numpy(np.concatenate([y_test])),
        classes=classes,
        mean=mean,
        std=std,
    )


def _resolve_root(root: Path | None, num_classes: int) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get("DMM_DATA_DIR")
    if env:
        path = Path(env)
        if not path.exists():
            raise DMMError(f"DMM_DATA_DIR={env!r} does not exist")
        return path
    folders = " or ".join(f"{lay.folder}/" for lay in _LAYOUTS[num_classes])
    raise DMMError(
        f"cifar{num_classes} needs --data-root pointing at a folder with {folders} "
        "(or the .tar.gz archives)"
    )


@register_dataset("cifar10")
def load_cifar10(root: Path | None) -> ImageDataset:
    """CIFAR-10 from `root` (or `$DMM_DATA_DIR`)."""
    return read_cifar(_resolve_root(root, 10), 10)


@register_dataset("cifar100")
def load_cifar100(root: Path | None) -> ImageDataset:
    """CIFAR-100 (fine labels) from `root` (or `$DMM_DATA_DIR`)."""
    return read_cifar(_resolve_root(root, 100), 100)
