"""Image + text DMM: the model, pseudo-pair inversion, federated training and refine, end to end."""

from __future__ import annotations

from dataclasses import replace

import torch

from conftest import make_dataset
from dmm.bn import aggregate_bn_buffers
from dmm.data import dirichlet_partition
from dmm.evaluate import evaluate
from dmm.federated import FederatedConfig, TrainConfig, run_federated
from dmm.models import create
from dmm.multimodal.data import FeaturePairDataset
from dmm.multimodal.synth import synthesize_pairs
from dmm.pipeline import preset, refine
from dmm.statedict import bn_layers, state_of
from dmm.synth import InversionConfig

TEXT_DIM = 12


def tiny_pairs(seed: int = 0) -> FeaturePairDataset:
    """Images from the blob data set, text features = a class direction plus noise."""
    d = make_dataset(n_train=160, n_test=80, classes=4, size=16, channels=3, seed=seed)
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(4, TEXT_DIM, generator=g), dim=1)

    def feats(y):
        f = centers[y] + 0.3 * torch.randn(len(y), TEXT_DIM, generator=g)
        return torch.nn.functional.normalize(f, dim=1)

    return FeaturePairDataset("pairs", (d.x_train, feats(d.y_train)), d.y_train,
                              (d.x_test, feats(d.y_test)), d.y_test, d.classes, d.mean, d.std)


def mm_model(seed=0):
    torch.manual_seed(seed)
    return create("image_text", num_classes=4, in_channels=3, width=0.25, image_arch="resnet8",
                  text_dim=TEXT_DIM)


def test_model_takes_pairs_and_has_a_fused_batchnorm():
    m = mm_model().eval()
    out = m(torch.zeros(3, 3, 16, 16), torch.zeros(3, TEXT_DIM))
    assert out.shape == (3, 4)
    assert "fusion_bn" in bn_layers(m) and m.fusion_bn.num_features == m.image_dim + TEXT_DIM


def test_pair_inversion_matches_the_fused_statistics():
    data = tiny_pairs()
    m = mm_model()
    # running statistics = exact statistics of the real pairs, so a good inversion gets close
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    with torch.no_grad():
        m(data.normalize(data.x_train[0]), data.x_train[1])
    m.eval()
    cfg = InversionConfig(n_images=32, batch_size=32, iterations=40, compile=False, text="free")
    pseudo = synthesize_pairs(m, None, cfg, num_classes=4, input_shape=(3, 16, 16),
                              pixel_range=data.pixel_range)
    x, t = pseudo.images
    assert x.shape == (32, 3, 16, 16) and t.shape == (32, TEXT_DIM)
    assert torch.allclose(t.norm(dim=1), torch.ones(32), atol=1e-5)   # on the unit sphere
    b = pseudo.info["batches"][0]
    assert b["bn_final"] < b["bn_initial"] / 5
    lo, hi = data.pixel_range
    assert x.min() >= lo - 1e-6 and x.max() <= hi + 1e-6
    assert sorted(pseudo.labels.tolist()) == sorted([0, 1, 2, 3] * 8)   # class-balanced


def test_drawn_text_features_have_each_sources_fused_statistics():
    """Each client's share of the pairs carries text features drawn from that client's fused
    BatchNorm1d statistics over the text dimensions: their per-dimension mean and variance
    match the stored ones within sampling error, and the inversion does not move them."""
    # Prepare: two clients with different (known) text statistics, one merged model
    g = torch.Generator().manual_seed(5)
    models, stats = [], []
    for k in range(3):
        m = mm_model(k).eval()
        d = m.image_dim
        mu, var = torch.randn(TEXT_DIM, generator=g) * 0.3, torch.rand(TEXT_DIM, generator=g) + .05
        m.fusion_bn.running_mean[d:] = mu
        m.fusion_bn.running_var[d:] = var
        models.append(m)
        stats.append((mu, var))
    merged, teachers = models[0], models[1:]
    n = 600
    cfg = InversionConfig(n_images=n, batch_size=300, iterations=2, compile=False,
                          mode="ensemble", merged_share=1 / 3, teacher_labels="histogram")
    # Execute
    pseudo = synthesize_pairs(merged, teachers, cfg, num_classes=4, input_shape=(3, 16, 16),
                              label_counts=[[5, 0, 0, 1], [0, 3, 3, 0]])
    # Assert: per source, mean within 5 standard errors, variance within 30%
    x, t = pseudo.images
    for source, (mu, var) in zip([-1, 0, 1], stats, strict=True):
        own = t[pseudo.source == source]
        assert len(own) == n // 3
        se = (var / len(own)).sqrt()
        assert ((own.mean(0) - mu).abs() < 5 * se).all()
        assert ((own.var(0) / var - 1).abs() < 0.3).all()
    # the teachers' targets come from their histograms; the merged model's are balanced
    assert set(pseudo.labels[pseudo.source == 0].tolist()) <= {0, 3}
    assert set(pseudo.labels[pseudo.source == 1].tolist()) <= {1, 2}
    assert set(pseudo.labels[pseudo.source == -1].tolist()) == {0, 1, 2, 3}
    assert {"ce", "accuracy"} <= set(pseudo.info["merged_pairs"])


