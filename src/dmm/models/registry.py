"""Architecture registry: `create("resnet18", width=0.25, num_classes=10)`."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from torch import nn

from dmm.errors import DMMError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_architecture(name: str) -> Callable:
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_architectures() -> list[str]:
    return sorted(_REGISTRY)


def arch_kwargs(arch: str, *, num_classes: int, in_channels: int,
                width: float | None = None) -> dict:
    """The keyword arguments dmm builds `arch` with for a data set: its number of classes and
    input channels, and the channel width for the built-in architectures (a user's class,
    `package.module:Class`, is not assumed to take one)."""
    kw = {"num_classes": int(num_classes), "in_channels": int(in_channels)}
    if ":" not in arch and width is not None:
        kw["width"] = width
    return kw


def create(arch: str, **kwargs) -> nn.Module:
    """Build a registered architecture, or a user's class given as `package.module:Class`.

    A user's class is constructed with the same keyword arguments (typically `num_classes`,
    `in_channels`); arguments it does not accept are an error, not silently dropped.
    """
    if arch in _REGISTRY:
        try:
            return _REGISTRY[arch](**kwargs)
        except (TypeError, ValueError, OverflowError) as e:  # e.g. from a file's arch_kwargs
            raise DMMError(f"architecture {arch!r} rejected arguments {kwargs}: {e}") from e
    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise DMMError(f"cannot import architecture {arch!r}: {e}") from e
        # checked before calling: a name such as os:system must never be called
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise DMMError(f"architecture {arch!r} is not an nn.Module class")
        try:
            model = cls(**kwargs)
        except TypeError as e:
            raise DMMError(f"architecture {arch!r} rejected arguments {sorted(kwargs)}: {e}") from e
        if not isinstance(model, nn.Module):
            raise DMMError(f"architecture {arch!r} did not build an nn.Module")
        return model
    raise DMMError(
        f"unknown architecture {arch!r}; choose one of {', '.join(sorted(_REGISTRY))} "
        "or give your own class as package.module:Class"
    )


def check_trusted(arch: str, where: str) -> None:
    """Refuse an architecture named by a *file* whose module would have to be imported.

    Importing a module runs its code, so a checkpoint must not be able to name any module it
    likes. A user class `package.module:Class` from a checkpoint's metadata is built only if
    its module is already imported (the user imported it) or listed in the environment
    variable DMM_TRUST_MODULES (comma-separated module names or package prefixes). Registered
    names and plain unknown names (an error later) pass.
    """
    if ":" not in arch:
        return
    module = arch.partition(":")[0]
    trusted = [m.strip() for m in os.environ.get("DMM_TRUST_MODULES", "").split(",")
               if m.strip()]
    if module in sys.modules or any(module == t or module.startswith(t + ".")
                                    for t in trusted):
        return
    raise DMMError(f"{where}: names the architecture {arch!r}; importing module {module!r} "
                   f"would run its code. If you trust it, set DMM_TRUST_MODULES={module}")

