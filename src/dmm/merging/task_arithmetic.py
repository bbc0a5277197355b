"""Task arithmetic (Ilharco et al., ICLR 2023) and TIES-Merging (Yadav et al., NeurIPS 2023) as one
generalized method over task vectors tau_k = W_k - W_base (after MergeKit's
`GeneralizedTaskArithmeticMerge`).

Conventions (documented because papers differ):
- Model weights w_k are normalized to sum to 1, so `scale=1` with no trimming is the weighted
  average of the models; Ilharco et al.'s unnormalized sum with coefficient lambda is
  `scale = lambda * K` with uniform weights.
- TIES: per tensor, keep the `density` fraction of entries of largest magnitude of each tau_k
  (trim), elect each entry's sign as the sign of sum_k w_k * trimmed tau_k (mass), and average
  only the entries that agree with the elected sign, weighted by w_k (disjoint mean).
- Only trainable tensors (weights, biases, normalization affine) are task vectors; BatchNorm
  running statistics are pooled with Eq. 3-4 using the merge weights, counters summed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dmm.bn import aggregate_bn_buffers
from dmm.errors import DMMError
from dmm.merging.registry import MergeMethod, register
from dmm.statedict import KeyKind, StateDict, classify_keys, is_trainable, weighted_average


def _check_fraction(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise DMMError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def trim_to_density(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ceil(density * numel) entries of largest magnitude (ties kept)."""
    if density >= 1.0:
        return tau
    k = int(torch.ceil(torch.tensor(density * tau.numel())).item())
    if k <= 0:
        return torch.zeros_like(tau)
    threshold = tau.abs().flatten().kthvalue(tau.numel() - k + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def ties_combine(taus: Sequence[torch.Tensor], weights: Sequence[float], density: float
                 ) -> torch.Tensor:
    """Trim, elect sign, disjoint (weighted) mean of task vectors of one tensor."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    trimmed = torch.stack([trim_to_density(t.double(), density) for t in taus])
    wv = w.view(-1, *([1] * (trimmed.dim() - 1)))
    elected = torch.sign((wv * trimmed).sum(0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    num = (wv * trimmed * agree).sum(0)
    den = (wv * agree).sum(0)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def generalized_task_arithmetic(
    states: Sequence[StateDict],
    *,
    weights: Sequence[float],
    model: nn.Module,
    base: StateDict | None,
    scale: float = 1.0,
    density: float = 1.0,
    sign_election: bool = False,
) -> StateDict:
    """W = W_base + scale * combine_k(tau_k); combine = weighted mean or TIES."""
    if base is None:
        raise DMMError("task arithmetic needs a base model (the common initialization)")
    density = _check_fraction("density", density)
    if not isinstance(scale, (int, float)):
        raise DMMError(f"scale must be a number, got {scale!r}")
    total = float(sum(weights))
    w = [float(x) / total for x in weights]
    kinds = classify_keys(model)
    out = weighted_average(states, w)  # buffers and counters start from the plain average
    for key, kind in kinds.items():
        if not is_trainable(kind):
            continue
        b = base[key].double()
        taus = [s[key].double() - b for s in states]
        if sign_election or density < 1.0:
            merged_tau = ties_combine(taus, w, density)
        else:
            merged_tau = sum(wk * t for wk, t in zip(w, taus, strict=True))
        out[key] = (b + float(scale) * merged_tau).to(states[0][key].dtype)
    if any(v is KeyKind.BN_VAR for v in kinds.values()):
        out = aggregate_bn_buffers(states, model, weights=w, into=out)
    return out


def task_arithmetic(states, *, weights, model, base, scale: float = 1.0) -> StateDict:
    return generalized_task_arithmetic(states, weights=weights, model=model, base=base,
                                       scale=scale)


def ties(states, *, weights, model, base, scale: float = 1.0, density: float = 0.2) -> StateDict:
    return generalized_task_arithmetic(states, weights=weights, model=model, base=base,
                                       scale=scale, density=density, sign_election=True)


register(MergeMethod(
    name="task_arithmetic", pretty_name="Task arithmetic", paper="https://arxiv.org/abs/2212.04089",
    bn_handling="pooled (Eq. 3-4) with the merge weights", fn=task_arithmetic, needs_base=True,
    streams=True))
register(MergeMethod(
    name="ties", pretty_name="TIES-Merging", paper="https://arxiv.org/abs/2306.01708",
    bn_handling="pooled (Eq. 3-4) with the merge weights", fn=ties, needs_base=True, streams=True))
