"""dmm.jobs: one library call per job, the same route the command line takes."""

from __future__ import annotations

import json

import pytest

from conftest import write_npz
from dmm.data import PartitionConfig
from dmm.errors import DMMError
from dmm.federated import FederatedConfig, TrainConfig
from dmm.jobs import DataConfig, TrainJob, evaluate, inspect, train


def _job(npz, **kw) -> TrainJob:
    kw.setdefault("federated", FederatedConfig(
        regime="fedavg", rounds=1, seed=0,
        train=TrainConfig(local_iters=2, batch_size=16, bf16=False)))
    return TrainJob(DataConfig("npz", str(npz)),
                    PartitionConfig(alpha=0.5, clients=3, min_size=5, seed=0),
                    arch="resnet8", **kw)


def test_train_evaluate_inspect_as_library_calls(tmp_path):
    # Prepare
    npz = write_npz(tmp_path / "tiny.npz")
    # Execute
    out = train(_job(npz), tmp_path / "run", progress=False)
    rows = evaluate([tmp_path / "run" / "global.safetensors"], DataConfig("npz", str(npz)),
                    json_path=tmp_path / "eval.json")
    div = inspect([tmp_path / "run"], chart=tmp_path / "div.png")
    # Assert: the layout dmm merge reads, the metadata it needs, the same accuracy twice
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["client_000.safetensors", "client_001.safetensors",
                     "client_002.safetensors", "global.safetensors", "init.safetensors",
                     "partition.json", "train.json"]
    saved = json.loads((tmp_path / "run" / "train.json").read_text())
    assert (saved["config"]["alpha"], saved["config"]["clients"]) == (0.5, 3)
    assert out.meta["dataset"] == "npz" and out.meta["input_size"] == [1, 16, 16]
    from dmm import checkpoint
    clients = checkpoint.load_dir(tmp_path / "run")
    assert [c.label_counts for c in clients] == out.partition.counts.tolist()
    assert [sum(c.label_counts) for c in clients] == [c.n_samples for c in clients]
    assert rows[0]["accuracy"] == pytest.approx(out.eval[0]["accuracy"])
    assert json.loads((tmp_path / "eval.json").read_text())["results"] == rows
    assert div.names == ["client_000", "client_001", "client_002"]
    assert div.chart.exists() and "client_001" in div.table()


def test_a_bad_job_fails_before_any_output(tmp_path):
    npz = write_npz(tmp_path / "tiny.npz")
    with pytest.raises(DMMError, match="unknown dataset"):
        train(TrainJob(DataConfig("no-such-data"), PartitionConfig(alpha=0.5, clients=3)),
              tmp_path / "a")
    with pytest.raises(DMMError, match="samples"):  # 3 x 100 samples from 120
        train(TrainJob(DataConfig("npz", str(npz)),
                       PartitionConfig(alpha=0.5, clients=3, min_size=100)), tmp_path / "b")
    with pytest.raises(DMMError, match="seed"):
        train(_job(npz, federated=FederatedConfig(seed=1)), tmp_path / "c")
    with pytest.raises(DMMError, match="unknown engine"):
        train(_job(npz, engine="grpc"), tmp_path / "d")
    with pytest.raises(DMMError, match="n_train must be >= 1"):
        DataConfig("npz", n_train=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.npz"]
