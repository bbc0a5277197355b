"""Divergence scores and teacher selection (paper Section 3.3; shared/DESIGN.md step 3a).

For each model k against the merged model M:
- parameter dissimilarity: mean over weight layers (conv / linear, dim >= 2) of the mean over
  output neurons i of 1 - cos(W_k[i], W_M[i]), neurons being flattened output rows;
- statistics heterogeneity: mean over BN layers and channels of the symmetric (Jeffreys) KL
  divergence KL(p||q) + KL(q||p) between N(mu_k, s2_k) and N(mu_M, s2_M);
- d_k = beta * z(param) + (1 - beta) * z(stats), z standardizing across the K models.
Models with d_k > tau are the divergent teachers (`threshold`); `top_k` takes the k largest;
`all` takes every model. The paper gives no value for tau or beta: defaults 0.0 (above the
mean divergence) and 0.5, both options.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dmm.errors import DMMError
from dmm.statedict import KeyKind, StateDict, bn_layers, classify_keys

SELECTIONS = ("threshold", "top_k", "all")
_EPS = 1e-5


def parameter_dissimilarity(state: StateDict, merged: StateDict, weight_keys: Sequence[str]
                            ) -> float:
    """Mean over layers of the mean over output neurons of 1 - cos(W_k[i], W_M[i])."""
    per_layer = []
    for key in weight_keys:
        a = state[key].flatten(1).double()
        b = merged[key].flatten(1).double()
        per_layer.append(float((1 - F.cosine_similarity(a, b, dim=1, eps=1e-12)).mean()))
    return float(sum(per_layer) / len(per_layer)) if per_layer else 0.0


def symmetric_gaussian_kl(mu_p: torch.Tensor, var_p: torch.Tensor, mu_q: torch.Tensor,
                          var_q: torch.Tensor) -> torch.Tensor:
    """KL(p||q) + KL(q||p) for univariate Gaussians, elementwise:
    ((s2_p + d^2) / s2_q + (s2_q + d^2) / s2_p) / 2 - 1, d = mu_p - mu_q."""
    var_p = var_p.double().clamp_min(_EPS)
    var_q = var_q.double().clamp_min(_EPS)
    d2 = (mu_p.double() - mu_q.double()) ** 2
    return 0.5 * ((var_p + d2) / var_q + (var_q + d2) / var_p) - 1.0


def statistics_heterogeneity(state: StateDict, merged: StateDict, bn_names: Sequence[str]
                             ) -> float:
    """Mean over BN layers of the mean over channels of the symmetric Gaussian KL."""
    vals = []
    for name in bn_names:
        p = f"{name}." if name else ""
        kl = symmetric_gaussian_kl(state[p + "running_mean"], state[p + "running_var"],
                                   merged[p + "running_mean"], merged[p + "running_var"])
        vals.append(float(kl.mean()))
    return float(sum(vals) / len(vals)) if vals else 0.0


def zscore(values: Sequence[float]) -> list[float]:
    """Standardize across models; all-equal values give zeros."""
    t = torch.tensor(values, dtype=torch.float64)
    sd = float(t.std(unbiased=False)) if len(t) > 1 else 0.0
    if sd < 1e-12:
        return [0.0] * len(values)
    return ((t - t.mean()) / sd).tolist()


@dataclass
class DivergenceReport:
    param: list[float]
    stats: list[float]
    score: list[float]
    selected: list[int]
    mode: str
    beta: float
    tau: float | None
    top_k: int | None

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self, names: Sequence[str] | None = None) -> str:
        names = list(names) if names is not None else [str(i) for i in range(len(self.score))]
        width = max(8, max(len(n) for n in names))
        lines = [f"{'model':<{width}}  param-dissim  stats-hetero   score  teacher"]
        for i, n in enumerate(names):
            lines.append(f"{n:<{width}}  {self.param[i]:12.4f}  {self.stats[i]:12.4f}  "
                         f"{self.score[i]:6.2f}  {'yes' if i in self.selected else ''}")
        return "\n".join(lines)


def divergence_scores(
    states: Sequence[StateDict],
    merged: StateDict,
    model: nn.Module,
    *,
    beta: float = 0.5,
    mode: str = "threshold",
    tau: float = 0.0,
    top_k: int = 3,
) -> DivergenceReport:
    """Scores of every model against `merged` and the selected divergent teachers.

    `model` is the shared architecture (used only to find conv/linear weights and BN layers
    by module type).
    """
    if mode not in SELECTIONS:
        raise DMMError(f"unknown teacher selection {mode!r}; choose one of {', '.join(SELECTIONS)}")
    if not 0 <= beta <= 1:
        raise DMMError(f"beta must be in [0, 1], got {beta}")
    kinds = classify_keys(model)
    weight_keys = [k for k, v in kinds.items() if v is KeyKind.PARAM and merged[k].dim() >= 2]
    bn_names = list(bn_layers(model))
    param = [parameter_dissimilarity(s, merged, weight_keys) for s in states]
    stats = [statistics_heterogeneity(s, merged, bn_names) for s in states]
    zp, zs = zscore(param), zscore(stats)
    if not bn_names:
        zs = [0.0] * len(states)
    score = [beta * a + (1 - beta) * b for a, b in zip(zp, zs, strict=True)]
    if mode == "all":
        selected = list(range(len(states)))
    elif mode == "top_k":
        if top_k < 1:
            raise DMMError(f"top_k must be >= 1, got {top_k}")
        selected = sorted(sorted(range(len(states)), key=lambda i: -score[i])[:top_k])
    else:
        selected = [i for i, d in enumerate(score) if d > tau]
    return DivergenceReport(param, stats, score, selected, mode, beta,
                            tau if mode == "threshold" else None,
                            top_k if mode == "top_k" else None)
