"""Checks shared by the configuration dataclasses: each config validates itself when it is made
(as Flower's FedProx checks `proximal_mu` in its constructor), so a bad setting fails where it is
written, not later inside the function that first reads it."""

from __future__ import annotations

import dataclasses
import math

from dmm.errors import DMMError


def check_fields(cfg, where: str) -> None:
    """Every scalar field of a config dataclass of its declared kind: values from JSON files or
    the command line arrive untyped. Kinds: bool, int, float (an int is accepted; finite), str;
    None where the annotation allows it. Nested configs and lists check themselves."""
    for f in dataclasses.fields(cfg):
        v, t = getattr(cfg, f.name), str(f.type)
        if v is None and "None" in t:
            continue
        kind = t.split(" ")[0]
        if kind == "bool":
            ok, say = isinstance(v, bool), "true or false"
        elif kind == "int":
            ok, say = isinstance(v, int) and not isinstance(v, bool), "an integer"
        elif kind == "float":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            say = "a finite number"
        elif kind == "str":
            ok, say = isinstance(v, str), "a string"
        else:
            continue
        if not ok:
            raise DMMError(f"{where} {f.name} must be {say}, got {v!r}")


def check_range(where: str, name: str, value, lo=None, hi=None) -> None:
    """lo <= value <= hi (either bound may be None), as a one-line error naming the setting."""
    if (lo is not None and not value >= lo) or (hi is not None and not value <= hi):
        bounds = (f"in [{lo}, {hi}]" if lo is not None and hi is not None
                  else f">= {lo}" if lo is not None else f"<= {hi}")
        raise DMMError(f"{where} {name} must be {bounds}, got {value}")
