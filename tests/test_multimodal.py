"""Image + text DMM: the model, pseudo-pair inversion, federated training and refine, end to end."""

from __future__ import annotations

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
    cfg = InversionConfig(n_images=32, batch_size=32, iterations=40, compile=False)
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
    cfg = preset("default")  # image + text: resolved to the head-only refinement
    cfg.inversion = InversionConfig(n_images=16, batch_size=16, iterations=5, compile=False)
    refined, rep = refine(glob, teachers, cfg, n_samples=res.n_samples,
                          input_shape=data.input_shape, pixel_range=data.pixel_range)
    assert isinstance(rep.pseudo.images, tuple) and rep.timings["distill_s"] > 0
    assert "image + text" in rep.notes[0] and rep.config["inversion"]["n_images"] == 16
    # buffers are the pooled statistics, the fused BN1d included; the image encoder is frozen
    pooled = aggregate_bn_buffers(res.client_states, glob, into=state_of(glob))
    st = state_of(refined)
    assert torch.allclose(st["fusion_bn.running_var"], pooled["fusion_bn.running_var"])
    assert torch.equal(st["image.conv1.weight"], res.global_state["image.conv1.weight"])
    ev = evaluate(refined, data.x_test, data.y_test, data.normalize, num_classes=4)
    assert 0.0 <= ev.accuracy <= 1.0 and len(ev.per_class) == 4
