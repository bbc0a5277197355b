"""dmm.distill: selective distillation (selection mask, KD loss, the distillation loop)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import SHAPE, trained_model
from dmm.distill import DistillConfig, distill, kd_loss, normalized_entropy, selection_mask
from dmm.errors import DMMError


def test_selection_keeps_exactly_pairs_meeting_both_thresholds():
    # Prepare
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 50, 5, generator=g) * 4
    s = torch.randn(50, 5, generator=g) * 2
    # Execute
    mask = selection_mask(t, s, gamma=0.8, eta=0.6)
    # Assert
    conf = torch.softmax(t, 2).amax(2)
    ent = normalized_entropy(s)
    for j in range(3):
        for b in range(50):
            assert bool(mask[j, b]) == bool(conf[j, b] >= 0.8 and ent[b] >= 0.6)
    assert 0 < mask.sum() < mask.numel()


def test_kd_loss_is_zero_for_identical_and_ignores_dropped_pairs():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(8, 4, generator=g)
    assert float(kd_loss(s.unsqueeze(0), s, torch.ones(1, 8, dtype=torch.bool), 2.0)) < 1e-6
    t = torch.randn(1, 8, 4, generator=g)
    assert float(kd_loss(t, s, torch.zeros(1, 8, dtype=torch.bool), 2.0)) == 0.0


def test_distilling_from_identical_teacher_leaves_outputs_unchanged(data):
    # Prepare
    m = trained_model(data)
    teacher = copy.deepcopy(m)
    x = data.normalize(data.x_test[:32])
    before = m(x).detach()
    images = torch.randn(64, *SHAPE)
    cfg = DistillConfig(steps=5, batch_size=32, lr=1e-2, gamma=0.0, eta=0.0, bf16=False,
                        augment=False, optimizer="adam", trainable="all", ce_weight=0.0)
    # Execute
    out, rep = distill(m, [teacher], images, torch.zeros(64, dtype=torch.long), cfg)
    # Assert
    torch.testing.assert_close(out.eval()(x), before, atol=1e-5, rtol=0)
    assert rep.kept_fraction == [1.0]


def test_distillation_moves_student_toward_teacher(data, experts):
    # Prepare
    student = trained_model(data, seed=9, steps=2)
    images = data.normalize(data.x_train[:128])
    cfg = DistillConfig(steps=30, batch_size=64, lr=3e-3, gamma=0.0, eta=0.0, bf16=False,
                        optimizer="adam", trainable="all", ce_weight=0.0)
    t = experts[0]

    def gap(s):
        with torch.no_grad():
            p = torch.log_softmax(s.eval()(images), 1)
            q = torch.softmax(t(images), 1)
            return float((q * (q.log() - p)).sum(1).mean())

    g0 = gap(student)
    # Execute
    out, rep = distill(copy.deepcopy(student), [t], images, torch.zeros(128, dtype=torch.long),
                       cfg)
    # Assert
    assert gap(out) < g0
    assert len(rep.loss_curve) == 30


@pytest.mark.parametrize("field, value, needle", [
    ("optimizer", "rmsprop", "optimizer must be"), ("lr", 0, "lr must be > 0"),
    ("steps", 2.5, "steps must be an integer"), ("ce_weight", -1, "ce_weight must be >= 0"),
    ("grad_clip", 0, "grad_clip"), ("teacher_signal", "vote", "unknown teacher signal"),
])
def test_distill_config_rejects_a_bad_field_when_made(field, value, needle):
    with pytest.raises(DMMError, match=needle):
        DistillConfig(**{field: value})
