"""dmm.divergence: per-model divergence scores and the symmetric Gaussian KL."""

from __future__ import annotations

import torch

from dmm.divergence import divergence_scores, symmetric_gaussian_kl


def test_divergence_identical_models_score_zero_and_outlier_is_selected(data, experts):
    s = experts[0].state_dict()
    rep = divergence_scores([s, s, s], s, experts[0])
    assert all(abs(v) < 1e-9 for v in rep.param + rep.stats + rep.score)
    states = [s, s, s, experts[1].state_dict()]
    rep = divergence_scores(states, s, experts[0], mode="threshold", tau=0.5)
    assert rep.selected == [3]
    assert divergence_scores(states, s, experts[0], mode="top_k", top_k=2).selected[-1] == 3
    assert divergence_scores(states, s, experts[0], mode="all").selected == [0, 1, 2, 3]


def test_symmetric_kl_is_zero_for_equal_and_symmetric():
    # Prepare
    a, b = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 4.0])
    # Execute / Assert
    assert torch.allclose(symmetric_gaussian_kl(a, b, a, b), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(symmetric_gaussian_kl(a, b, b, a), symmetric_gaussian_kl(b, a, a, b))
