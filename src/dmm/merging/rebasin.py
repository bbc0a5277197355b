"""Git Re-Basin merging (Ainsworth et al., ICLR 2023): weight matching, then averaging.

K > 2 models: every model is aligned to a reference (model `reference`), the aligned models
are averaged, and then, for `rounds` - 1 more rounds, every model is re-aligned to the current
average and averaged again (a MergeMany-style refinement; stops early when nothing changes).
BatchNorm running statistics are permuted with their layers and then pooled with Eq. 3-4.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dmm.errors import DMMError
from dmm.merging.average import average_merge
from dmm.merging.registry import MergeMethod, register
from dmm.permute import apply_permutation, spec_for, weight_matching
from dmm.statedict import StateDict


def rebasin_merge(states: Sequence[StateDict], *, weights: Sequence[float], model: nn.Module,
                  base: StateDict | None = None, reference: int = 0, rounds: int = 3,
                  max_iter: int = 100, seed: int = 0) -> StateDict:
    if not 0 <= reference < len(states):
        raise DMMError(f"reference must index one of the {len(states)} models, got {reference}")
    if rounds < 1:
        raise DMMError(f"rounds must be >= 1, got {rounds}")
    spec = spec_for(model)
    g = torch.Generator().manual_seed(seed)
    target = states[reference]
    perms: list[dict[str, torch.Tensor] | None] = [None] * len(states)
    merged = target
    for _ in range(rounds):
        changed = False
        aligned = []
        for k, s in enumerate(states):
            p = weight_matching(spec, target, s, generator=g, max_iter=max_iter,
                                init=perms[k])
            if perms[k] is None or any(not torch.equal(p[n], perms[k][n]) for n in p):
                changed = True
            perms[k] = p
            aligned.append(apply_permutation(spec, p, s))
        merged = average_merge(aligned, weights=weights, model=model)
        if not changed:
            break
        target = merged
    return merged


register(MergeMethod(
    name="rebasin", pretty_name="Git Re-Basin (weight matching)",
    paper="https://arxiv.org/abs/2209.04836",
    bn_handling="running statistics permuted with their layers, then pooled (Eq. 3-4)",
    fn=rebasin_merge))
