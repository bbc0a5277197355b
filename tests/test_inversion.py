"""dmm.synth (inversion.py, hooks.py): BN-statistics inversion and its forward hooks."""

from __future__ import annotations

import pytest
import torch

from conftest import SHAPE, trained_model
from dmm.synth import InversionConfig, bn_matching_loss, invert_batch, running_stats


def test_inversion_lowers_bn_matching_loss_tenfold(data):
    # Prepare
    m = trained_model(data, steps=40)
    m.zero_grad(set_to_none=True)
    cfg = InversionConfig(iterations=150, lr=0.1, ce_weight=0.0, tv_weight=0.0, jitter=0,
                          flip=False, bf16=False, first_bn_multiplier=1.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(0))
    before = bn_matching_loss(m, x0)
    # Execute
    x, info = invert_batch(m, None, (64, *SHAPE), cfg, generator=g)
    after = bn_matching_loss(m, x)
    # Assert
    assert after < before / 10, (before, after)
    assert all(p.grad is None for p in m.parameters())
    assert all(p.requires_grad for p in m.parameters())


def test_inversion_hooks_are_removed_even_on_error(data):
    # Prepare
    m = trained_model(data, steps=1)
    cfg = InversionConfig(iterations=2, bf16=False)
    # Execute
    with pytest.raises(ValueError):
        invert_batch(m, torch.zeros(3, dtype=torch.long), (4, *SHAPE), cfg,
                     generator=torch.Generator())  # 3 labels for 4 images: CE fails
    # Assert
    assert all(not layer._forward_hooks for layer in m.modules())


def test_running_stats_are_copies(data):
    # Prepare
    m = trained_model(data, steps=1)
    # Execute
    st = running_stats(m)
    st["bn1"][0].add_(1)
    # Assert
    assert not torch.equal(st["bn1"][0], m.bn1.running_mean)