def test_multimodal_refine_runs_end_to_end():
    data = tiny_pairs()
    part = dirichlet_partition(data.y_train.numpy(), 3, 0.1, seed=0, num_classes=4)
    res = run_federated(mm_model, data, part, FederatedConfig(
        rounds=2, train=TrainConfig(local_iters=5, batch_size=32)), progress=False)
    glob = mm_model()
    glob.load_state_dict(res.global_state)
    teachers = []
    for s in res.client_states:
        t = mm_model()
        t.load_state_dict(s)
        teachers.append(t.eval())
    counts = part.counts.tolist()
    # the head-only refinement: buffers pooled, the image encoder frozen
    head = preset("head", inversion={"n_images": 16, "batch_size": 16, "iterations": 5,
                                     "compile": False})
    refined, rep = refine(glob, teachers, head, n_samples=res.n_samples,
                          input_shape=data.input_shape, pixel_range=data.pixel_range)
    assert isinstance(rep.pseudo.images, tuple) and rep.timings["distill_s"] > 0
    assert not rep.notes and rep.config["inversion"]["n_images"] == 16
    pooled = aggregate_bn_buffers(res.client_states, glob, into=state_of(glob))
    st = state_of(refined)
    assert torch.allclose(st["fusion_bn.running_var"], pooled["fusion_bn.running_var"])
    assert torch.equal(st["image.conv1.weight"], res.global_state["image.conv1.weight"])
    # the default: each client's own pairs, no teacher check for pairs, routed KD
    cfg = preset("default", inversion={"n_images": 24, "batch_size": 8, "iterations": 5,
                                       "compile": False}, distillation={"steps": 5})
    refined, rep = refine(glob, teachers, cfg, n_samples=res.n_samples, label_counts=counts,
                          input_shape=data.input_shape, pixel_range=data.pixel_range)
    assert "teacher_check" not in rep.distillation and "check_pairs false" in rep.notes[0]
    assert sorted(set(rep.pseudo.source.tolist())) == [0, 1, 2] and rep.teachers
    assert rep.config["distillation"]["trainable"] == "all" and "merged_pairs" in rep.inversion
    assert not torch.equal(state_of(refined)["image.conv1.weight"],
                           res.global_state["image.conv1.weight"])
    # check_pairs: the check judges the pairs, then routed KD or the head
    refined, rep = refine(glob, teachers, replace(cfg, check_pairs=True),
                          n_samples=res.n_samples, label_counts=counts,
                          input_shape=data.input_shape, pixel_range=data.pixel_range)
    check = rep.distillation["teacher_check"]
    assert {"student_accuracy", "others_ensemble_accuracy"} <= set(check)
    assert "merged_pairs" in rep.inversion
    if check["transfer"]:  # whole-network routed KD on the clients' own pairs
        assert sorted(set(rep.pseudo.source.tolist())) == [0, 1, 2]
        assert rep.config["distillation"]["trainable"] == "all"
        assert not torch.equal(state_of(refined)["image.conv1.weight"],
                               res.global_state["image.conv1.weight"])
    else:
        assert "teacher check" in rep.notes[-1] and rep.teachers == []
    ev = evaluate(refined, data.x_test, data.y_test, data.normalize, num_classes=4)
    assert 0.0 <= ev.accuracy <= 1.0 and len(ev.per_class) == 4
