"""Flower engine: the strategy and client handlers over an in-memory grid (fast, no Ray), and a
real 2-client, 1-round simulation in Flower's engine that must match the in-process engine."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from conftest import run_cli, tiny_model, write_npz
from dmm import checkpoint
from dmm.bn import aggregate_bn_buffers
from dmm.data import PartitionConfig, dirichlet_partition
from dmm.data.base import load_dataset
from dmm.federated import FederatedConfig, TrainConfig, run_federated
from dmm.flower.client import (
    ClientTask,
    handle_query,
    handle_train,
    task_from_run_config,
)
from dmm.flower.server import server_main
from dmm.flower.strategy import DMMFedAvg
from dmm.models import create
from dmm.pipeline import preset, with_overrides
from dmm.statedict import weighted_average

ARCH = {"width": 0.25, "num_classes": 4, "in_channels": 1}
TINY_DMM = {"inversion": {"n_images": 16, "batch_size": 8, "iterations": 2, "bf16": False,
                          "compile": False},
            "distillation": {"steps": 2, "batch_size": 8}}


class MemoryGrid:
    """A Flower Grid whose nodes are ClientApp handlers called in this process."""

    def __init__(self, task: ClientTask):
        self.task = task
        self.node_ids = [1000 + 7 * i for i in range(task.clients)]  # not 0..K-1 on purpose
        # the partition ids are handed out in a shuffled order, as a SuperLink may
        order = torch.randperm(task.clients, generator=torch.Generator().manual_seed(3))
        self.contexts = {
            n: Context(run_id=1, node_id=n, state=RecordDict(), run_config={},
                       node_config={"partition-id": int(order[i]),
                                    "num-partitions": task.clients})
            for i, n in enumerate(self.node_ids)}
        self.sent: list[int] = []

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            ctx = self.contexts[m.metadata.dst_node_id]
            if m.metadata.message_type == MessageType.QUERY:
                replies.append(handle_query(m, ctx))
            else:
                self.sent.append(int(ctx.node_config["partition-id"]))
                replies.append(handle_train(self.task, m, ctx))
        return replies


@pytest.fixture
def identity(monkeypatch):
    """Messages need the identity Flower sets in its own processes."""
    for k, v in {"_run_id": 1, "_node_id": 0, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, k, v)


def _task(npz, regime="fedavg", clients=3, rounds=2, participation=1.0, **extra):
    fed = FederatedConfig(regime=regime, rounds=rounds, participation=participation, seed=0,
                          train=TrainConfig(local_iters=2, batch_size=16, bf16=False,
                                            prox_mu=0.01 if regime == "fedprox" else 0.0))
    part = PartitionConfig(alpha=0.5, clients=clients, min_size=5, seed=0)
    return ClientTask(dataset="npz", arch="resnet8", arch_kwargs=ARCH, federated=fed.to_dict(),
                      partition=part.to_dict(), data_root=str(npz), **extra)


def _inprocess(task: ClientTask):
    data = load_dataset("npz", task.data_root)
    p = task.partition
    part = dirichlet_partition(data.y_train.numpy(), p["clients"], p["alpha"], seed=0,
                               min_size=p["min_size"], num_classes=data.num_classes)
    return run_federated(lambda: create("resnet8", **ARCH), data, part,
                         FederatedConfig.from_dict(task.federated), progress=False)


def _run_memory(task: ClientTask, **kw):
    torch.manual_seed(0)
    template = create("resnet8", **ARCH)
    cfg = FederatedConfig.from_dict(task.federated)
    strategy = DMMFedAvg(template, regime=cfg.regime, seed=0, fraction_train=cfg.participation,
                         min_available_nodes=task.clients, **kw)
    grid = MemoryGrid(task)
    result = strategy.start(grid, ArrayRecord(template.state_dict()), num_rounds=cfg.rounds)
    return strategy, grid, result


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("regime,participation", [("fedavg", 1.0), ("fedprox", 1.0),
                                                  ("fedbn", 1.0), ("fedavg", 0.5)])
def test_strategy_and_client_reproduce_the_inprocess_engine(tmp_path, identity, regime,
                                                            participation):
    """Same seed, same clients, same arithmetic: bitwise equal to run_federated."""
    task = _task(write_npz(tmp_path / "d.npz"), regime, clients=4, participation=participation)
    strategy, grid, _ = _run_memory(task, pool_bn=False)
    ref = _inprocess(task)
    assert [row["clients"] for row in strategy.history] == \
        [row["clients"] for row in ref.history]
    if participation < 1:
        assert len(grid.sent) == 2 * 2  # 2 of 4 clients per round, 2 rounds
    _equal(strategy.global_state(), ref.global_state)
    for k, state in strategy.client_states.items():
        _equal(state, ref.client_states[k])


def test_oneshot_clients_match_and_dmm_makes_the_global_model(tmp_path, identity):
    task = _task(write_npz(tmp_path / "d.npz"), "oneshot", clients=3)
    dmm = with_overrides(preset("default"), TINY_DMM, "test")
    strategy, _, _ = _run_memory(task, pool_bn=False, dmm=dmm)
    ref = _inprocess(task)
    assert len(strategy.history) == 1  # one round, whatever `rounds` says
    for k in range(3):
        _equal(strategy.client_states[k], ref.client_states[k])
    g = strategy.global_state()
    assert g is not None and strategy.history[0]["dmm"]["timings"]["total_s"] > 0
    assert all(torch.isfinite(v).all() for v in g.values() if v.is_floating_point())


def test_pooled_bn_statistics_and_integer_counters(tmp_path, identity):
    """pool_bn: running statistics are those of the clients' union (Eq. 3-4), counters stay
    int64 and are summed; weights are the sample-weighted average."""
    task = _task(write_npz(tmp_path / "d.npz"), "fedavg", clients=3, rounds=1)
    strategy, _, result = _run_memory(task)
    states = [strategy.client_states[k] for k in range(3)]
    ns = [strategy.n_samples[k] for k in range(3)]
    template = tiny_model()
    expected = aggregate_bn_buffers(states, template, weights=ns,
                                    into=weighted_average(states, ns))
    got = result.arrays.to_torch_state_dict()
    _equal(dict(got), expected)
    avg = weighted_average(states, ns)
    var_key = next(k for k in got if k.endswith("running_var"))
    assert not torch.allclose(got[var_key], avg[var_key])  # not the average of the variances
    cnt = next(k for k in got if k.endswith("num_batches_tracked"))
    assert got[cnt].dtype == torch.int64 and int(got[cnt]) == sum(int(s[cnt]) for s in states)


def test_failed_client_is_left_out_and_recorded(tmp_path, identity):
    task = _task(write_npz(tmp_path / "d.npz"), "fedavg", clients=3, rounds=1)

    class Failing(MemoryGrid):
        def send_and_receive(self, messages, timeout=None):
            replies = super().send_and_receive(messages, timeout)
            if messages and messages[0].metadata.message_type == MessageType.TRAIN:
                from flwr.app import Error
                replies[0] = Message(Error(code=0, reason="disk full"), reply_to=messages[0])
            return replies

    torch.manual_seed(0)
    template = create("resnet8", **ARCH)
    strategy = DMMFedAvg(template, seed=0, min_available_nodes=3)
    strategy.start(Failing(task), ArrayRecord(template.state_dict()), num_rounds=1)
    assert strategy.failures and strategy.failures[0]["reason"] == "disk full"
    assert len(strategy.history[0]["clients"]) == 2


def test_a_restarted_node_is_asked_its_partition_and_used_again(tmp_path, identity):
    """A SuperNode lost in round 1 (the SuperLink answers for it) and restarted under a new
    node id: round 1 records the failure by partition, round 2 sends to the new node."""
    from flwr.app import Error

    task = _task(write_npz(tmp_path / "d.npz"), "fedavg", clients=3, rounds=2)

    class Restarting(MemoryGrid):
        def send_and_receive(self, messages, timeout=None):
            replies = super().send_and_receive(messages, timeout)
            train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
            if train and not getattr(self, "lost", None):
                lost = self.node_ids[1]
                i = next(i for i, r in enumerate(replies) if r.metadata.src_node_id == lost)
                # the SuperLink's own answer for a node without heartbeat
                replies[i] = Message(Error(code=5, reason="Node Unavailable"),
                                     reply_to=train[i])
                replies[i].metadata.__dict__["_src_node_id"] = 0
                self.lost, new = lost, 5555
                self.contexts[new] = self.contexts.pop(lost)  # same partition, new id
                self.node_ids[1] = new
            return replies

    torch.manual_seed(0)
    template = create("resnet8", **ARCH)
    strategy = DMMFedAvg(template, seed=0, min_available_nodes=3)
    grid = Restarting(task)
    lost_pid = int(grid.contexts[grid.node_ids[1]].node_config["partition-id"])
    strategy.start(grid, ArrayRecord(template.state_dict()), num_rounds=2)
    assert [f["partition"] for f in strategy.failures] == [lost_pid]
    assert strategy.failures[0]["reason"] == "Node Unavailable"
    assert strategy.history[0]["failed"] == [lost_pid]
    assert strategy.history[1]["clients"] == [0, 1, 2] and strategy.history[1]["failed"] == []
    assert strategy._nodes[lost_pid] == 5555


def test_a_new_node_cannot_claim_a_partition_still_held(tmp_path, identity):
    task = _task(write_npz(tmp_path / "d.npz"), "fedavg", clients=2, rounds=2)

    class Intruder(MemoryGrid):
        def send_and_receive(self, messages, timeout=None):
            replies = super().send_and_receive(messages, timeout)
            if messages and messages[0].metadata.message_type == MessageType.TRAIN and \
                    len(self.node_ids) == 2:
                ctx = self.contexts[self.node_ids[0]]
                self.contexts[7777] = Context(run_id=1, node_id=7777, state=RecordDict(),
                                              run_config={}, node_config=ctx.node_config)
                self.node_ids.append(7777)
            return replies

    torch.manual_seed(0)
    template = create("resnet8", **ARCH)
    strategy = DMMFedAvg(template, seed=0, min_available_nodes=2)
    with pytest.raises(Exception, match="claims partition .* still holds"):
        strategy.start(Intruder(task), ArrayRecord(template.state_dict()), num_rounds=2)


def test_example_server_app_writes_a_checkpoint(tmp_path, identity):
    """The body of examples/flower's ServerApp, over the in-memory grid."""
    npz = write_npz(tmp_path / "d.npz")
    rc = {"dataset": "npz", "data-root": str(npz), "arch": "resnet8", "width": 0.25,
          "clients": 2, "rounds": 1, "local-iters": 2, "batch-size": 16, "min-size": 5,
          "alpha": 0.5, "dmm-config": json.dumps(TINY_DMM), "out": str(tmp_path / "m.safetensors")}
    task = task_from_run_config(rc)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc)
    summary = server_main(MemoryGrid(task), ctx)
    ck = checkpoint.load(tmp_path / "m.safetensors")
    assert ck.meta["regime"] == "flower-fedavg+dmm" and 0 <= summary["accuracy"] <= 1
    assert json.loads((tmp_path / "m.json").read_text())["dmm"]
    with pytest.raises(Exception, match="unknown run config keys: colour"):
        task_from_run_config({**rc, "colour": 1})


