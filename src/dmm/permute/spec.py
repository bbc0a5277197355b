"""Permutation specs: which permutation acts on which axis of every state-dict key.

After Ainsworth et al. (Git Re-Basin, ICLR 2023), `samuela/git-re-basin` `weight_matching.py`:
a spec maps every key to a tuple with one entry per tensor dimension, the name of the
permutation acting on that axis or None. Unlike its PyTorch ports, the spec covers *every* key:
BatchNorm running statistics follow their layer's output permutation and counters have no axis.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from dmm.errors import DMMError
from dmm.statedict import StateDict

Axes = tuple[str | None, ...]


@dataclass
class PermutationSpec:
    axes_to_perm: dict[str, Axes]
    perm_to_axes: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        table: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for key, axes in self.axes_to_perm.items():
            for axis, p in enumerate(axes):
                if p is not None:
                    table[p].append((key, axis))
        self.perm_to_axes = dict(table)

    def check(self, state: StateDict, *, source: str = "model") -> None:
        """Every key covered, one axis entry per dimension, equal sizes within a permutation."""
        missing = sorted(set(state) - set(self.axes_to_perm))
        extra = sorted(set(self.axes_to_perm) - set(state))
        if missing or extra:
            raise DMMError(f"permutation spec does not fit {source}: keys without a spec "
                           f"{missing[:3]}, spec keys not in the model {extra[:3]}")
        sizes: dict[str, int] = {}
        for key, axes in self.axes_to_perm.items():
            t = state[key]
            if len(axes) != t.dim():
                raise DMMError(f"permutation spec does not fit {source}: {key} has {t.dim()} "
                               f"dimensions but {len(axes)} axis entries")
            for axis, p in enumerate(axes):
                if p is None:
                    continue
                if sizes.setdefault(p, t.shape[axis]) != t.shape[axis]:
                    raise DMMError(f"permutation spec does not fit {source}: {p} acts on sizes "
                                   f"{sizes[p]} and {t.shape[axis]} ({key} axis {axis})")

    def sizes(self, state: StateDict) -> dict[str, int]:
        return {p: state[k].shape[a] for p, [(k, a), *_] in self.perm_to_axes.items()}


def apply_permutation(spec: PermutationSpec, perms: dict[str, torch.Tensor], state: StateDict
                      ) -> StateDict:
    """Permute every axis of every key: W[..., i, ...] <- W[..., perm[i], ...]."""
    out = {}
    for key, t in state.items():
        for axis, p in enumerate(spec.axes_to_perm.get(key, ())):
            if p is not None and p in perms:
                t = t.index_select(axis, perms[p])
        out[key] = t
    return out


def random_permutation(spec: PermutationSpec, state: StateDict, generator: torch.Generator
                       ) -> dict[str, torch.Tensor]:
    return {p: torch.randperm(n, generator=generator) for p, n in spec.sizes(state).items()}


# ---- builders ---------------------------------------------------------------------------------

def _conv(name: str, p_in: str | None, p_out: str | None, bias: bool = False) -> dict[str, Axes]:
    d = {f"{name}.weight": (p_out, p_in, None, None)}
    if bias:
        d[f"{name}.bias"] = (p_out,)
    return d


def _norm(name: str, p: str) -> dict[str, Axes]:
    return {f"{name}.weight": (p,), f"{name}.bias": (p,), f"{name}.running_mean": (p,),
            f"{name}.running_var": (p,), f"{name}.num_batches_tracked": ()}


def resnet_spec(model: nn.Module) -> PermutationSpec:
    """Spec for `dmm.models.resnet.ResNet` of any depth, width and in_channels.

    Residual additions tie permutations: the stem output and every block output of a stage
    share the stage's permutation `P_s`; each block's inner channels have their own `P_s_b`;
    a shortcut conv maps the previous stage's permutation to the new one.
    """
    from dmm.models.resnet import ResNet

    if not isinstance(model, ResNet):
        raise DMMError(f"no permutation spec builder for {type(model).__name__}; "
                       "give a PermutationSpec for your architecture")
    axes: dict[str, Axes] = {}
    stream = "P_stem"
    axes.update(_conv("conv1", None, stream))
    axes.update(_norm("bn1", stream))
    for s, stage in enumerate(model.layers):
        for b, block in enumerate(stage):
            prefix = f"layers.{s}.{b}"
            inner = f"P_{s}_{b}"
            out = stream
            if len(block.shortcut) > 0:
                out = f"P_{s}"
                axes.update(_conv(f"{prefix}.shortcut.0", stream, out))
                axes.update(_norm(f"{prefix}.shortcut.1", out))
            axes.update(_conv(f"{prefix}.conv1", stream, inner))
            axes.update(_norm(f"{prefix}.bn1", inner))
            axes.update(_conv(f"{prefix}.conv2", inner, out))
            axes.update(_norm(f"{prefix}.bn2", out))
            stream = out
    axes["fc.weight"] = (None, stream)
    axes["fc.bias"] = (None,)
    return PermutationSpec(axes)


def spec_for(model: nn.Module) -> PermutationSpec:
    """The permutation spec of a supported architecture, checked against the model."""
    spec = resnet_spec(model)
    spec.check(model.state_dict())
    return spec
