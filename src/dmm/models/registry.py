"""Architecture registry: `create("resnet18", width=0.25, num_classes=10)`."""

from __future__ import annotations

import importlib
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
    _ensure_builtin()
    return sorted(_REGISTRY)


def create(arch: str, **kwargs) -> nn.Module:
    """Build a registered architecture, or a user's class given as `package.module:Class`.

    A user's class is constructed with the same keyword arguments (typically `num_classes`,
    `in_channels`); arguments it does not accept are an error, not silently dropped.
    """
    _ensure_builtin()
    if arch in _REGISTRY:
        return _REGISTRY[arch](**kwargs)
    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise DMMError(f"cannot import architecture {arch!r}: {e}") from e
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


def _ensure_builtin() -> None:
    from dmm.models import resnet  # noqa: F401
    from dmm.multimodal import model  # noqa: F401
