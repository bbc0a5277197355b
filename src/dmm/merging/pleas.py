"""PLeaS (Nasery et al., CVPR 2025): permutations, then layer-wise least squares.

1. Align every model to a common frame with weight matching (`dmm.permute`; K > 2 models are
   matched to a reference and iterated, as in our Git Re-Basin).
2. For every conv / linear layer, run all aligned models on the same inputs and fit the merged
   layer by ridge least squares so that, on the models' (weighted) average layer input, it
   reproduces their (weighted) average layer output (pre-BatchNorm):
       W = argmin_W || X_avg W^T - Y_avg ||^2 + lam ||W||^2,
   X_avg = sum_k w_k X_k (im2col rows for convs), Y_avg = sum_k w_k Y_k. Each layer's problem is
   independent (the inputs are the original models' features, as in the reference code).
3. BatchNorm affine parameters are averaged and running statistics pooled with Eq. 3-4 (option:
   `bn="recalibrate"` recomputes them on the merged model with the feature inputs).

Data-free: the inputs are DeepInversion pseudo-data synthesized from the average-merged model's
pooled BN statistics (`n_inputs` images), unless real unlabeled `inputs` are given.

Deviations from the paper / reference code, on purpose: K >= 2 (the paper merges two); full
merging only (no partial-merge width budget); the least squares are solved in closed form with
a ridge towards the averaged weights (lam = `ridge` * trace(G) / d) instead of 400 Adam
steps warm-started from them; rows are subsampled to
`max_rows` per layer to bound memory and time.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from dmm.bn import aggregate_bn_buffers, recalibrate_bn
from dmm.errors import DMMError
from dmm.merging.average import average_merge
from dmm.merging.features import as_rows, out_rows, pseudo_inputs, record_io, weight_layers
from dmm.merging.rebasin import rebasin_merge
from dmm.merging.registry import MergeMethod, register
from dmm.permute import apply_permutation, spec_for, weight_matching
from dmm.statedict import StateDict


def aligned_states(states: Sequence[StateDict], model: nn.Module, *, weights: Sequence[float],
                   seed: int, rounds: int = 2) -> list[StateDict]:
    """Every model permuted into the frame of the Git Re-Basin merge of all of them."""
    spec = spec_for(model)
    target = rebasin_merge(states, weights=weights, model=model, rounds=rounds, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return [apply_permutation(spec, weight_matching(spec, target, s, generator=g), s)
            for s in states]


def least_squares_layer(x_rows: torch.Tensor, y_rows: torch.Tensor, *, prior_w: torch.Tensor,
                        prior_b: torch.Tensor | None, ridge: float
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """min ||X W^T (+ b) - Y||^2 + lam ||[W b] - [W0 b0]||^2 in closed form (float64).

    The ridge pulls towards the averaged weights W0 rather than zero, so directions the inputs
    do not constrain (few rows, rank-deficient features) keep the average, like the reference
    code's gradient descent warm-started from the average.
    """
    x = x_rows.double()
    prior = prior_w.double().reshape(prior_w.shape[0], -1)
    if prior_b is not None:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        prior = torch.cat([prior, prior_b.double().view(-1, 1)], 1)
    g = x.T @ x
    h = x.T @ y_rows.double()
    lam = ridge * float(torch.diagonal(g).mean()) + 1e-12
    sol = torch.linalg.solve(g + lam * torch.eye(len(g), dtype=g.dtype), h + lam * prior.T)
    if prior_b is not None:
        return sol[:-1].T.contiguous(), sol[-1].contiguous()
    return sol.T.contiguous(), None


def pleas_merge(
    states: Sequence[StateDict],
    *,
    weights: Sequence[float],
    model: nn.Module,
    base: StateDict | None = None,
    inputs: torch.Tensor | None = None,
    n_inputs: int = 128,
    input_shape: tuple[int, ...] | None = None,
    ridge: float = 1e-4,
    max_rows: int = 20_000,
    bn: str = "pooled",
    align: bool = True,
    seed: int = 0,
) -> StateDict:
    if bn not in ("pooled", "recalibrate"):
        raise DMMError(f"bn must be 'pooled' or 'recalibrate', got {bn!r}")
    total = float(sum(weights))
    w = [float(x) / total for x in weights]
    aligned = (aligned_states(states, model, weights=w, seed=seed) if align and len(states) > 1
               else list(states))
    merged = average_merge(aligned, weights=w, model=model)
    if inputs is None:
        probe = copy.deepcopy(model)
        probe.load_state_dict(merged)
        inputs = pseudo_inputs(probe, n_inputs, seed=seed, input_shape=input_shape)
    layers = weight_layers(model)
    names = list(layers)
    g = torch.Generator().manual_seed(seed)
    sums: dict[str, list[torch.Tensor]] = {}
    for wk, s in zip(w, aligned, strict=True):
        m = copy.deepcopy(model)
        m.load_state_dict(s)
        m.eval()
        with torch.no_grad(), record_io(m, names) as io:
            m(inputs)
        for n in names:
            x, y = io[n]
            if layers[n].bias is not None:
                y = y - s[f"{n}.bias"].view(1, -1, *([1] * (y.dim() - 2)))
            xr, yr = as_rows(layers[n], x), out_rows(layers[n], y)
            if n not in sums:
                sums[n] = [wk * xr, wk * yr]
            else:
                sums[n][0] += wk * xr
                sums[n][1] += wk * yr
    out = dict(merged)
    for n in names:
        xr, yr = sums[n]
        if len(xr) > max_rows:
            idx = torch.randperm(len(xr), generator=g)[:max_rows]
            xr, yr = xr[idx], yr[idx]
        layer = layers[n]
        has_bias = layer.bias is not None
        if has_bias:  # the bias is part of the map being fitted: put it back into the target
            yr = yr + sum(wk * s[f"{n}.bias"] for wk, s in zip(w, aligned, strict=True))
        wt, b = least_squares_layer(
            xr, yr, prior_w=merged[f"{n}.weight"],
            prior_b=merged[f"{n}.bias"] if has_bias else None, ridge=ridge)
        out[f"{n}.weight"] = wt.reshape(layer.weight.shape).to(merged[f"{n}.weight"].dtype)
        if has_bias:
            out[f"{n}.bias"] = b.to(merged[f"{n}.bias"].dtype)
    if bn == "recalibrate":
        m = copy.deepcopy(model)
        m.load_state_dict(out)
        recalibrate_bn(m, inputs)
        out = {k: v.detach().clone() for k, v in m.state_dict().items()}
    else:
        out = aggregate_bn_buffers(aligned, model, weights=w, into=out)
    return out


def layer_mismatch(states: Sequence[StateDict], merged: StateDict, model: nn.Module,
                   inputs: torch.Tensor, weights: Sequence[float]) -> dict[str, float]:
    """Per layer, mean squared error of the merged layer on the models' average input against
    their average output (the quantity PLeaS minimizes). States must be aligned already."""
    total = float(sum(weights))
    w = [float(x) / total for x in weights]
    layers = weight_layers(model)
    xs: dict[str, torch.Tensor] = {}
    ys: dict[str, torch.Tensor] = {}
    for wk, s in zip(w, states, strict=True):
        m = copy.deepcopy(model)
        m.load_state_dict(s)
        with torch.no_grad(), record_io(m.eval(), list(layers)) as io:
            m(inputs)
        for n, (x, y) in io.items():
            xs[n] = xs.get(n, 0) + wk * x.double()
            ys[n] = ys.get(n, 0) + wk * y.double()
    out = {}
    for n, layer in layers.items():
        lm = copy.deepcopy(layer).double()
        lm.weight.data = merged[f"{n}.weight"].double()
        if layer.bias is not None:
            lm.bias.data = merged[f"{n}.bias"].double()
        with torch.no_grad():
            out[n] = float(((lm(xs[n]) - ys[n]) ** 2).mean())
    return out


register(MergeMethod(
    name="pleas", pretty_name="PLeaS (permutations + least squares)",
    paper="https://arxiv.org/abs/2407.02447",
    bn_handling="permuted, affine averaged, statistics pooled (Eq. 3-4); bn='recalibrate' "
                "recomputes them on the feature inputs",
    fn=pleas_merge))
