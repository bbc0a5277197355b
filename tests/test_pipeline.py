"""dmm.pipeline: `refine` and `merge_and_refine` end to end on tiny data."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from conftest import SHAPE, trained_model
from dmm import DMMConfig, refine
from dmm.distill import DistillConfig
from dmm.errors import DMMError
from dmm.synth import InversionConfig


def _fast_config(**kw):
    kw.setdefault("distill", True)
    kw.setdefault("selection", "all")
    return DMMConfig(
        buffer_weights="samples",
        inversion=InversionConfig(n_images=32, batch_size=16, iterations=5, bf16=False),
        distillation=DistillConfig(steps=3, batch_size=16, gamma=0.0, eta=0.0, bf16=False,
                                   optimizer="adam", lr=1e-3, trainable="all"),
        **kw)


@pytest.mark.parametrize("signal", ["softmax", "agree", "experts"])
def test_refine_end_to_end_on_tiny_data(data, experts, signal):
    # Prepare
    student = trained_model(data, seed=5, steps=10)
    before = copy.deepcopy(student.state_dict())
    cfg = _fast_config()
    cfg.distillation.teacher_signal = signal
    cfg.inversion.mode = "ensemble"
    # Execute
    model, rep = refine(student, experts, cfg, n_samples=[60] * 4, input_shape=SHAPE)
    # Assert
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


def test_merge_and_refine_excludes_divergent_models_from_the_merge(data, experts):
    from dmm.pipeline import merge_and_refine
    # Prepare
    s = experts[0].state_dict()
    odd = trained_model(data, seed=11, steps=60, classes=[3])
    models = [s, s, s, odd.state_dict()]
    cfg = _fast_config(exclude_divergent=True, inversion_augmentation=False, distill=False,
                       buffer_aggregation=False, selection="threshold", tau=0.5)
    # Execute
    merged, _ = merge_and_refine(models, cfg, template=experts[0], input_shape=SHAPE)
    # Assert
    # the outlier is excluded from the parameter merge: what remains is model 0 itself
    torch.testing.assert_close(merged.state_dict()["conv1.weight"], s["conv1.weight"])


# ---- DMMConfig owns and checks its settings --------------------------------------------------

@pytest.mark.parametrize("field, value, needle", [
    ("selection", "nope", "unknown teacher selection"),
    ("beta", 1.5, "beta must be in"),
    ("top_k", 0, "top_k must be >= 1"),
    ("tau", "high", "tau must be a finite number"),
    ("tau", float("nan"), "tau must be a finite number"),
    ("distill", 1, "distill must be true or false"),
    ("buffer_weights", "mean", "buffer_weights"),
    ("seed", 1.5, "seed must be an integer"),
])
def test_dmm_config_rejects_a_bad_field_when_made(field, value, needle):
    with pytest.raises(DMMError, match=needle):
        DMMConfig(**{field: value})


def test_preset_goes_through_with_overrides():
    from dmm.pipeline import preset

    # Execute
    cfg = preset("default", seed=3, distillation={"steps": 7}, inversion={"n_images": 64})
    # Assert: nested parts update field by field, a typo is an error, so is a bad value
    assert (cfg.seed, cfg.distillation.steps, cfg.inversion.n_images) == (3, 7, 64)
    assert cfg.distillation.lr == preset("default").distillation.lr
    with pytest.raises(DMMError, match="unknown DMM config keys: distil"):
        preset("default", distil=True)
    with pytest.raises(DMMError, match="unknown distillation setting"):
        preset("default", distillation={"stepz": 1})
    with pytest.raises(DMMError, match="beta"):
        preset("paper", beta=-1)


def test_one_set_of_distillation_defaults_and_one_ce_weight():
    from dataclasses import fields

    from dmm.pipeline import preset

    # Assert: the head-only refinement is DistillConfig's defaults; the CE weight lives there
    assert DMMConfig().distillation == DistillConfig()
    assert preset("head").distillation == DistillConfig()
    assert "ce_weight" not in {f.name for f in fields(DMMConfig)}
    paper = preset("paper").distillation
    assert (paper.optimizer, paper.lr, paper.trainable) == ("adam", 1e-3, "all")


def test_the_ce_weight_of_the_distillation_config_is_the_one_refine_uses(data, experts):
    # Prepare: CE on (inversion augmentation on), KD off, weight 0: nothing may move
    student = trained_model(data, seed=5, steps=10)
    cfg = _fast_config(distill=False, buffer_aggregation=False)
    cfg.distillation.ce_weight = 0.0
    cfg.distillation.grad_clip = None
    # Execute
    out, _ = refine(student, experts, cfg, n_samples=[1] * len(experts), input_shape=SHAPE)
    # Assert
    for k, v in student.state_dict().items():
        assert torch.equal(out.state_dict()[k], v), k
    cfg.distillation.ce_weight = 1.0
    moved, _ = refine(student, experts, cfg, n_samples=[1] * len(experts), input_shape=SHAPE)
    assert any(not torch.equal(moved.state_dict()[k], v)
               for k, v in student.state_dict().items() if v.is_floating_point())


def test_named_presets():
    from dmm.pipeline import PRESETS, preset

    # Assert: every name builds a valid config; head is DMMConfig(), the default before issue
    # 13; default is transfer with the teacher check
    assert set(PRESETS) == {"paper", "default", "head", "transfer"}
    assert preset("head") == DMMConfig()
    t = preset("transfer")
    assert (t.distill, t.selection, t.inversion.teacher_labels, t.distillation.teacher_signal,
            t.distillation.trainable) == (True, "all", "histogram", "routed", "all")
    assert not t.teacher_check and preset("default") == replace(t, teacher_check=True)
    # where the check finds nothing to transfer, the default runs exactly preset "head"
    from dmm.pipeline import head_fallback
    assert head_fallback(preset("default")) == preset("head")
    small = head_fallback(preset("default", seed=3, inversion={"n_images": 32},
                                 distillation={"steps": 5}))
    assert (small.seed, small.inversion.n_images, small.distillation.steps) == (3, 32, 5)
    with pytest.raises(DMMError, match="unknown DMM preset"):
        preset("best")


@pytest.mark.parametrize("transfer,check_images", [(True, None), (False, None), (False, 8)])
def test_the_teacher_check_chooses_whole_network_transfer_or_the_head_only_refinement(
        data, experts, monkeypatch, transfer, check_images):
    import dmm.pipeline as P

    # Prepare: the check's verdict fixed, the default's structure at a tiny budget
    student = trained_model(data, seed=5, steps=10)
    monkeypatch.setattr(P, "teacher_check", lambda *a, **k: {"transfer": transfer})
    cfg = P.preset("default", inversion={"n_images": 32, "batch_size": 16, "iterations": 3,
                                         "bf16": False, "compile": False},
                   distillation={"steps": 3, "batch_size": 16, "bf16": False},
                   check_images=check_images)
    counts = [[30, 30, 0, 0], [0, 30, 30, 0], [0, 0, 30, 30], [30, 0, 0, 30]]
    # Execute
    out, rep = refine(student, experts, cfg, n_samples=[60] * 4, input_shape=SHAPE,
                      label_counts=counts)
    # Assert: the verdict is reported; without transfer only the head moved, and the head-only
    # refinement's config ran (merged-model inversion, no KD)
    assert rep.distillation["teacher_check"]["transfer"] == transfer
    assert rep.config["distill"] == transfer
    assert rep.config["inversion"]["mode"] == ("ensemble" if transfer else "merged")
    assert transfer or "teacher check" in rep.notes[0]
    head = [n for n, m in out.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    moved = {k for k, v in student.state_dict().items() if v.is_floating_point()
             and "running" not in k and not torch.equal(out.state_dict()[k], v)}
    assert moved and (moved <= {f"{head}.weight", f"{head}.bias"}) != transfer


def test_refine_resolves_what_its_inputs_cannot_give():
    from dmm.pipeline import _resolve, preset

    # no label histograms: the teachers' own predictions as targets, said in a note
    cfg, notes = _resolve(preset("default"), None)
    assert cfg.inversion.teacher_labels == "prediction" and "label histograms" in notes[0]
    cfg, notes = _resolve(preset("default"), [[1, 1, 1, 1]])
    assert cfg == preset("default") and notes == []
