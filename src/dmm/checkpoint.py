"""Checkpoints: safetensors with a JSON metadata header. Loading never unpickles anything.

Metadata (all optional but `arch`): arch, arch_kwargs, classes, n_samples, client_id,
label_counts (the client's training samples per class, written by `dmm train` and the bench),
plus any extra JSON-serializable fields. `num_batches_tracked` is stored like every other tensor.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dmm.errors import DMMError
from dmm.io import save_with
from dmm.models import create
from dmm.models.registry import check_trusted
from dmm.statedict import StateDict

META_KEY = "dmm"
SUFFIX = ".safetensors"


@dataclass
class Checkpoint:
    state: StateDict
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def arch(self) -> str:
        return self.meta["arch"]

    @property
    def n_samples(self) -> int | None:
        return self.meta.get("n_samples")

    @property
    def label_counts(self) -> list[int] | None:
        """Training samples per class behind the model (metadata `label_counts`), or None.
        The metadata is untrusted: anything but non-negative integers is an error."""
        c = self.meta.get("label_counts")
        if c is None:
            return None
        if not (isinstance(c, list) and c and all(isinstance(x, int) and not isinstance(x, bool)
                                                  and x >= 0 for x in c)):
            raise DMMError(f"{self.path or 'checkpoint'}: metadata label_counts must be a list "
                           f"of non-negative integers, got {str(c)[:80]}")
        return c

    def new_model(self, *, meta: bool = False) -> nn.Module:
        """A fresh model of the architecture the metadata names. The metadata is untrusted:
        the name and keyword arguments are checked, and a user module is imported only if
        trusted (`dmm.models.registry.check_trusted`). `meta`: built on the meta device (shapes
        and dtypes, no memory), so that a file cannot make dmm allocate what it does not hold
        before `dmm.validate` compared the two."""
        where = str(self.path or "checkpoint")
        name, kwargs = self.meta.get("arch"), self.meta.get("arch_kwargs", {})
        if not isinstance(name, str) or not isinstance(kwargs, dict):
            raise DMMError(f"{where}: metadata 'arch' must be a name and 'arch_kwargs' an object")
        check_trusted(name, where)
        if not meta:
            return create(name, **kwargs)
        with torch.device("meta"):
            try:
                return create(name, **kwargs)
            except DMMError:
                raise
            except Exception as e:  # noqa: BLE001 - a class that cannot be built on meta
                raise DMMError(f"{where}: {name} cannot be built to check the file against "
                               f"it ({type(e).__name__}: {e})") from e

    def build(self) -> nn.Module:
        """Instantiate the architecture and load the weights (strict). The architecture is
        first built on the meta device and compared with the file's tensors (keys, shapes,
        dtypes): only a file that fits is materialized, so metadata that names a model larger
        than the file's tensors (a width of 400, 10^9 classes) is one error, not an
        allocation."""
        where = self.path or "checkpoint"
        template = self.new_model(meta=True).state_dict()
        check_fits(template, self.state, where, self.arch)
        check_memory(state_bytes(template), where)
        model = self.new_model()
        try:
            model.load_state_dict(self.state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise DMMError(f"{self.path or 'checkpoint'}: weights do not fit {self.arch}: "
                           f"{' '.join(first[:3])[:300]}") from e
        return model


def check_fits(template: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
               where: object, arch: str) -> None:
    """Every key of `template` (a model's state dict, typically on the meta device) in `state`
    with its shape and dtype, read from a LazyState's header without loading the tensor; one
    line naming `where` and the first key that differs."""
    lazy = isinstance(state, LazyState)
    for k, t in template.items():
        if k not in state:
            raise DMMError(f"{where}: weights do not fit {arch}: key {k} is missing")
        shape, dtype = (state.shape_of(k), state.dtype_of(k)) if lazy else \
            (tuple(state[k].shape), state[k].dtype)
        if tuple(shape) != tuple(t.shape) or dtype != t.dtype:
            raise DMMError(f"{where}: weights do not fit {arch}: key {k} is {tuple(shape)} "
                           f"{dtype}, the architecture's {tuple(t.shape)} {t.dtype}")


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes the tensors of a state dict take (meta tensors included)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(nbytes: int, where: object) -> None:
    """One line naming `where` and the size if `nbytes` exceed the memory available now."""
    free = available_memory()
    if free is not None and nbytes > free:
        raise DMMError(f"{where}: the model needs {nbytes / 2**30:.1f} GiB, only "
                       f"{free / 2**30:.1f} GiB of memory are available")


# safetensors dtype names -> torch dtypes (the ones a state dict holds)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100 * 2**20


class LazyState(Mapping):
    """A checkpoint's tensors, read from the file one at a time when asked for.

    A merge that goes key by key (averaging, task arithmetic, TIES, BN pooling) then holds one
    key's tensors of every model, not every model whole. The safetensors layout is parsed here
    (8-byte little-endian header length, JSON header, data) and checked before any read:
    known dtypes, offsets inside the file, byte counts that match the shapes. Each read opens
    the file, seeks and reads: nothing is memory-mapped, nothing is unpickled.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than a safetensors header")
                n = int.from_bytes(head, "little")
                if n > min(_MAX_HEADER, size - 8):
                    raise ValueError(f"header length {n} exceeds the file")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise DMMError(f"{path}: not a readable safetensors checkpoint ({e})") from e
        if not isinstance(header, dict):
            raise DMMError(f"{path}: safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise DMMError(f"{path}: safetensors __metadata__ is not a JSON object")
        self._start = 8 + n
        self._index: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in sorted(header.items()):  # sorted, as safe_open's keys() are
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError, OverflowError) as e:
                raise DMMError(f"{path}: key {key}: malformed safetensors entry ({e!r})") from e
            numel = 1
            for d in shape:
                if d < 0:
                    raise DMMError(f"{path}: key {key}: negative dimension in {shape}")
                numel *= d
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if not 0 <= begin <= end <= size - self._start or end - begin != nbytes:
                raise DMMError(f"{path}: key {key}: data offsets {begin}..{end} do not hold "
                               f"{shape} {info['dtype']} inside the file")
            self._index[key] = (dtype, shape, begin, end)

    def __getitem__(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._index[key]
        with self.path.open("rb") as f:
            f.seek(self._start + begin)
            buf = bytearray(f.read(end - begin))
        if len(buf) != end - begin:
            raise DMMError(f"{self.path}: key {key}: file ended early (truncated?)")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def __contains__(self, key: object) -> bool:  # without reading the tensor
        return key in self._index

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self._index[key][1]

    def dtype_of(self, key: str) -> torch.dtype:
        return self._index[key][0]


def open_lazy(path: str | Path, *, require_arch: bool = True) -> Checkpoint:
    """A checkpoint whose `state` is a LazyState: metadata now, tensors on access."""
    path = Path(path)
    if not path.is_file():
        raise DMMError(f"{path}: no such checkpoint file")
    state = LazyState(path)
    return Checkpoint(state, _meta(path, state.metadata, require_arch), path)


def _meta(path: Path, header: dict, require_arch: bool = True) -> dict:
    """dmm's metadata of a safetensors header ({} for a plain file unless `require_arch`)."""
    try:
        meta = json.loads(header.get(META_KEY, "{}"))
    except (json.JSONDecodeError, TypeError) as e:
        raise DMMError(f"{path}: metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise DMMError(f"{path}: metadata is not a JSON object")
    if require_arch and "arch" not in meta:
        raise DMMError(f"{path}: metadata names no architecture ('arch')")
    return meta


def data_meta(arch: str, arch_kwargs: dict, data, dataset: str) -> dict:
    """The metadata a checkpoint of `arch` trained on `data` carries (what merge and refine
    read: the architecture, classes and input normalization)."""
    return {"arch": arch, "arch_kwargs": arch_kwargs, "classes": data.classes,
            "dataset": dataset, "input_mean": list(data.mean), "input_std": list(data.std),
            "input_size": list(data.input_shape)}


def save(path: str | Path, model_or_state: nn.Module | StateDict, **meta: Any) -> Path:
    """Write a checkpoint atomically. `meta` must hold `arch`; see the module docstring."""
    if "arch" not in meta:
        raise ValueError("checkpoint metadata needs 'arch'")
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    header = {META_KEY: json.dumps(meta, sort_keys=True, default=str)}
    path = Path(path)
    save_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    return path


def load(path: str | Path, *, require_arch: bool = True) -> Checkpoint:
    """Read a checkpoint written by `save` (or any safetensors file with an `arch` in `meta`;
    without `require_arch`, any safetensors file: its dmm metadata may be empty)."""
    path = Path(path)
    if not path.is_file():
        raise DMMError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DMMError(f"{path}: not a readable safetensors checkpoint ({e})") from e
    return Checkpoint(state, _meta(path, header, require_arch), path)


def load_dir(folder: str | Path, pattern: str = "client_*.safetensors", *, lazy: bool = False
             ) -> list[Checkpoint]:
    """Every checkpoint matching `pattern` in `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DMMError(f"{folder}: not a folder")
    paths = sorted(folder.glob(pattern))
    if not paths:
        raise DMMError(f"{folder}: no files matching {pattern}")
    return [(open_lazy if lazy else load)(p) for p in paths]


def resolve_inputs(items: list[str | Path], *, lazy: bool = False) -> list[Checkpoint]:
    """Checkpoint paths and/or folders (a folder contributes its client_*.safetensors).
    `lazy`: tensors stay in the files until read (`LazyState`)."""
    out: list[Checkpoint] = []
    for item in items:
        p = Path(item)
        out.extend(load_dir(p, lazy=lazy) if p.is_dir() else [(open_lazy if lazy else load)(p)])
    return out


def load_module(path: str | Path) -> nn.Module:
    return load(path).build()


def _restrict_torch_load(path: Path) -> StateDict:
    """Import a `.pt` state dict without executing code (weights_only unpickler)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure of an untrusted file is the user's
        raise DMMError(f"{path}: refused or unreadable .pt file ({type(e).__name__})") from e
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DMMError(f"{path}: a .pt import must hold a state dict of tensors")
    return obj


def import_pt(path: str | Path, **meta: Any) -> Checkpoint:
    """Wrap a PyTorch `.pt` state dict (loaded with weights_only=True) as a Checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise DMMError(f"{path}: no such file")
    return Checkpoint(_restrict_torch_load(path), dict(meta), path)
