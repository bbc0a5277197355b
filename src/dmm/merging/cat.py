"""CAT Merging (Sun et al., ICML 2025, arXiv 2505.06977): training-free conflict trimming of task
vectors tau_k = W_k - W_base before task arithmetic.

- Conv / linear weights (projection): for each protected model k, the removal basis B_k is the
  top-`c` eigenvectors, with positive eigenvalue, of
      M_k = sum_{i != k} T_i (X_k^T X_k - lam X_i^T X_i) T_i^T        (output-channel space)
  where T_i is tau_i reshaped (C_out, C_in*kh*kw) and X_k the layer inputs (im2col rows for a
  conv) of model k on its exemplars. Every other T_j loses its component in span(B_k)
  (T_j <- T_j - B_k B_k^T T_j), then is rescaled to its previous Frobenius norm.
- Normalization scale (masking): per channel d, conflict score for protected k
      s_k[d] = sum_{j != k} mean_n (xhat_k[n,d] T_j[d])^2 - lam_ln mean_n (xhat_j[n,d] T_j[d])^2
  with xhat the normalized, pre-affine BN input; the `ratio_ln` channels of largest positive
  score are zeroed in every other T_j, which is rescaled to its previous norm.
- Shifts and biases (masking, data-free): the `ratio_bias` entries where model k's own shift
  moved most are zeroed in every other T_j.
- Merge: W = W_base + scale * sum_k w_k T~_k with normalized weights (our task-arithmetic
  convention; the paper's alpha * sum_k equals scale = alpha * K with uniform weights).
  BatchNorm running statistics: pooled with Eq. 3-4 (the paper, on ViTs, has none).

Exemplars: the paper uses 1-2 unlabeled training images per task. Data-free here: each model's
exemplars are DeepInversion pseudo-data synthesized from that model's own BN statistics
(`n_exemplars` images), unless `exemplars` (one tensor per model) are given.

Deviations, all deliberate: convolutions are treated as linear maps of their im2col input (the
paper covers ViT linear layers only); features come from model k itself rather than from
base + alpha * tau_k; BN-scale masking and bias masking act only on *conflicting* entries (a
positive score; for biases, a sign opposite to model k's), so identical models are never
trimmed; defaults c = 4, lam = 5, ratio_ln = 4, lam_ln = 10, ratio_bias = 4 follow the
authors' code as reported, not verified against the paper text.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dmm.bn import aggregate_bn_buffers
from dmm.errors import DMMError
from dmm.merging.features import as_rows, pseudo_inputs, record_io, weight_layers
from dmm.merging.registry import MergeMethod, register
from dmm.statedict import StateDict, classify_keys, is_trainable, weighted_average


def _rescale(new: torch.Tensor, old_norm: torch.Tensor) -> torch.Tensor:
    n = new.norm()
    return new * (old_norm / n) if n > 0 else new


def removal_bases(taus: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], *, c: int,
                  lam: float) -> list[torch.Tensor | None]:
    """For every k, B_k (C_out, <= c): the top positive eigenvectors of M_k, or None.

    T_i X_i^T X_i T_i^T / n_i does not depend on k, so it is computed once per model.
    """
    if c <= 0 or len(taus) < 2:
        return [None] * len(taus)
    own = []
    for t, x in zip(taus, xs, strict=True):
        q = t @ x.T              # (C_out, n_i)
        own.append(q @ q.T / len(x))
    bases: list[torch.Tensor | None] = []
    for k in range(len(taus)):
        m = None
        for i, t in enumerate(taus):
            if i == k:
                continue
            p = t @ xs[k].T      # (C_out, n_k)
            term = p @ p.T / len(xs[k]) - lam * own[i]
            m = term if m is None else m + term
        vals, vecs = torch.linalg.eigh(0.5 * (m + m.T))
        order = torch.argsort(vals, descending=True)
        keep = [int(j) for j in order[:c] if vals[j] > 0]
        bases.append(vecs[:, keep] if keep else None)
    return bases


def cat_merge(
    states: Sequence[StateDict],
    *,
    weights: Sequence[float],
    model: nn.Module,
    base: StateDict | None,
    exemplars: Sequence[torch.Tensor] | None = None,
    n_exemplars: int = 8,
    input_shape: tuple[int, ...] | None = None,
    scale: float = 1.0,
    c: int = 4,
    lam: float = 5.0,
    ratio_ln: int = 4,
    lam_ln: float = 10.0,
    ratio_bias: int = 4,
    seed: int = 0,
) -> StateDict:
    if base is None:
        raise DMMError("CAT Merging needs a base model (the common initialization)")
    for name, v in (("c", c), ("ratio_ln", ratio_ln), ("ratio_bias", ratio_bias)):
        if not isinstance(v, int) or v < 0:
            raise DMMError(f"{name} must be a non-negative integer, got {v!r}")
    if exemplars is not None and len(exemplars) != len(states):
        raise DMMError(f"exemplars: {len(exemplars)} sets for {len(states)} models")
    total = float(sum(weights))
    w = [float(x) / total for x in weights]
    kinds = classify_keys(model)
    keys = [k for k, v in kinds.items() if is_trainable(v)]
    taus = [{k: s[k].double() - base[k].double() for k in keys} for s in states]
    K = len(states)

    if K > 1:
        layers = weight_layers(model)
        bns = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
        feats: list[dict[str, torch.Tensor]] = []
        hats: list[dict[str, torch.Tensor]] = []
        for k, s in enumerate(states):
            m = copy.deepcopy(model)
            m.load_state_dict(s)
            m.eval()
            x = exemplars[k] if exemplars is not None else pseudo_inputs(
                m, n_exemplars, seed=seed + k, input_shape=input_shape)
            with torch.no_grad(), record_io(m, list(layers) + list(bns)) as io:
                m(x)
            feats.append({n: as_rows(layers[n], io[n][0]).double() for n in layers})
            hats.append({})
            for n, bn in bns.items():
                xin = io[n][0].double()
                shape = (1, -1) + (1,) * (xin.dim() - 2)
                xh = (xin - bn.running_mean.double().view(shape)) / torch.sqrt(
                    bn.running_var.double().view(shape) + bn.eps)
                hats[k][n] = xh.transpose(0, 1).reshape(xh.shape[1], -1).T  # (rows, C)

        # conv / linear weights: projection
        for n in layers:
            key = f"{n}.weight"
            mats = [t[key].reshape(t[key].shape[0], -1) for t in taus]
            bases = removal_bases(mats, [f[n] for f in feats], c=c, lam=lam)
            for j in range(K):
                t = mats[j]
                for k in range(K):
                    if k == j or bases[k] is None:
                        continue
                    norm = t.norm()
                    t = _rescale(t - bases[k] @ (bases[k].T @ t), norm)
                taus[j][key] = t.reshape(taus[j][key].shape)

        # BN scale: masking of conflicting channels
        for n in bns:
            key = f"{n}.weight"
            if key not in taus[0] or ratio_ln == 0:
                continue
            scores = []
            for k in range(K):
                s = torch.zeros_like(taus[0][key])
                for j in range(K):
                    if j == k:
                        continue
                    s += ((hats[k][n] * taus[j][key]) ** 2).mean(0) - \
                        lam_ln * ((hats[j][n] * taus[j][key]) ** 2).mean(0)
                scores.append(s)
            masked = [taus[j][key].clone() for j in range(K)]
            for k in range(K):
                top = torch.argsort(scores[k], descending=True)[:ratio_ln]
                top = top[scores[k][top] > 0]
                for j in range(K):
                    if j != k and len(top):
                        norm = masked[j].norm()
                        masked[j][top] = 0
                        masked[j] = _rescale(masked[j], norm)
            for j in range(K):
                taus[j][key] = masked[j]

        # shifts and biases: data-free masking of conflicting entries
        bias_keys = [k for k in keys if k.endswith(".bias")]
        for key in bias_keys if ratio_bias > 0 else []:
            masked = [taus[j][key].clone() for j in range(K)]
            for k in range(K):
                own = taus[k][key]
                top = torch.argsort(own.abs().flatten(), descending=True)[:ratio_bias]
                for j in range(K):
                    if j == k:
                        continue
                    flat = masked[j].view(-1)
                    conflict = top[torch.sign(taus[j][key].flatten()[top]) *
                                   torch.sign(own.flatten()[top]) < 0]
                    flat[conflict] = 0
            for j in range(K):
                taus[j][key] = masked[j]

    out = weighted_average(states, w)
    for key in keys:
        merged_tau = sum(wk * t[key] for wk, t in zip(w, taus, strict=True))
        out[key] = (base[key].double() + float(scale) * merged_tau).to(states[0][key].dtype)
    if any(isinstance(m, _BatchNorm) for m in model.modules()):
        out = aggregate_bn_buffers(states, model, weights=w, into=out)
    return out


register(MergeMethod(
    name="cat", pretty_name="CAT Merging (conflict-aware trimming)",
    paper="https://arxiv.org/abs/2505.06977",
    bn_handling="pooled (Eq. 3-4) with the merge weights; BN scale/shift task vectors masked",
    fn=cat_merge, needs_base=True))
