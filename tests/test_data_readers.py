"""CIFAR and npz readers against tiny archives written in the official formats."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dmm.data import load_dataset
from dmm.data.cifar import (
    parse_python_batch,
    read_binary_batch,
    read_cifar,
    read_python_batch,
    restricted_pickle_load,
)
from dmm.data.npz import read_npz
from dmm.errors import DMMError

N_PER_FILE = 5


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 `str` (BINSTRING), as the original CIFAR files have.

    Python 3 would write bytes at protocol 2 through `_codecs.encode`; the originals do not.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: str | bytes) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # The originals were written by numpy 1.x under Python 2, which names numpy.core.
    return buf.getvalue().replace(
        b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n"
    )


Expected = dict[str, np.ndarray | list[str]]


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def make_cifar(root: Path, num_classes: int, layout: str, seed: int = 0) -> Expected:
    """Write a tiny CIFAR archive folder (`layout` "python" or "binary") under `root`."""
    rng = np.random.default_rng(seed)
    names = [f"class{i}" for i in range(num_classes)]
    if num_classes == 10:
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_file = "test_batch"
    else:
        train_files, test_file = ["train"], "test"
    batches = {}
    for name in [*train_files, test_file]:
        x = _images(rng, N_PER_FILE)
        fine = rng.integers(0, num_classes, size=N_PER_FILE)
        fine[0] = num_classes - 1  # exercise the largest label
        coarse = rng.integers(0, 20, size=N_PER_FILE)
        batches[name] = (x, fine, coarse)

    if layout == "python":
        folder = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
        folder.mkdir(parents=True)
        for name, (x, fine, coarse) in batches.items():
            d: dict[bytes, object] = {
                b"batch_label": f"batch {name}".encode(),
                b"data": x.reshape(N_PER_FILE, 3072),
                b"filenames": [f"img_{i}.png".encode() for i in range(N_PER_FILE)],
            }
            if num_classes == 10:
                d[b"labels"] = [int(v) for v in fine]
            else:
                d[b"fine_labels"] = [int(v) for v in fine]
                d[b"coarse_labels"] = [int(v) for v in coarse]
            (folder / name).write_bytes(py2_pickle(d))
        if num_classes == 10:
            meta = {
                b"num_cases_per_batch": N_PER_FILE,
                b"label_names": [n.encode() for n in names],
                b"num_vis": 3072,
            }
            (folder / "batches.meta").write_bytes(py2_pickle(meta))
        else:
            meta = {
                b"fine_label_names": [n.encode() for n in names],
                b"coarse_label_names": [f"super{i}".encode() for i in range(20)],
            }
            (folder / "meta").write_bytes(py2_pickle(meta))
    else:
        folder = root / ("cifar-10-batches-bin" if num_classes == 10 else "cifar-100-binary")
        folder.mkdir(parents=True)
        for name, (x, fine, coarse) in batches.items():
            flat = x.reshape(N_PER_FILE, 3072)
            if num_classes == 10:
                records = np.concatenate([fine[:, None].astype(np.uint8), flat], axis=1)
            else:
                labels = np.stack([coarse, fine], axis=1).astype(np.uint8)
                records = np.concatenate([labels, flat], axis=1)
            (folder / f"{name}.bin").write_bytes(records.tobytes())
        text = "\n".join(names) + "\n\n"  # the originals end with blank lines
        if num_classes == 10:
            (folder / "batches.meta.txt").write_text(text)
        else:
            (folder / "fine_label_names.txt").write_text(text)
            (folder / "coarse_label_names.txt").write_text(
                "\n".join(f"super{i}" for i in range(20)) + "\n"
            )
    return {
        "x_train": np.concatenate([batches[f][0] for f in train_files]),
        "y_train": np.concatenate([batches[f][1] for f in train_files]),
        "x_test": batches[test_file][0],
        "y_test": batches[test_file][1],
        "classes": names,
        "folder": folder,  # type: ignore[dict-item]
    }


_ARCHIVE = {
    (10, "python"): "cifar-10-python.tar.gz",
    (10, "binary"): "cifar-10-binary.tar.gz",
    (100, "python"): "cifar-100-python.tar.gz",
    (100, "binary"): "cifar-100-binary.tar.gz",
}


def pack(folder: Path, archive: Path) -> None:
    """Tar the folder as the official archives do (top folder as the member prefix), remove it."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()


