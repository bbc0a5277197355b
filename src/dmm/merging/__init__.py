"""Merging methods in one registry: name -> pure function over state dicts + metadata.

A method never trains. Each entry says how it treats BatchNorm statistics.
"""

from dmm.merging.registry import MergeMethod, available_methods, get_method, merge_states, register

# importing registers the built-in methods
from dmm.merging import average, cat, pleas, rebasin, task_arithmetic  # noqa: E402, F401  isort: skip

__all__ = ["MergeMethod", "available_methods", "get_method", "merge_states", "register"]
