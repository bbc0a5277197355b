"""Weighted parameter averaging (McMahan et al., 2017; Wortsman et al., 2022 "model soups"),
with BatchNorm statistics pooled by Eq. 3-4 instead of averaged."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from dmm.bn import aggregate_bn_buffers
from dmm.merging.registry import MergeMethod, register
from dmm.statedict import KeyKind, StateDict, classify_keys, weighted_average


def average_merge(states: Sequence[StateDict], *, weights: Sequence[float], model: nn.Module,
                  base: StateDict | None = None, pool_bn: bool = True) -> StateDict:
    """sum_k w_k W_k / sum_k w_k for every parameter; BN statistics pooled (or averaged)."""
    out = weighted_average(states, weights)
    kinds = classify_keys(model)
    if pool_bn and any(v is KeyKind.BN_VAR for v in kinds.values()):
        out = aggregate_bn_buffers(states, model, weights=weights, into=out)
    return out


register(MergeMethod(
    name="average",
    pretty_name="Weighted averaging",
    paper="https://arxiv.org/abs/1602.05629",
    bn_handling="pooled (Eq. 3-4) with the merge weights; pool_bn=False averages them",
    fn=average_merge,
    streams=True,
))