def assert_matches(ds: object, exp: Expected) -> None:
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert torch.equal(ds.x_train, torch.from_numpy(exp["x_train"]))
    assert torch.equal(ds.y_train, torch.from_numpy(exp["y_train"].astype(np.int64)))
    assert torch.equal(ds.x_test, torch.from_numpy(exp["x_test"]))
    assert torch.equal(ds.y_test, torch.from_numpy(exp["y_test"].astype(np.int64)))
    assert ds.classes == exp["classes"]


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("layout", ["python", "binary"])
@pytest.mark.parametrize("packed", [False, True], ids=["folder", "targz"])
def test_cifar_roundtrip(tmp_path: Path, num_classes: int, layout: str, packed: bool) -> None:
    exp = make_cifar(tmp_path, num_classes, layout)
    if packed:
        pack(exp["folder"], tmp_path / _ARCHIVE[(num_classes, layout)])
    ds = read_cifar(tmp_path, num_classes)
    assert_matches(ds, exp)
    assert ds.name == f"cifar{num_classes}"
    assert ds.x_train.shape == ((25 if num_classes == 10 else 5), 3, 32, 32)
    assert ds.num_classes == num_classes and len(ds.mean) == 3 and len(ds.std) == 3


def test_python_layout_preferred(tmp_path: Path) -> None:
    exp_py = make_cifar(tmp_path, 10, "python", seed=1)
    make_cifar(tmp_path, 10, "binary", seed=2)
    assert_matches(read_cifar(tmp_path, 10), exp_py)


def test_root_may_be_layout_folder_or_archive(tmp_path: Path) -> None:
    exp = make_cifar(tmp_path, 10, "binary")
    assert_matches(read_cifar(exp["folder"], 10), exp)
    archive = tmp_path / "cifar-10-binary.tar.gz"
    pack(exp["folder"], archive)
    assert_matches(read_cifar(archive, 10), exp)


def test_single_file_helpers(tmp_path: Path) -> None:
    exp = make_cifar(tmp_path, 100, "python")
    x, y = read_python_batch(exp["folder"] / "test", 100)
    assert np.array_equal(x, exp["x_test"]) and np.array_equal(y, exp["y_test"])
    exp = make_cifar(tmp_path / "b", 10, "binary")
    x, y = read_binary_batch(exp["folder"] / "test_batch.bin", 10)
    assert np.array_equal(x, exp["x_test"]) and np.array_equal(y, exp["y_test"])


def test_python3_protocol2_pickle_with_str_keys() -> None:
    # Python 3 writes bytes at protocol 2 via _codecs.encode; such re-saved files are accepted.
    x = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for d in ({b"data": x, b"labels": [3, 4]}, {"data": x, "labels": [3, 4]}):
        got_x, got_y = parse_python_batch(pickle.dumps(d, protocol=2), "mem")
        assert np.array_equal(got_x.reshape(2, 3072), x) and got_y.tolist() == [3, 4]


class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.cmd = f"touch {marker}"

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (self.cmd,))


class _OpenPayload:
    def __init__(self, marker: Path) -> None:
        self.path = str(marker)

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("payload", [_SystemPayload, _OpenPayload])
def test_malicious_pickle_refused(tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": payload(marker), b"labels": []}, protocol=2)
    with pytest.raises(DMMError, match=r"evil_batch.*forbidden global (posix\.system|io\.open)"):
        restricted_pickle_load(evil, "evil_batch")
    assert not marker.exists()


def test_malicious_batch_in_dataset_names_file(tmp_path: Path) -> None:
    exp = make_cifar(tmp_path, 10, "python")
    marker = tmp_path / "pwned"
    (exp["folder"] / "data_batch_2").write_bytes(
        pickle.dumps({b"data": _OpenPayload(marker)}, protocol=2)
    )
    # Sanity: an unrestricted load of this payload would create the file.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_OpenPayload(probe), protocol=2)).close()
    assert probe.exists()
    with pytest.raises(DMMError, match=r"data_batch_2.*io\.open"):
        read_cifar(tmp_path, 10)
    assert not marker.exists()


def test_truncated_binary(tmp_path: Path) -> None:
    exp = make_cifar(tmp_path, 10, "binary")
    path = exp["folder"] / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DMMError, match="data_batch_3.bin.*whole number"):
        read_cifar(tmp_path, 10)
    with pytest.raises(DMMError, match="data_batch_3.bin"):
        read_binary_batch(path, 10)


def test_missing_file_and_bad_shape(tmp_path: Path) -> None:
    exp = make_cifar(tmp_path, 10, "python")
    (exp["folder"] / "data_batch_4").unlink()
    with pytest.raises(DMMError, match="data_batch_4"):
        read_cifar(tmp_path, 10)
    bad = py2_pickle({b"data": np.zeros((5, 3000), np.uint8), b"labels": [0] * 5})
    with pytest.raises(DMMError, match=r"somefile.*\(5, 3000\)"):
        parse_python_batch(bad, "somefile")
    with pytest.raises(DMMError, match="no CIFAR-100 data"):
        read_cifar(tmp_path, 100)


