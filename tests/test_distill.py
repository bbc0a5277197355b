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


# ---- class-routed targets (FedFTG / FedGen's class-level ensemble) ---------------------------

def test_routing_gives_no_weight_to_a_teacher_without_the_class():
    from dmm.distill import routed_log_targets

    # Prepare: teacher 1 holds no sample of class 2
    g = torch.Generator().manual_seed(3)
    t = torch.randn(3, 12, 4, generator=g) * 3
    y = torch.tensor([2, 0, 1, 2, 3, 2, 0, 1, 3, 2, 1, 0])
    counts = torch.tensor([[5, 0, 9, 1], [7, 3, 0, 0], [0, 4, 2, 0]])
    fallback = torch.randn(12, 4, generator=g)
    # Execute
    log_a, held = routed_log_targets(t, y, counts, fallback, 2.0)
    t2 = t.clone()
    t2[1] = torch.randn(12, 4, generator=g) * 10     # change the teacher without class 2
    log_b, _ = routed_log_targets(t2, y, counts, fallback, 2.0)
    # Assert: class-2 targets do not move; the mixture has the label-count weights; class 3 is
    # held by teacher 0 alone, so its target is that teacher's own log-probabilities
    c2 = y == 2
    assert torch.equal(log_a[c2], log_b[c2]) and not torch.allclose(log_a[~c2], log_b[~c2])
    p = torch.softmax(t / 2.0, 2)
    b = 1  # class 0: weights 5/12 and 7/12
    torch.testing.assert_close(log_a[b].exp(), (5 * p[0, b] + 7 * p[1, b]) / 12)
    c3 = y == 3
    assert torch.equal(log_a[c3], torch.log_softmax(t[0, c3] / 2.0, 1))
    assert held.all()
    # a class no teacher holds falls back to the student
    counts0 = counts.clone()
    counts0[:, 3] = 0
    log_c, held_c = routed_log_targets(t, y, counts0, fallback, 2.0)
    assert torch.equal(held_c, y != 3)
    assert torch.equal(log_c[c3], torch.log_softmax(fallback[c3] / 2.0, 1))


def _routed_cfg(**kw):
    return DistillConfig(steps=6, batch_size=32, lr=1e-3, optimizer="adam", trainable="all",
                         gamma=0.0, eta=0.0, bf16=False, augment=False, ce_weight=0.0,
                         teacher_signal="routed", temperature=4.0, **kw)


def test_k_identical_teachers_give_the_same_routed_refinement_as_one(data, experts):
    # Prepare
    student = trained_model(data, seed=9, steps=2)
    images = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(64) % 4
    t = experts[0]
    # Execute: one teacher holding every class; three copies splitting the counts
    one, _ = distill(copy.deepcopy(student), [t], images, labels, _routed_cfg(),
                     label_counts=torch.tensor([[9, 9, 9, 9]]))
    three, _ = distill(copy.deepcopy(student), [copy.deepcopy(t) for _ in range(3)], images,
                       labels, _routed_cfg(),
                       label_counts=torch.tensor([[3, 1, 5, 9], [3, 4, 2, 0], [3, 4, 2, 0]]))
    # Assert
    x = data.normalize(data.x_test[:32])
    torch.testing.assert_close(three.eval()(x), one.eval()(x), atol=2e-4, rtol=1e-4)
    assert not torch.allclose(one(x), student.eval()(x), atol=1e-3)


def test_a_routed_teacher_identical_to_the_student_leaves_its_outputs_unchanged(data):
    # Prepare
    m = trained_model(data)
    x = data.normalize(data.x_test[:32])
    before = m(x).detach()
    images = torch.randn(64, *SHAPE)
    labels = torch.arange(64) % 4
    # Execute: the teacher holds classes 0-2; class 3 falls back to the (identical) student
    out, rep = distill(m, [copy.deepcopy(m)], images, labels, _routed_cfg(hard_weight=2.0),
                       label_counts=torch.tensor([[4, 4, 4, 0]]))
    # Assert
    torch.testing.assert_close(out.eval()(x), before, atol=1e-5, rtol=0)
    # the teacher counts only for the drawn samples of its classes (3 of 4 classes)
    assert 0.5 < rep.kept_fraction[0] < 0.9


