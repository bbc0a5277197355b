"""Weight matching (Ainsworth et al., Git Re-Basin, ICLR 2023, Algorithm 2).

Find permutations P of model B that maximize sum over weights <W_A, P_out W_B P_in^T>, one
permutation at a time: with the others fixed, each is a linear assignment problem whose cost
sums, over every tensor that the permutation acts on, W_A (axis moved first, flattened) times
the other-permuted W_B (likewise) transposed. Permutations are visited in a random order
(seeded generator) per sweep; stop after a sweep with no improvement or `max_iter` sweeps.
BatchNorm running statistics take part in the spec (they are permuted) but not in the
objective, which uses trainable tensors only.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from dmm.permute.spec import PermutationSpec, apply_permutation
from dmm.statedict import StateDict

_STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _objective_keys(spec: PermutationSpec, state: StateDict) -> set[str]:
    return {k for k in spec.axes_to_perm if state[k].dtype.is_floating_point
            and not k.endswith(_STAT_SUFFIXES)}


def _permuted_except(spec: PermutationSpec, perms: dict[str, torch.Tensor], key: str,
                     t: torch.Tensor, skip: str) -> torch.Tensor:
    for axis, p in enumerate(spec.axes_to_perm[key]):
        if p is not None and p != skip:
            t = t.index_select(axis, perms[p])
    return t


def weight_matching(
    spec: PermutationSpec,
    target: StateDict,
    source: StateDict,
    *,
    generator: torch.Generator,
    max_iter: int = 100,
    init: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Permutations of `source` that align it to `target` (apply with `apply_permutation`)."""
    sizes = spec.sizes(target)
    perms = dict(init) if init is not None else {p: torch.arange(n) for p, n in sizes.items()}
    keys = _objective_keys(spec, target)
    names = sorted(sizes)
    for _ in range(max_iter):
        improved = False
        for i in torch.randperm(len(names), generator=generator).tolist():
            p = names[i]
            n = sizes[p]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for key, axis in spec.perm_to_axes[p]:
                if key not in keys:
                    continue
                wa = target[key].double().movedim(axis, 0).reshape(n, -1)
                wb = _permuted_except(spec, perms, key, source[key].double(), p)
                wb = wb.movedim(axis, 0).reshape(n, -1)
                cost += wa @ wb.T
            rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
            old_score = float(cost[torch.arange(n), perms[p]].sum())
            new_score = float(cost[torch.arange(n), new].sum())
            if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
                perms[p] = new
                improved = True
        if not improved:
            break
    return perms


def align_to(spec: PermutationSpec, target: StateDict, source: StateDict, *,
             generator: torch.Generator, max_iter: int = 100) -> StateDict:
    """`source` permuted to align with `target`."""
    perms = weight_matching(spec, target, source, generator=generator, max_iter=max_iter)
    return apply_permutation(spec, perms, source)
