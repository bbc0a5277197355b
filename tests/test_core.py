"""DMM core: buffer aggregation, divergence, inversion, selective distillation, pipeline."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_dataset, tiny_model
from dmm import DMMConfig, refine
from dmm.bn import aggregate_bn_buffers, pooled_bn_statistics, recalibrate_bn
from dmm.distill import DistillConfig, distill, kd_loss, normalized_entropy, selection_mask
from dmm.divergence import divergence_scores, symmetric_gaussian_kl
from dmm.errors import DMMError
from dmm.federated import TrainConfig, train_local
from dmm.synth import InversionConfig, bn_matching_loss, invert_batch, running_stats

SHAPE = (1, 16, 16)


def trained_model(data, seed=0, steps=30, classes=None):
    """A tiny model trained briefly on `data` (optionally only on some classes)."""
    m = tiny_model(seed)
    x, y = data.x_train, data.y_train
    if classes is not None:
        keep = torch.isin(y, torch.tensor(classes))
        x, y = x[keep], y[keep]
    train_local(m, x, y, data.normalize, TrainConfig(local_iters=steps, batch_size=32,
                                                     lr=0.05, bf16=False),
                generator=torch.Generator().manual_seed(seed))
    return m.eval()


@pytest.fixture(scope="module")
def data():
    return make_dataset(n_train=240, n_test=80)


@pytest.fixture(scope="module")
def experts(data):
    return [trained_model(data, seed=k, classes=[k % 4, (k + 1) % 4]) for k in range(4)]


# ---- buffer aggregation (Eq. 3-4) ---------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_pooled_bn_statistics_of_random_splits_equal_union(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(500, 8, generator=g) * (torch.rand(8, generator=g) * 4) + \
        torch.randn(8, generator=g) * 3
    k = int(torch.randint(2, 7, (1,), generator=g))
    cuts = sorted(torch.randperm(499, generator=g)[: k - 1].add(1).tolist())
    parts = torch.tensor_split(x, cuts)
    mu, var, n = pooled_bn_statistics([p.mean(0) for p in parts],
                                      [p.var(0, unbiased=False) for p in parts],
                                      [len(p) for p in parts])
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
    m = trained_model(data)
    s = m.state_dict()
    out = aggregate_bn_buffers([s, s, s], m, weights=[1, 2, 3])
    for k in s:
        if k.endswith("num_batches_tracked"):
            assert int(out[k]) == 3 * int(s[k])
        else:
            torch.testing.assert_close(out[k], s[k], atol=1e-6, rtol=0)


# ---- divergence ----------------------------------------------------------------------------

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
    a, b = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 4.0])
    assert torch.allclose(symmetric_gaussian_kl(a, b, a, b), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(symmetric_gaussian_kl(a, b, b, a), symmetric_gaussian_kl(b, a, a, b))


# ---- inversion -----------------------------------------------------------------------------

def test_inversion_lowers_bn_matching_loss_tenfold(data):
    m = trained_model(data, steps=40)
    m.zero_grad(set_to_none=True)
    cfg = InversionConfig(iterations=150, lr=0.1, ce_weight=0.0, tv_weight=0.0, jitter=0,
                          flip=False, bf16=False, first_bn_multiplier=1.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(0))
    before = bn_matching_loss(m, x0)
    x, info = invert_batch(m, None, (64, *SHAPE), cfg, generator=g)
    after = bn_matching_loss(m, x)
    assert after < before / 10, (before, after)
    assert all(p.grad is None for p in m.parameters())
    assert all(p.requires_grad for p in m.parameters())


def test_inversion_hooks_are_removed_even_on_error(data):
    m = trained_model(data, steps=1)
    cfg = InversionConfig(iterations=2, bf16=False)
    with pytest.raises(ValueError):
        invert_batch(m, torch.zeros(3, dtype=torch.long), (4, *SHAPE), cfg,
                     generator=torch.Generator())  # 3 labels for 4 images: CE fails
    assert all(not layer._forward_hooks for layer in m.modules())


# ---- selective distillation ------------------------------------------------------------------

def test_selection_keeps_exactly_pairs_meeting_both_thresholds():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 50, 5, generator=g) * 4
    s = torch.randn(50, 5, generator=g) * 2
    mask = selection_mask(t, s, gamma=0.8, eta=0.6)
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
    m = trained_model(data)
    teacher = copy.deepcopy(m)
    x = data.normalize(data.x_test[:32])
    before = m(x).detach()
    images = torch.randn(64, *SHAPE)
    cfg = DistillConfig(steps=5, batch_size=32, lr=1e-2, gamma=0.0, eta=0.0, bf16=False,
                        augment=False)
    out, rep = distill(m, [teacher], images, torch.zeros(64, dtype=torch.long), cfg)
    torch.testing.assert_close(out.eval()(x), before, atol=1e-5, rtol=0)
    assert rep.kept_fraction == [1.0]


def test_distillation_moves_student_toward_teacher(data, experts):
    student = trained_model(data, seed=9, steps=2)
    images = data.normalize(data.x_train[:128])
    cfg = DistillConfig(steps=30, batch_size=64, lr=3e-3, gamma=0.0, eta=0.0, bf16=False)
    t = experts[0]

    def gap(s):
        with torch.no_grad():
            p = torch.log_softmax(s.eval()(images), 1)
            q = torch.softmax(t(images), 1)
            return float((q * (q.log() - p)).sum(1).mean())

    g0 = gap(student)
    out, rep = distill(copy.deepcopy(student), [t], images, torch.zeros(128, dtype=torch.long),
                       cfg)
    assert gap(out) < g0
    assert len(rep.loss_curve) == 30


# ---- pipeline --------------------------------------------------------------------------------

def _fast_config(**kw):
    kw.setdefault("distill", True)
    kw.setdefault("selection", "all")
    return DMMConfig(
        buffer_weights="samples",
        inversion=InversionConfig(n_images=32, batch_size=16, iterations=5, bf16=False),
        distillation=DistillConfig(steps=3, batch_size=16, gamma=0.0, eta=0.0, bf16=False),
        **kw)


@pytest.mark.parametrize("signal", ["softmax", "agree", "experts"])
def test_refine_end_to_end_on_tiny_data(data, experts, signal):
    student = trained_model(data, seed=5, steps=10)
    before = copy.deepcopy(student.state_dict())
    cfg = _fast_config()
    cfg.distillation.teacher_signal = signal
    cfg.inversion.mode = "ensemble"
    model, rep = refine(student, experts, cfg, n_samples=[60] * 4, input_shape=SHAPE)
    assert rep.teachers == [0, 1, 2, 3]
    assert rep.inversion["bn_loss"]["final_mean"] < rep.inversion["bn_loss"]["initial_mean"]
    assert len(rep.distillation["kept_fraction"]) == 4
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    assert model(torch.randn(2, *SHAPE)).shape == (2, 4)


def test_refine_ablation_switches(data, experts):
    student = trained_model(data, seed=5, steps=10)
    off = _fast_config(buffer_aggregation=False, inversion_augmentation=False, distill=False)
    model, rep = refine(student, [e.state_dict() for e in experts], off, input_shape=SHAPE)
    for k, v in student.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    assert rep.inversion == {} and rep.distillation == {}
    buf = _fast_config(inversion_augmentation=False, distill=False)
    model, _ = refine(student, experts, buf, n_samples=[1, 1, 1, 1], input_shape=SHAPE)
    assert torch.equal(model.state_dict()["conv1.weight"], student.state_dict()["conv1.weight"])
    assert not torch.equal(model.state_dict()["bn1.running_var"],
                           student.state_dict()["bn1.running_var"])


def test_refine_rejects_bad_input(data, experts):
    student = trained_model(data, steps=1)
    with pytest.raises(DMMError, match="at least one"):
        refine(student, [], _fast_config())
    bad = copy.deepcopy(experts[0].state_dict())
    bad["conv1.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(DMMError, match="NaN"):
        refine(student, [bad], _fast_config(), n_samples=[1], input_shape=SHAPE)
    no_bn = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 4))
    with pytest.raises(DMMError, match="BatchNorm"):
        refine(no_bn, [no_bn], _fast_config(), input_shape=SHAPE)


def test_running_stats_are_copies(data):
    m = trained_model(data, steps=1)
    st = running_stats(m)
    st["bn1"][0].add_(1)
    assert not torch.equal(st["bn1"][0], m.bn1.running_mean)


def test_merge_and_refine_excludes_divergent_models_from_the_merge(data, experts):
    from dmm.pipeline import merge_and_refine
    s = experts[0].state_dict()
    odd = trained_model(data, seed=11, steps=60, classes=[3])
    models = [s, s, s, odd.state_dict()]
    cfg = _fast_config(exclude_divergent=True, inversion_augmentation=False, distill=False,
                       buffer_aggregation=False, selection="threshold", tau=0.5)
    merged, _ = merge_and_refine(models, cfg, template=experts[0], input_shape=SHAPE)
    # the outlier is excluded from the parameter merge: what remains is model 0 itself
    torch.testing.assert_close(merged.state_dict()["conv1.weight"], s["conv1.weight"])
