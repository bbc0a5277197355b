"""dmm.bn: pooled BatchNorm statistics and buffer aggregation (paper Eq. 3-4)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import trained_model
from dmm.bn import aggregate_bn_buffers, pooled_bn_statistics, recalibrate_bn


@pytest.mark.parametrize("seed", range(5))
def test_pooled_bn_statistics_of_random_splits_equal_union(seed):
    # Prepare
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(500, 8, generator=g) * (torch.rand(8, generator=g) * 4) + \
        torch.randn(8, generator=g) * 3
    k = int(torch.randint(2, 7, (1,), generator=g))
    cuts = sorted(torch.randperm(499, generator=g)[: k - 1].add(1).tolist())
    # the random cuts, and a fixed split with a one-row part, which random cuts almost never
    # produce (merged from the former duplicate in test_federated.py)
    for split in (cuts, [37, 400, 401]):  # the fixed one: sizes 37, 363, 1, 99
        parts = torch.tensor_split(x, split)
        # Execute
        mu, var, n = pooled_bn_statistics([p.mean(0) for p in parts],
                                          [p.var(0, unbiased=False) for p in parts],
                                          [len(p) for p in parts])
        # Assert
        torch.testing.assert_close(mu, x.mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(var, x.var(0, unbiased=False), atol=1e-5, rtol=0)
        assert n == 500


def test_buffer_aggregation_of_models_equals_stats_of_union(data):
    """Per-client BN statistics measured on their own data pool to the union's statistics."""
    m = trained_model(data)
    xs = data.normalize(data.x_train[:120])
    hw = 16 * 16  # bn1 sees the stem's full-resolution output

    def exact_stats(x):  # one batch, momentum None: the batch statistics themselves
        c = recalibrate_bn(copy.deepcopy(m), x, batch_size=len(x))
        st = c.state_dict()
        n_el = len(x) * hw  # running_var is unbiased; the pooling identity is for population
        st["bn1.running_var"] = st["bn1.running_var"] * (n_el - 1) / n_el
        return st

    parts = [xs[:20], xs[20:70], xs[70:]]
    pooled = aggregate_bn_buffers([exact_stats(p) for p in parts], m,
                                  weights=[len(p) for p in parts])
    whole = exact_stats(xs)
    for key in ("bn1.running_mean", "bn1.running_var"):
        torch.testing.assert_close(pooled[key], whole[key], atol=1e-5, rtol=1e-5)


def test_aggregating_identical_models_is_identity(data):
    # Prepare
    m = trained_model(data)
    s = m.state_dict()
    # Execute
    out = aggregate_bn_buffers([s, s, s], m, weights=[1, 2, 3])
    # Assert
    for k in s:
        if k.endswith("num_batches_tracked"):
            assert int(out[k]) == 3 * int(s[k])
        else:
            torch.testing.assert_close(out[k], s[k], atol=1e-6, rtol=0)
