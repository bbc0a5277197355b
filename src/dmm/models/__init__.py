"""Architectures: a registry keyed by name, plus users' own classes as `package.module:Class`."""

from dmm.models.registry import (
    arch_kwargs,
    available_architectures,
    create,
    register_architecture,
)

# importing registers the built-in ResNets and the transformers wrapper (the image + text model
# registers from dmm.multimodal)
from dmm.models import hf, resnet  # noqa: E402, F401  isort: skip

__all__ = ["arch_kwargs", "available_architectures", "create", "register_architecture"]
