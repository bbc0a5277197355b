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


# ---- domain inversion: each teacher against its own statistics ------------------------------

def test_histogram_labels_follow_the_counts_and_skip_empty_classes():
    from dmm.synth.inversion import histogram_labels

    y = histogram_labels(10, [0, 3, 0, 1], torch.Generator().manual_seed(0))
    assert torch.bincount(y, minlength=4).tolist() == [0, 8, 0, 2]   # 7.5 + 2.5, remainders
    assert torch.bincount(histogram_labels(7, [0, 0, 5, 0], torch.Generator()),
                          minlength=4).tolist() == [0, 0, 7, 0]


def test_own_statistics_inversion_matches_a_teacher_better_than_the_merged_statistics(data):
    from dmm.merging import merge_states
    from dmm.synth import synthesize

    # Prepare: two teachers of different domains (classes 0-1, classes 2-3), their average
    a = trained_model(data, seed=1, steps=40, classes=[0, 1])
    b = trained_model(data, seed=2, steps=40, classes=[2, 3])
    merged = trained_model(data, steps=1)
    merged.load_state_dict(merge_states([a.state_dict(), b.state_dict()], "average",
                                        model=merged))
    cfg = dict(n_images=32, batch_size=32, iterations=60, bf16=False, ce_weight=0.0)
    # Execute
    own = synthesize(merged, [a, b], InversionConfig(mode="ensemble", merged_share=0.0, **cfg),
                     num_classes=4, input_shape=SHAPE, seed=0)
    pooled = synthesize(merged, None, InversionConfig(mode="merged", **cfg), num_classes=4,
                        input_shape=SHAPE, seed=0)
    # Assert: a's share of the own-statistics pool matches a's statistics more closely
    x_own = own.images[own.source == 0]
    assert bn_matching_loss(a, x_own) < bn_matching_loss(a, pooled.images[:len(x_own)])


def test_histogram_targets_ask_each_teacher_only_for_its_classes(data):
    from dmm.errors import DMMError
    from dmm.synth import synthesize

    # Prepare
    a = trained_model(data, seed=1, steps=5, classes=[0, 1])
    b = trained_model(data, seed=2, steps=5, classes=[3])
    cfg = InversionConfig(mode="ensemble", merged_share=0.25, teacher_labels="histogram",
                          n_images=40, batch_size=20, iterations=2, bf16=False)
    # Execute
    out = synthesize(a, [a, b], cfg, num_classes=4, input_shape=SHAPE, seed=0,
                     label_counts=[[30, 10, 0, 0], [0, 0, 0, 50]])
    # Assert: the merged share stays class-balanced; each teacher's share holds its classes
    assert set(out.labels[out.source == 0].tolist()) == {0, 1}
    assert set(out.labels[out.source == 1].tolist()) == {3}
    assert set(out.labels[out.source == -1].tolist()) == {0, 1, 2, 3}
    with pytest.raises(DMMError, match="label histogram"):
        synthesize(a, [a, b], cfg, num_classes=4, input_shape=SHAPE, seed=0)