def test_routed_needs_label_counts_of_every_teacher(data, experts):
    images, labels = torch.randn(8, *SHAPE), torch.zeros(8, dtype=torch.long)
    with pytest.raises(DMMError, match="label counts"):
        distill(trained_model(data, steps=1), experts[:2], images, labels, _routed_cfg())
    with pytest.raises(DMMError, match="teachers, classes"):
        distill(trained_model(data, steps=1), experts[:2], images, labels, _routed_cfg(),
                label_counts=torch.ones(3, 4))


def test_cached_teacher_logits_give_the_refinement_of_live_teachers(data, experts):
    # Prepare
    student = trained_model(data, seed=9, steps=2)
    images = torch.randn(48, *SHAPE, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(48) % 4
    counts = torch.tensor([[5, 5, 0, 0], [0, 5, 5, 0], [0, 0, 5, 5], [5, 0, 0, 5]])
    # Execute
    live, _ = distill(copy.deepcopy(student), experts, images, labels, _routed_cfg(),
                      label_counts=counts)
    cached, _ = distill(copy.deepcopy(student), experts, images, labels,
                        _routed_cfg(cache_teachers=True), label_counts=counts)
    # Assert
    x = data.normalize(data.x_test[:32])
    torch.testing.assert_close(cached.eval()(x), live.eval()(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(DMMError, match="augment=False"):
        DistillConfig(cache_teachers=True)


class _Fixed(torch.nn.Module):
    """logits = scale * (sign of the first pixel's class vote) + bias: an oracle of a two-class
    problem (class 1 where pixel 0 > 0), or a constant predictor (scale 0)."""

    def __init__(self, scale: float, bias=(0.0, 0.0)):
        super().__init__()
        self.scale, self.bias = scale, torch.tensor(bias)

    def forward(self, x):
        v = x.flatten(1)[:, :1]
        return self.scale * torch.cat([-v, v], 1) + self.bias


def _two_class_pool(source):
    """16 images of two classes; `source`: "class" (teacher k inverted the class-k images, as a
    one-class client does) or "alternate" (each teacher half of each class)."""
    from dmm.synth import PseudoData

    y = torch.tensor([0, 0, 1, 1] * 4)
    x = torch.where(y == 1, 1.0, -1.0).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    return PseudoData(x, y, y.clone() if source == "class" else torch.tensor([0, 1] * 8))


def test_teacher_check_sees_one_class_experts_teach_nothing_and_shared_knowledge_transfers():
    from dmm.distill import teacher_check

    pool = _two_class_pool("class")
    guess = _Fixed(0.0, (1.0, 0.0))            # the student: class 0 everywhere (50%)
    # one-class experts: teacher k holds class k only and predicts it everywhere; no other
    # teacher holds a sample's class, so the others' ensemble scores nothing
    experts = [_Fixed(0.0, (5.0, 0.0)), _Fixed(0.0, (0.0, 5.0))]
    check = teacher_check(guess, experts, pool, [[10, 0], [0, 10]], bf16=False)
    assert check["others_ensemble_accuracy"] == 0.0 and check["student_accuracy"] == 0.5
    assert not check["transfer"]
    # two oracles holding both classes: each recognizes the other's samples
    oracles = [_Fixed(3.0), _Fixed(3.0)]
    pool = _two_class_pool("alternate")
    check = teacher_check(guess, oracles, pool, [[5, 5], [5, 5]], bf16=False)
    assert check["others_ensemble_accuracy"] == 1.0 and check["transfer"]
    # a student as good as the teachers: nothing to transfer
    assert not teacher_check(_Fixed(3.0), oracles, pool, [[5, 5], [5, 5]],
                             bf16=False)["transfer"]
