"""State-dict key classification and state-dict algebra.

Keys are classified by the type of the module that owns them, never by substrings of their
names: a `running_var` of a BatchNorm is a statistic, a parameter called `running_var` in some
user's module is not.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

StateDict = dict[str, torch.Tensor]


class KeyKind(enum.Enum):
    PARAM = "param"          # trainable weight or bias of any layer (BN affine included)
    NORM_AFFINE = "norm_affine"  # weight/bias of a normalization layer (a PARAM, flagged for CAT)
    BN_MEAN = "bn_mean"      # BatchNorm running_mean
    BN_VAR = "bn_var"        # BatchNorm running_var
    BN_COUNT = "bn_count"    # BatchNorm num_batches_tracked (integer counter)
    BUFFER = "buffer"        # any other buffer


_NORM_TYPES = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)


def classify_keys(model: nn.Module) -> dict[str, KeyKind]:
    """Map every state-dict key of `model` to its KeyKind, by owning module type."""
    kinds: dict[str, KeyKind] = {}
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        for pname, p in module.named_parameters(recurse=False):
            if p is None:
                continue
            kinds[prefix + pname] = (
                KeyKind.NORM_AFFINE if isinstance(module, _NORM_TYPES) else KeyKind.PARAM
            )
        for bname, b in module.named_buffers(recurse=False):
            if b is None or bname in module._non_persistent_buffers_set:
                continue
            kind = KeyKind.BUFFER
            if isinstance(module, _BatchNorm):
                kind = {
                    "running_mean": KeyKind.BN_MEAN,
                    "running_var": KeyKind.BN_VAR,
                    "num_batches_tracked": KeyKind.BN_COUNT,
                }.get(bname, KeyKind.BUFFER)
            kinds[prefix + bname] = kind
    return kinds


def bn_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Name -> BatchNorm module (tracking running statistics), in forward-definition order."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
    }


def is_trainable(kind: KeyKind) -> bool:
    return kind in (KeyKind.PARAM, KeyKind.NORM_AFFINE)


def weighted_average(
    states: Sequence[StateDict], weights: Sequence[float], keys: Sequence[str] | None = None
) -> StateDict:
    """sum_k w_k * state_k / sum_k w_k for every key (or `keys`), computed in float64.

    Integer tensors are averaged and rounded back to their dtype, the way plain FedAvg
    implementations treat `num_batches_tracked`.
    """
    if not states:
        raise ValueError("weighted_average needs at least one state dict")
    if len(weights) != len(states):
        raise ValueError(f"{len(states)} state dicts but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    keys = list(states[0]) if keys is None else list(keys)
    out: StateDict = {}
    for key in keys:
        acc = torch.zeros(states[0][key].shape, dtype=torch.float64)
        for s, w in zip(states, weights, strict=True):
            acc += s[key].to(torch.float64) * (float(w) / total)
        dtype = states[0][key].dtype
        out[key] = acc.round().to(dtype) if not dtype.is_floating_point else acc.to(dtype)
    return out


def check_finite(states: Sequence[StateDict], names: Sequence[str]) -> None:
    """Raise DMMError naming the first model and key with a NaN or Inf value."""
    from dmm.errors import DMMError

    for s, name in zip(states, names, strict=True):
        for k, v in s.items():
            if v.dtype.is_floating_point and not torch.isfinite(v).all():
                raise DMMError(f"{name}: key {k} has NaN or Inf values")


def clone_state(state: StateDict) -> StateDict:
    return {k: v.detach().clone() for k, v in state.items()}


def state_of(model_or_state: nn.Module | StateDict) -> StateDict:
    """A detached CPU copy of a module's state dict, or of a state dict."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return {k: v.detach().cpu().clone() for k, v in state.items()}
