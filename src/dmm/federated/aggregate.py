"""Server-side aggregation rules as pure functions over state dicts.

- `fedavg`: McMahan et al., AISTATS 2017, weighted by client sample counts. Like Flower, FedML
  and PFLlib it averages *every* tensor, BatchNorm running variances included; this is the
  baseline the paper measures (the correct pooling is `dmm.bn.aggregate_bn_buffers`).
- `fedbn_shared`: Li et al., ICLR 2021 (FedBN): only non-normalization keys are averaged;
  BatchNorm affine parameters and statistics stay with each client.
- `fedbn_global`: FedBN's model for a global test set, which FedBN itself does not define:
  shared keys averaged, BN statistics pooled with Eq. 3-4 and BN affine parameters averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dmm.bn import aggregate_bn_buffers
from dmm.statedict import StateDict, weighted_average


def fedavg(states: Sequence[StateDict], n_samples: Sequence[int]) -> StateDict:
    """Sample-weighted average of every key (integer counters averaged and rounded)."""
    return weighted_average(states, n_samples)


def bn_owned_keys(model: nn.Module) -> set[str]:
    """Every state-dict key that belongs to a BatchNorm module (affine and statistics)."""
    keys = set()
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k in m.state_dict())
    return keys


def fedbn_shared(states: Sequence[StateDict], n_samples: Sequence[int], model: nn.Module
                 ) -> StateDict:
    """The keys FedBN shares, averaged; BN-owned keys are absent from the result."""
    local = bn_owned_keys(model)
    return weighted_average(states, n_samples, [k for k in states[0] if k not in local])


def fedbn_global(states: Sequence[StateDict], n_samples: Sequence[int], model: nn.Module
                 ) -> StateDict:
    """One global model from FedBN clients: averaged weights, pooled BN statistics."""
    avg = weighted_average(states, n_samples)
    return aggregate_bn_buffers(states, model, weights=n_samples, into=avg)
