"""BatchNorm statistics: pooled aggregation (paper Eq. 3-4) and recalibration.

Plain FedAvg (Flower, FedML, PFLlib) averages `running_var` like a weight, which drops the
between-client term of the variance: if client k's features have mean mu_k, the union's variance
is the mean of the s2_k *plus* the spread of the mu_k. Pooling with the law of total variance
gives the statistics of the union of the clients' data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dmm.errors import DMMError
from dmm.statedict import KeyKind, StateDict, bn_layers, classify_keys


def pooled_bn_statistics(
    means: Sequence[torch.Tensor], variances: Sequence[torch.Tensor], counts: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Eq. 3-4: mu = sum c_k mu_k / C; s2 = sum c_k (s2_k + (mu_k - mu)^2) / C; count = C.

    With population (biased) per-part variances and c_k the part sizes, this is exactly the mean
    and population variance of the concatenated parts. Computed in float64.
    """
    if not (len(means) == len(variances) == len(counts)) or not means:
        raise ValueError("pooled_bn_statistics needs equally many means, variances and counts (>0)")
    c = torch.tensor([float(x) for x in counts], dtype=torch.float64)
    if (c < 0).any() or c.sum() <= 0:
        raise ValueError(f"counts must be non-negative with a positive sum, got {list(counts)}")
    w = (c / c.sum()).view(-1, *([1] * means[0].dim()))
    mu_k = torch.stack([m.to(torch.float64) for m in means])
    s2_k = torch.stack([v.to(torch.float64) for v in variances])
    mu = (w * mu_k).sum(0)
    s2 = (w * (s2_k + (mu_k - mu) ** 2)).sum(0)
    return mu.to(means[0].dtype), s2.to(variances[0].dtype), float(c.sum())


def aggregate_bn_buffers(
    states: Sequence[StateDict],
    model: nn.Module,
    *,
    weights: Sequence[float] | None = None,
    into: StateDict | None = None,
) -> StateDict:
    """Pool every BatchNorm layer's running statistics across `states` (Eq. 3-4).

    Layers are found by module type on `model` (the shared architecture). `weights` are the c_k:
    None uses each state's own `num_batches_tracked` per layer (the paper's choice); pass the
    sample counts n_k to weight by data instead. Counters are summed as integers. Returns `into`
    (a copy of states[0] by default) with the pooled buffers written in; other keys untouched.
    """
    out = {k: v.clone() for k, v in (states[0] if into is None else into).items()}
    layers = bn_layers(model)
    if not layers:
        raise DMMError("the model has no BatchNorm layer with running statistics")
    for name in layers:
        prefix = f"{name}." if name else ""
        counts_key = prefix + "num_batches_tracked"
        if weights is None:
            c = [float(s[counts_key]) if counts_key in s else 1.0 for s in states]
            if sum(c) <= 0:  # untrained models carry counter 0: fall back to equal weights
                c = [1.0] * len(states)
        else:
            c = [float(w) for w in weights]
        mu, s2, _ = pooled_bn_statistics(
            [s[prefix + "running_mean"] for s in states],
            [s[prefix + "running_var"] for s in states],
            c,
        )
        out[prefix + "running_mean"] = mu
        out[prefix + "running_var"] = s2
        if counts_key in out:
            out[counts_key] = torch.stack([s[counts_key] for s in states]).sum().to(
                states[0][counts_key].dtype
            )
    return out


def bn_stat_keys(model: nn.Module) -> list[str]:
    kinds = classify_keys(model)
    return [k for k, v in kinds.items() if v in (KeyKind.BN_MEAN, KeyKind.BN_VAR, KeyKind.BN_COUNT)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 256) -> nn.Module:
    """Recompute running statistics from `inputs` (float, normalized) as exact averages.

    Resets the statistics and sets momentum None (cumulative average) for the pass, then
    restores momentum. Weights are untouched; the model is returned in eval mode.
    """
    layers = list(bn_layers(model).values())
    if not layers:
        raise DMMError("the model has no BatchNorm layer to recalibrate")
    saved = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    dev = next(model.parameters()).device
    try:
        for i in range(0, len(inputs), batch_size):
            model(inputs[i: i + batch_size].to(dev))
    finally:
        for m, mom in zip(layers, saved, strict=True):
            m.momentum = mom
        model.eval()
    return model