def test_flower_simulation_matches_inprocess_train(tmp_path):
    """`dmm train --engine flower`: 2 SuperNodes, 1 round, in Flower's simulation engine (Ray);
    the same global model as the in-process engine."""
    npz = write_npz(tmp_path / "d.npz")
    common = ["train", "--dataset", "npz", "--data-root", npz, "--arch", "resnet8", "--width",
              "0.25", "--rounds", "1", "--local-iters", "2", "--batch-size", "16",
              "--clients", "2", "--alpha", "0.5", "--min-size", "5", "--no-eval"]
    r = run_cli(*common, "--engine", "flower", "--out", tmp_path / "fl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(*common, "--out", tmp_path / "ip", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("global", "client_000", "client_001"):
        a = checkpoint.load(tmp_path / "fl" / f"{name}.safetensors").state
        b = checkpoint.load(tmp_path / "ip" / f"{name}.safetensors").state
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=f"{name} {k}")
    cfg = json.loads((tmp_path / "fl" / "train.json").read_text())["config"]
    assert cfg["engine"] == "flower"


def test_dmm_between_rounds_agrees_with_the_inprocess_engine(tmp_path, identity):
    """`dmm_every` in the strategy and in run_federated: one LoopRefiner, bit for bit."""
    from dmm.inloop import LoopConfig, LoopRefiner

    task = _task(write_npz(tmp_path / "d.npz"), "fedavg", clients=3, rounds=2)
    data = load_dataset("npz", task.data_root)
    p = task.partition
    part = dirichlet_partition(data.y_train.numpy(), p["clients"], p["alpha"], seed=0,
                               min_size=p["min_size"], num_classes=data.num_classes)
    counts = {k: c.tolist() for k, c in enumerate(part.counts)}
    dmm = with_overrides(preset("default"), TINY_DMM, "test")
    loop = LoopConfig(every=1, refresh=8, steps=2)
    kw = {"input_shape": tuple(data.input_shape), "pixel_range": data.pixel_range}
    # Execute
    strategy, _, _ = _run_memory(task, pool_bn=False, dmm=dmm, dmm_every=1, loop=loop,
                                 refine_kwargs=kw, label_counts=counts)
    ref = LoopRefiner(dmm, loop, create("resnet8", **ARCH), rounds=2, label_counts=counts, **kw)
    res = run_federated(lambda: create("resnet8", **ARCH), data, part,
                        FederatedConfig.from_dict(task.federated), progress=False,
                        server_step=ref)
    # Assert
    assert [r["round"] for r in strategy.dmm_reports] == [1, 2]
    _equal(strategy.global_state(), res.global_state)