def test_missing_member_and_unsafe_member_in_tar(tmp_path: Path) -> None:
    exp = make_cifar(tmp_path, 10, "binary")
    (exp["folder"] / "test_batch.bin").unlink()
    pack(exp["folder"], tmp_path / "cifar-10-binary.tar.gz")
    with pytest.raises(DMMError, match="cifar-10-binary.tar.gz:cifar-10-batches-bin/test_batch"):
        read_cifar(tmp_path, 10)

    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escape")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(DMMError, match="unsafe member"):
        read_cifar(tmp_path, 10)
    assert not (tmp_path.parent / "escape").exists()


def test_registry_and_root_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exp10 = make_cifar(tmp_path, 10, "python")
    exp100 = make_cifar(tmp_path, 100, "binary")
    pack(exp100["folder"], tmp_path / "cifar-100-binary.tar.gz")
    assert_matches(load_dataset("cifar10", tmp_path), exp10)
    assert_matches(load_dataset("cifar100", str(tmp_path)), exp100)

    monkeypatch.delenv("DMM_DATA_DIR", raising=False)
    with pytest.raises(DMMError, match="cifar10 needs --data-root"):
        load_dataset("cifar10")
    monkeypatch.setenv("DMM_DATA_DIR", str(tmp_path))
    assert_matches(load_dataset("cifar10"), exp10)


# --------------------------------------------------------------------------- npz


def _npz_data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, size=(6, 3, 8, 8), dtype=np.uint8),
        "y_train": np.array([0, 1, 2, 3, 1, 0]),
        "x_test": rng.integers(0, 256, size=(4, 3, 8, 8), dtype=np.uint8),
        "y_test": np.array([4, 0, 1, 2], dtype=np.int32),
    }


def test_npz_single_file_and_folder_agree(tmp_path: Path) -> None:
    d = _npz_data()
    single = tmp_path / "mine.npz"
    nhwc = {k: (v.transpose(0, 2, 3, 1) if k.startswith("x") else v) for k, v in d.items()}
    np.savez(single, **nhwc)
    folder = tmp_path / "split"
    folder.mkdir()
    np.savez(folder / "train.npz", x=d["x_train"], y=d["y_train"])
    np.savez(folder / "test.npz", x=d["x_test"], y=d["y_test"])

    a, b = read_npz(single), load_dataset("npz", folder)
    for ds in (a, b):
        assert torch.equal(ds.x_train, torch.from_numpy(d["x_train"]))
        assert torch.equal(ds.x_test, torch.from_numpy(d["x_test"]))
        assert torch.equal(ds.y_test, torch.tensor([4, 0, 1, 2], dtype=torch.int64))
        assert ds.y_train.dtype == torch.int64 and ds.classes == ["0", "1", "2", "3", "4"]
    expected_mean = (d["x_train"] / 255.0).mean(axis=(0, 2, 3))
    expected_std = (d["x_train"] / 255.0).std(axis=(0, 2, 3))
    assert np.allclose(a.mean, expected_mean) and np.allclose(a.std, expected_std)
    assert a.mean == b.mean and a.std == b.std


def test_npz_grayscale_and_classes(tmp_path: Path) -> None:
    d = _npz_data()
    d["x_train"], d["x_test"] = d["x_train"][:, 0], d["x_test"][:, 0]  # (N, H, W)
    path = tmp_path / "g.npz"
    np.savez(path, classes=np.array(list("abcdefg")), **d)
    ds = read_npz(path)
    assert ds.x_train.shape == (6, 1, 8, 8) and ds.in_channels == 1
    assert ds.classes == list("abcdefg")


def test_npz_errors(tmp_path: Path) -> None:
    d = _npz_data()
    path = tmp_path / "bad.npz"
    np.savez(path, **{**d, "x_train": d["x_train"].astype(np.float32)})
    with pytest.raises(DMMError, match=r"bad\.npz.*float32"):
        read_npz(path)
    np.savez(path, **{**d, "y_train": d["y_train"][:-1]})
    with pytest.raises(DMMError, match="5 labels for 6 images"):
        read_npz(path)
    np.savez(path, **{**d, "y_test": -d["y_test"]})
    with pytest.raises(DMMError, match="non-negative"):
        read_npz(path)
    np.savez(path, classes=np.array(["a", "b"]), **d)
    with pytest.raises(DMMError, match="only 2 classes"):
        read_npz(path)
    np.savez(path, x_train=d["x_train"])
    with pytest.raises(DMMError, match="missing array 'y_train'"):
        read_npz(path)
    with pytest.raises(DMMError, match="npz needs --data-root"):
        load_dataset("npz")
