"""DMM between rounds (dmm.inloop): the pool, the guard, post-hoc as the limit, the command."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_dataset, run_cli, write_npz
from dmm.data import PartitionConfig
from dmm.errors import DMMError
from dmm.federated import FederatedConfig, TrainConfig, run_federated
from dmm.inloop import LoopConfig, LoopRefiner
from dmm.models import create
from dmm.pipeline import preset, refine

ARCH = {"width": 0.25, "num_classes": 4, "in_channels": 1}
TINY = {"inversion": {"n_images": 16, "batch_size": 8, "iterations": 2, "bf16": False,
                      "compile": False},
        "distillation": {"steps": 2, "batch_size": 8, "bf16": False}}


def _setup(rounds=3):
    data = make_dataset(n_train=120, n_test=20)
    part = PartitionConfig(alpha=0.5, clients=3, min_size=5, seed=0).split(data)
    fed = FederatedConfig(rounds=rounds, seed=0, train=TrainConfig(local_iters=2, batch_size=16,
                                                                   bf16=False))
    counts = {k: c.tolist() for k, c in enumerate(part.counts)}
    return data, part, fed, counts


def _refiner(data, counts, rounds, **loop):
    return LoopRefiner(preset("default", **TINY), LoopConfig(**loop), create("resnet8", **ARCH),
                       rounds=rounds, input_shape=data.input_shape, pixel_range=data.pixel_range,
                       label_counts=counts)


class _Sizes:
    """The refiner, recording the pool's size after each refinement."""

    def __init__(self, ref):
        self.ref, self.sizes = ref, []

    def due(self, r):
        return self.ref.due(r)

    @property
    def reports(self):
        return self.ref.reports

    def __call__(self, *a):
        out = self.ref(*a)
        self.sizes.append(len(self.ref.pool.labels))
        return out


def test_the_pool_never_grows_past_its_size_and_every_refinement_is_reported():
    data, part, fed, counts = _setup(rounds=4)
    spy = _Sizes(_refiner(data, counts, 4, every=1, pool=20, refresh=8, steps=2))
    # Execute
    res = run_federated(lambda: create("resnet8", **ARCH), data, part, fed, progress=False,
                        server_step=spy)
    # Assert: 16 first + 8 fresh per refinement, the oldest dropped beyond 20
    assert spy.sizes == [20, 20, 20, 20]
    assert len(spy.reports) == 4 and all("guard_after" in r for r in spy.reports)
    assert [r["first"] for r in spy.reports] == [True, False, False, False]
    assert [r["server_step"]["round"] for r in res.history] == [1, 2, 3, 4]


def test_every_beyond_the_rounds_without_the_guard_is_the_post_hoc_refinement():
    data, part, fed, counts = _setup(rounds=2)
    ref = _refiner(data, counts, 2, every=100, guard=False)
    # Execute: in the loop (only the last round refines) and post hoc
    loop = run_federated(lambda: create("resnet8", **ARCH), data, part, fed, progress=False,
                         server_step=ref)
    plain = run_federated(lambda: create("resnet8", **ARCH), data, part, fed, progress=False)
    t = create("resnet8", **ARCH)
    teachers = []
    for s in plain.client_states:
        m = create("resnet8", **ARCH)
        m.load_state_dict(s)
        teachers.append(m.eval())
    t.load_state_dict(plain.global_state)
    post, _ = refine(t.eval(), teachers, preset("default", **TINY), n_samples=plain.n_samples,
                     input_shape=data.input_shape, pixel_range=data.pixel_range,
                     label_counts=[counts[k] for k in range(3)])
    # Assert: one refinement, and bit for bit the post-hoc one
    assert len(ref.reports) == 1 and ref.reports[0]["round"] == 2
    for k, v in post.state_dict().items():
        assert torch.equal(loop.global_state[k], v), k


def test_a_refinement_the_guard_rejects_is_not_sent_on(monkeypatch):
    import dmm.inloop as L

    data, part, fed, counts = _setup(rounds=2)
    monkeypatch.setattr(L, "routed_agreement",
                        lambda model, *a: 0.5 if getattr(model, "_refined", False) else 0.6)
    real = L.refine

    def marked(*a, **k):
        m, rep = real(*a, **k)
        m._refined = True
        return m, rep
    monkeypatch.setattr(L, "refine", marked)
    ref = _refiner(data, counts, 2, every=1, refresh=8)
    loop = run_federated(lambda: create("resnet8", **ARCH), data, part, fed, progress=False,
                         server_step=ref)
    plain = run_federated(lambda: create("resnet8", **ARCH), data, part, fed, progress=False)
    # Assert: the guard fired twice, so the loop is plain FedAvg
    assert [r["kept"] for r in ref.reports] == [False, False]
    for k, v in plain.global_state.items():
        assert torch.equal(loop.global_state[k], v), k


def test_dmm_every_on_the_command_line_and_its_refusals(tmp_path):
    npz = write_npz(tmp_path / "d.npz")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    common = ["train", "--dataset", "npz", "--data-root", npz, "--arch", "resnet8",
              "--clients", "3", "--alpha", "0.5", "--min-size", "5", "--rounds", "2",
              "--local-iters", "2", "--batch-size", "16", "--no-eval"]
    r = run_cli(*common, "--dmm-every", "1", "--dmm-config", tmp_path / "tiny.json",
                "--dmm-refresh", "8", "--dmm-pool", "24", "--dmm-steps", "2",
                "--out", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    loop = json.loads((tmp_path / "run" / "train.json").read_text())["dmm_in_loop"]
    assert loop["every"] == 1 and [x["round"] for x in loop["reports"]] == [1, 2]
    assert "DMM between rounds: 2 refinements" in r.stdout
    r = run_cli(*common, "--regime", "oneshot", "--dmm-every", "1", "--out", tmp_path / "x",
                cwd=tmp_path)
    assert r.returncode == 2 and "needs a global model" in r.stderr
    assert not (tmp_path / "x").exists()
    with pytest.raises(DMMError, match="pool must be >= 1"):
        LoopConfig(pool=0)
