"""One validation layer in front of merge, refine, evaluate and inspect.

Checkpoints that will be combined must share the architecture (name and keyword arguments),
and each must fit it exactly: the same keys, shapes and dtypes as the architecture's own state
dict, finite values, the class count of the data set when one is given, and BatchNorm layers
when DMM needs their statistics. Every failure is one DMMError naming the file and the key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dmm.checkpoint import Checkpoint
from dmm.errors import DMMError
from dmm.statedict import bn_layers


def _arch(ck: Checkpoint) -> tuple[str, dict]:
    return ck.meta.get("arch"), ck.meta.get("arch_kwargs", {})


def validate_checkpoint(ck: Checkpoint, *, num_classes: int | None = None,
                        need_bn: bool = False, model: nn.Module | None = None) -> None:
    """`ck` fits its own architecture exactly (keys, shapes, dtypes), with finite values.
    `model`: a fresh model of that architecture, if the caller has one already."""
    name, kwargs = _arch(ck)
    where = ck.path or "checkpoint"
    # on the meta device: a file cannot make dmm allocate what it does not hold
    model = model if model is not None else ck.new_model(meta=True)
    template = model.state_dict()
    missing = [k for k in template if k not in ck.state]
    unexpected = [k for k in ck.state if k not in template]
    if missing or unexpected:
        def few(keys):
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        parts = []
        if missing:
            parts.append(f"key {few(missing)} {'is' if len(missing) == 1 else 'are'} missing "
                         f"({name} has {'it' if len(missing) == 1 else 'them'})")
        if unexpected:
            parts.append(f"unexpected key {few(unexpected)} (not in {name})")
        raise DMMError(f"{where}: the weights do not fit {name}: " + "; ".join(parts))
    for k in template:
        v = ck.state[k]
        t = template[k]
        if tuple(v.shape) != tuple(t.shape):
            raise DMMError(f"{where}: key {k} has shape {tuple(v.shape)}, {name} expects "
                           f"{tuple(t.shape)}")
        if v.dtype != t.dtype:
            raise DMMError(f"{where}: key {k} has dtype {str(v.dtype).replace('torch.', '')}, "
                           f"{name} expects {str(t.dtype).replace('torch.', '')}")
        if v.dtype.is_floating_point and not torch.isfinite(v).all():
            raise DMMError(f"{where}: key {k} has NaN or Inf values")
    if num_classes is not None:
        classes = kwargs.get("num_classes")
        if classes is not None and classes != num_classes:
            raise DMMError(f"{where}: the model has {classes} classes, the data set has "
                           f"{num_classes}")
    if need_bn and not bn_layers(model):
        raise DMMError(f"{where}: {name} has no BatchNorm layer; DMM needs running statistics")


def validate_group(ckpts: Sequence[Checkpoint], *, reference: Checkpoint | None = None,
                   num_classes: int | None = None, need_bn: bool = False) -> None:
    """Every checkpoint valid, and all of one architecture (that of `reference` if given)."""
    if not ckpts:
        raise DMMError("no checkpoints given")
    ref = reference or ckpts[0]
    for ck in ckpts:
        if _arch(ck) != _arch(ref):
            raise DMMError(f"{ck.path}: architecture {ck.meta.get('arch')} "
                           f"{ck.meta.get('arch_kwargs')} differs from {ref.path}: "
                           f"{ref.meta.get('arch')} {ref.meta.get('arch_kwargs')}")
    model = ref.new_model(meta=True)  # one template for the group: they share the architecture
    validate_checkpoint(ref, num_classes=num_classes, need_bn=need_bn, model=model)
    for ck in ckpts:
        if ck is not ref:
            validate_checkpoint(ck, num_classes=num_classes, need_bn=False, model=model)
