"""Model files from anywhere: dmm checkpoints, plain safetensors, `.pt`/`.pth` state dicts and
folders saved by `transformers`, with what a file lacks given by its caller (`ModelSpec`).

`read_models(items, spec)` turns files and folders into `Checkpoint`s whose metadata says what
merge, refine, evaluate and inspect need: the architecture (`arch`, `arch_kwargs`), the input
size and normalization (`input_size`, `input_mean`, `input_std`), the merge weight
(`n_samples`) and the label histogram (`label_counts`). Each comes from, in rising order of
precedence: the file's own dmm metadata, a JSON sidecar beside a file that has none
(`client_0.safetensors` -> `client_0.json`, keys of `SIDECAR_KEYS`), and the caller's
`ModelSpec` (the command line's `--arch`, `--arch-kwargs`, `--input-shape`, `--mean`, `--std`,
`--n-samples`, `--label-counts`).

Nothing is unpickled: `.pt` files go through `torch.load(weights_only=True)`, safetensors are
parsed by dmm or by the safetensors library. A user class named by the caller
(`package.module:Class`) is imported here, because the user typed it; one named inside a file
still needs `DMM_TRUST_MODULES` (`dmm.models.registry.check_trusted`).

A `transformers` folder (`config.json` + `model.safetensors`, as `save_pretrained` writes it)
of an image classifier becomes the architecture `transformers` (`dmm.models.hf`): its config
is the keyword argument, its tensors are read from `model.safetensors` under the prefix `hf.`,
its `preprocessor_config.json` (if any) gives the normalization. `save_hf_folder` writes a
merged model back as such a folder, loadable by `from_pretrained`.
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from dmm.checkpoint import Checkpoint, LazyState, import_pt, load, open_lazy
from dmm.errors import DMMError
from dmm.models.hf import CONFIG, HF_ARCH, PREFIX, WEIGHTS

SIDECAR_KEYS = ("arch", "arch_kwargs", "classes", "input_size", "input_mean", "input_std",
                "n_samples", "label_counts")
MODEL_SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclass
class ModelSpec:
    """What the caller knows about the input models that their files may not say. Every field
    is optional; a given one overrides the files' metadata. `n_samples` and `label_counts`
    hold one entry per input model, in input order. Checked when made."""

    arch: str | None = None                      # registered name or package.module:Class
    arch_kwargs: dict | None = None
    input_shape: Sequence[int] | None = None     # (C, H, W) of the models' inputs
    mean: Sequence[float] | None = None          # per-channel input normalization
    std: Sequence[float] | None = None
    n_samples: Sequence[int] | None = None
    label_counts: Sequence[Sequence[int]] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.arch is not None and (not isinstance(self.arch, str) or not self.arch):
            raise DMMError(f"arch must be a name, got {self.arch!r}")
        if self.arch_kwargs is not None and not isinstance(self.arch_kwargs, dict):
            raise DMMError(f"arch kwargs must be a JSON object, got {self.arch_kwargs!r}")
        if self.input_shape is not None:
            s = list(self.input_shape)
            if len(s) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                                      for d in s):
                raise DMMError(f"input shape must be three positive integers C,H,W, got "
                               f"{self.input_shape!r}")
        if (self.mean is None) != (self.std is None):
            raise DMMError("give the input mean and std together (one value per channel)")
        if self.mean is not None:
            for name, v in (("mean", self.mean), ("std", self.std)):
                if not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                    and math.isfinite(x) for x in v):
                    raise DMMError(f"input {name} must be finite numbers, got {v!r}")
            if len(self.mean) != len(self.std):
                raise DMMError(f"input mean has {len(self.mean)} values, std {len(self.std)}; "
                               "give one per channel")
            if any(x <= 0 for x in self.std):
                raise DMMError(f"input std must be > 0 in every channel, got {list(self.std)}")
            if self.input_shape is not None and len(self.mean) != self.input_shape[0]:
                raise DMMError(f"input mean and std have {len(self.mean)} values, the input "
                               f"shape {tuple(self.input_shape)} has {self.input_shape[0]} "
                               "channels")
        if self.n_samples is not None and not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1
                for n in self.n_samples):
            raise DMMError(f"n_samples must be positive integers, got {self.n_samples!r}")
        if self.label_counts is not None and not all(
                isinstance(c, (list, tuple)) and c and all(
                    isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in c)
                for c in self.label_counts):
            raise DMMError("label counts must be one list of non-negative integers per model")

    def meta(self, index: int, count: int) -> dict:
        """The metadata this spec gives model `index` of `count`."""
        for name in ("n_samples", "label_counts"):
            v = getattr(self, name)
            if v is not None and len(v) != count:
                raise DMMError(f"{len(v)} {name.replace('_', ' ')} given for {count} models")
        out: dict[str, Any] = {}
        if self.arch is not None:
            out["arch"] = self.arch
            out["arch_kwargs"] = dict(self.arch_kwargs or {})
        elif self.arch_kwargs is not None:
            out["arch_kwargs"] = dict(self.arch_kwargs)
        if self.input_shape is not None:
            out["input_size"] = list(self.input_shape)
        if self.mean is not None:
            out["input_mean"], out["input_std"] = list(self.mean), list(self.std)
        if self.n_samples is not None:
            out["n_samples"] = int(self.n_samples[index])
        if self.label_counts is not None:
            out["label_counts"] = [int(x) for x in self.label_counts[index]]
        return out


def trust_class(arch: str) -> None:
    """Import the module of a caller-named `package.module:Class` (it is then trusted: the user
    typed it); one line naming the module if it cannot be imported."""
    if ":" not in arch:
        return
    module = arch.partition(":")[0]
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure of the user's module is one line
        raise DMMError(f"cannot import module {module!r} of architecture {arch!r}: "
                       f"{type(e).__name__}: {e}") from e


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def expand(items: Sequence[str | Path]) -> list[Path]:
    """Files, and folders: a `transformers` folder is one model; another folder contributes its
    `client_*.safetensors` (dmm train's layout) or else every model file in it, by name."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if is_hf_folder(p):
            out.append(p)
        elif p.is_dir():
            found = sorted(p.glob("client_*.safetensors")) or sorted(
                f for f in p.iterdir() if f.suffix in MODEL_SUFFIXES and f.is_file())
            if not found:
                raise DMMError(f"{p}: no model files in this folder (client_*.safetensors, "
                               f"*.safetensors, *.pt, *.pth or a transformers folder)")
            out.extend(found)
        elif not p.exists():
            raise DMMError(f"{p}: no such file or folder")
        elif p.suffix not in MODEL_SUFFIXES:
            raise DMMError(f"{p}: not a model file (expected .safetensors, .pt or .pth)")
        else:
            out.append(p)
    return out


def _sidecar(path: Path) -> dict:
    side = path.with_suffix(".json")
    if not side.is_file():
        return {}
    try:
        d = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DMMError(f"{side}: sidecar is not readable JSON ({e})") from e
    if not isinstance(d, dict):
        raise DMMError(f"{side}: sidecar must be a JSON object")
    bad = sorted(set(d) - set(SIDECAR_KEYS))
    if bad:
        raise DMMError(f"{side}: unknown sidecar key(s) {', '.join(bad)}; a sidecar may hold "
                       f"{', '.join(SIDECAR_KEYS)}")
    return d


def _read_hf(path: Path, lazy: bool) -> Checkpoint:
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DMMError(f"{path / CONFIG}: not readable JSON ({e})") from e
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise DMMError(f"{path / CONFIG}: a transformers config needs a model_type")
    raw = LazyState(path / WEIGHTS)
    state = {PREFIX + k: raw[k] for k in raw} if not lazy else _Prefixed(raw)
    meta: dict[str, Any] = {"arch": HF_ARCH, "arch_kwargs": {"config": config}}
    labels = config.get("id2label")
    if isinstance(labels, dict) and labels:
        meta["classes"] = [str(labels[k]) for k in sorted(labels, key=lambda k: int(k))]
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        try:
            p = json.loads(pre.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DMMError(f"{pre}: not readable JSON ({e})") from e
        if isinstance(p, dict) and p.get("image_mean") and p.get("image_std"):
            meta["input_mean"], meta["input_std"] = list(p["image_mean"]), list(p["image_std"])
    return Checkpoint(state, meta, path)


class _Prefixed(LazyState):
    """A transformers folder's tensors under the prefix of dmm's wrapper, read on access."""

    def __init__(self, inner: LazyState):  # noqa: D107 - shares the parsed index
        self.path, self.metadata, self._start = inner.path, inner.metadata, inner._start
        self._index = {PREFIX + k: v for k, v in inner._index.items()}


def read_one(path: Path, *, lazy: bool = False) -> Checkpoint:
    """One model file or transformers folder, with its own metadata (possibly without `arch`)
    and, for a file without dmm metadata, its sidecar."""
    if is_hf_folder(path):
        return _read_hf(path, lazy)
    if path.suffix == ".safetensors":
        ck = open_lazy(path, require_arch=False) if lazy else load(path, require_arch=False)
    else:
        ck = import_pt(path)
    if "arch" not in ck.meta:
        ck.meta = {**ck.meta, **_sidecar(path)}
    return ck


def read_models(items: Sequence[str | Path], spec: ModelSpec | None = None, *,
                lazy: bool = False) -> list[Checkpoint]:
    """Checkpoints of every model file in `items` (files and folders, see `expand`), each with
    the metadata merged from the file, its sidecar and `spec`; every one must then name an
    architecture. `lazy`: safetensors tensors stay in the files until read."""
    spec = spec or ModelSpec()
    if spec.arch is not None:
        trust_class(spec.arch)
    ckpts = [read_one(p, lazy=lazy) for p in expand(items)]
    for i, ck in enumerate(ckpts):
        ck.meta = {**ck.meta, **spec.meta(i, len(ckpts))}
        if "arch" not in ck.meta:
            raise DMMError(f"{ck.path}: names no architecture (no dmm metadata, no sidecar); "
                           "give --arch package.module:Class and --arch-kwargs JSON")
    return ckpts


def save_hf_folder(model: nn.Module, out: str | Path, source: Path | None = None,
                   extra: dict | None = None) -> Path:
    """Write a `transformers` model (dmm's wrapper, `dmm.models.hf`) as a folder that
    `from_pretrained` loads: written beside, then renamed, so a failure leaves nothing. The
    source folder's `preprocessor_config.json` is copied; `extra` goes to `dmm.json`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DMMError(f"{out}: exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        model.hf.save_pretrained(str(tmp), safe_serialization=True)
        pre = source / "preprocessor_config.json" if source is not None else None
        if pre is not None and pre.is_file():
            shutil.copy(pre, tmp / pre.name)
        if extra is not None:
            (tmp / "dmm.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
