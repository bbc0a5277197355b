"""Checkpoints: safetensors with a JSON metadata header. Loading never unpickles anything.

Metadata (all optional but `arch`): arch, arch_kwargs, classes, n_samples, client_id, plus any
extra JSON-serializable fields. `num_batches_tracked` is stored like every other tensor.
"""

from __future__ import annotations

import json
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

    def build(self) -> nn.Module:
        """Instantiate the architecture and load the weights (strict)."""
        model = create(self.arch, **self.meta.get("arch_kwargs", {}))
        try:
            model.load_state_dict(self.state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise DMMError(f"{self.path or 'checkpoint'}: weights do not fit {self.arch}: "
                           f"{' '.join(first[:3])[:300]}") from e
        return model


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


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by `save` (or any safetensors file with an `arch` in `meta`)."""
    path = Path(path)
    if not path.is_file():
        raise DMMError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DMMError(f"{path}: not a readable safetensors checkpoint ({e})") from e
    try:
        meta = json.loads(header.get(META_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise DMMError(f"{path}: metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or "arch" not in meta:
        raise DMMError(f"{path}: metadata names no architecture ('arch')")
    return Checkpoint(state, meta, path)


def load_dir(folder: str | Path, pattern: str = "client_*.safetensors") -> list[Checkpoint]:
    """Every checkpoint matching `pattern` in `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DMMError(f"{folder}: not a folder")
    paths = sorted(folder.glob(pattern))
    if not paths:
        raise DMMError(f"{folder}: no files matching {pattern}")
    return [load(p) for p in paths]


def resolve_inputs(items: list[str | Path]) -> list[Checkpoint]:
    """Checkpoint paths and/or folders (a folder contributes its client_*.safetensors)."""
    out: list[Checkpoint] = []
    for item in items:
        p = Path(item)
        out.extend(load_dir(p) if p.is_dir() else [load(p)])
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
