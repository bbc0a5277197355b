"""Architectures: a registry keyed by name, plus users' own classes as `package.module:Class`."""

from dmm.models.registry import available_architectures, create, register_architecture

__all__ = ["available_architectures", "create", "register_architecture"]
