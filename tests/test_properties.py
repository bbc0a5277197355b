"""Property tests (hypothesis): the Dirichlet partitioner and the pooled BN statistics."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmm.bn import pooled_bn_statistics
from dmm.data.partition import dirichlet_partition
from dmm.errors import DMMError


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 300), classes=st.integers(1, 8), k=st.integers(1, 6),
       alpha=st.floats(0.005, 100.0), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_partition_is_a_seeded_disjoint_cover_with_exact_counts(n, classes, k, alpha, seed,
                                                                 data):
    labels = np.random.default_rng(seed).integers(0, classes, n)
    min_size = data.draw(st.integers(0, 20))
    try:
        p = dirichlet_partition(labels, k, alpha, seed=seed, min_size=min_size,
                                num_classes=classes, max_draws=50)
    except DMMError as e:  # infeasible or unlucky: a clear error, never a bad partition
        assert "samples" in str(e)
        return
    together = np.concatenate(p.indices)
    assert np.array_equal(np.sort(together), np.arange(n))          # every sample exactly once
    assert len(p.indices) == k and min(p.sizes) >= min_size
    for idx, row in zip(p.indices, p.counts, strict=True):
        assert np.array_equal(row, np.bincount(labels[idx], minlength=classes))
    again = dirichlet_partition(labels, k, alpha, seed=seed, min_size=min_size,
                                num_classes=classes, max_draws=50)
    assert all(np.array_equal(a, b) for a, b in zip(p.indices, again.indices, strict=True))


@settings(max_examples=80, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6), c=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3), shift=st.floats(-1e3, 1e3))
def test_pooled_statistics_are_the_statistics_of_the_union(sizes, c, seed, scale, shift):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, c, generator=g, dtype=torch.float64) * scale + shift
             + torch.randn(1, c, generator=g, dtype=torch.float64) * scale for n in sizes]
    means = [p.mean(0) for p in parts]
    variances = [p.var(0, unbiased=False) for p in parts]
    mu, s2, count = pooled_bn_statistics(means, variances, sizes)
    union = torch.cat(parts)
    tol = 1e-9 * (scale + abs(shift)) ** 2 + 1e-12
    assert torch.allclose(mu, union.mean(0), rtol=1e-9, atol=tol)
    assert torch.allclose(s2, union.var(0, unbiased=False), rtol=1e-7, atol=tol)
    assert count == sum(sizes)
    # the weights only matter through their ratios
    mu2, s22, _ = pooled_bn_statistics(means, variances, [3.5 * n for n in sizes])
    assert torch.allclose(mu, mu2, rtol=1e-12, atol=tol) and torch.allclose(s2, s22, rtol=1e-9,
                                                                             atol=tol)
