"""The merging registry (after MergeKit's: one entry per method, with pretty name and paper)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from dmm.errors import DMMError
from dmm.statedict import StateDict

# what merge_states hands a method's fn when fn declares it (by keyword): the models' weights,
# a template module, the common base, the run's seed and the models' input shape (C, H, W)
PROVIDED = ("weights", "model", "base", "seed", "input_shape")
# merge_states' own keywords, never forwarded: a method declaring one would never receive it
RESERVED = ("states", "method", "bn_reset", "pixel_range", "params")


@dataclass(frozen=True)
class MergeMethod:
    name: str
    pretty_name: str
    paper: str
    bn_handling: str                 # how BN running statistics are produced
    fn: Callable[..., StateDict]     # fn(states, *, weights, model, base, **params) -> state
    needs_base: bool = False
    # fn reads the states key by key, so they may be lazily loaded (checkpoint.LazyState): a
    # merge then holds one key's tensors of every model instead of every model whole
    streams: bool = False


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add `method` to the registry. Its fn must take the states positionally and everything
    else by keyword; it may not declare a keyword that `merge_states` keeps for itself
    (RESERVED), which it would silently never receive (MergeKit's easy_define checks the same)."""
    params = inspect.signature(method.fn).parameters
    first = next(iter(params), None)  # the states, positional
    clash = sorted(n for n in params if n in RESERVED and n != first)
    if clash:
        raise DMMError(f"merging method {method.name!r}: its function declares "
                       f"{', '.join(clash)}, which merge_states reserves and never forwards")
    for n in ("weights", "model"):
        if n not in params or params[n].kind is not params[n].KEYWORD_ONLY:
            raise DMMError(f"merging method {method.name!r}: its function must take {n!r} as a "
                           "keyword-only argument")
    if method.name in _REGISTRY and _REGISTRY[method.name].fn is not method.fn:
        raise DMMError(f"merging method {method.name!r} is registered already")
    _REGISTRY[method.name] = method
    return method


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> MergeMethod:
    if name not in _REGISTRY:
        raise DMMError(f"unknown merging method {name!r}; choose one of "
                       f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_params(method: MergeMethod) -> list[str]:
    """The method's own keyword parameters (what `--param` sets): every keyword-only parameter
    of its fn except those merge_states provides (PROVIDED)."""
    sig = inspect.signature(method.fn)
    return [n for n, p in sig.parameters.items()
            if p.kind is p.KEYWORD_ONLY and n not in PROVIDED]


def provided_params(method: MergeMethod) -> list[str]:
    """The PROVIDED names the method's fn declares: merge_states forwards exactly these."""
    sig = inspect.signature(method.fn)
    return [n for n in PROVIDED if n in sig.parameters]


def _shape(state, key: str) -> tuple[int, ...]:
    """A tensor's shape, without reading it from a lazily loaded checkpoint."""
    shape_of = getattr(state, "shape_of", None)
    return tuple(shape_of(key) if shape_of else state[key].shape)


def merge_states(
    states: Sequence[StateDict],
    method: str = "average",
    *,
    model: nn.Module,
    weights: Sequence[float] | None = None,
    base: StateDict | None = None,
    bn_reset: bool = False,
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
    pixel_range: tuple[float, float] | None = None,
    **params,
) -> StateDict:
    """Merge `states` (same architecture as `model`) with a registered method.

    `seed` and `input_shape` reach the method when its function declares them (its signature
    says so: Git Re-Basin's matcher order, PLeaS's and CAT's pseudo-inputs), and the BN reset.
    `bn_reset` recomputes the merged model's BatchNorm statistics on pseudo-data synthesized
    from every input model's own statistics (`dmm.merging.features.pseudo_bn_reset`).
    `params` are the method's own parameters (`method_params`).
    """
    m = get_method(method)
    if not states:
        raise DMMError("nothing to merge: no models given")
    keys = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != keys:
            diff = sorted(keys ^ set(s))[:3]
            raise DMMError(f"model {i} has different keys than model 0 (e.g. {diff})")
        for k in keys:
            if _shape(s, k) != _shape(states[0], k):
                raise DMMError(f"model {i}: key {k} has shape {_shape(s, k)}, "
                               f"model 0 has {_shape(states[0], k)}")
    if m.needs_base and base is None:
        raise DMMError(f"{m.pretty_name} needs a base model (the common initialization; "
                       "--base on the command line)")
    accepted = method_params(m)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise DMMError(f"{m.pretty_name} takes no parameter {', '.join(unknown)}; it takes "
                       f"{', '.join(accepted) or 'none'}")
    w = list(weights) if weights is not None else [1.0] * len(states)
    if len(w) != len(states) or any(x < 0 for x in w) or sum(w) <= 0:
        raise DMMError(f"merge weights must be {len(states)} non-negative numbers with a "
                       f"positive sum, got {w}")
    given = {"weights": w, "model": model, "base": base, "seed": seed,
             "input_shape": input_shape}
    merged = m.fn(states, **{n: given[n] for n in provided_params(m)}, **params)
    if bn_reset:
        from dmm.merging.features import pseudo_bn_reset
        merged = pseudo_bn_reset(merged, list(states), model, seed=seed,
                                 input_shape=input_shape, pixel_range=pixel_range)
    return merged
