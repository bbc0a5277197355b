"""Flower's deployment engine on loopback: a SuperLink and two SuperNodes as separate processes,
one round of FedAvg + DMM, the same global model as the simulation engine, nothing left behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import write_npz
from dmm import checkpoint
from dmm.data import PartitionConfig
from dmm.data.base import load_dataset
from dmm.data.party import read_party, write_parties
from dmm.errors import DMMError
from dmm.flower.client import task_from_run_config
from dmm.flower.deploy import app_dir, deploy_run, free_ports
from dmm.flower.simulation import run_flower
from dmm.pipeline import preset, with_overrides

TINY_DMM = {"inversion": {"n_images": 16, "batch_size": 8, "iterations": 2, "bf16": False,
                          "compile": False},
            "distillation": {"steps": 2, "batch_size": 8}}
RUN = {"arch": "resnet8", "width": 0.25, "rounds": 1, "local-iters": 2, "batch-size": 16,
       "min-size": 5, "alpha": 0.5, "clients": 2, "seed": 0, "threads": 1,
       "dmm-config": json.dumps(TINY_DMM)}


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _flower_processes() -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if (b"flower-super" in cmd or b"flwr-" in cmd or b"flwr run" in cmd.replace(
                    b"\0", b" ")) and _alive(int(entry.name)):
                out.add(int(entry.name))
    return out


def _listening(port: int) -> bool:
    import socket
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _temp_entries() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("dmm-")}


def test_party_files_hold_one_partition_and_the_description_none(tmp_path):
    data = load_dataset("npz", write_npz(tmp_path / "d.npz"))
    part = PartitionConfig(alpha=0.5, clients=3, min_size=5, seed=0).split(data)
    desc, files = write_parties(data, part.indices, tmp_path / "parties")
    for pid, f in enumerate(files):
        d, file_pid, n = read_party(f)
        idx = torch.as_tensor(part.indices[pid])
        assert (file_pid, n) == (pid, 3)
        assert torch.equal(d.x_train, data.x_train[idx]) and torch.equal(d.y_train,
                                                                         data.y_train[idx])
        assert (d.mean, d.std, d.classes) == (data.mean, data.std, data.classes)
        assert len(d.x_test) == 0
    d, _, _ = read_party(desc)
    assert len(d.x_train) == 0 and d.input_shape == data.input_shape
    assert load_dataset("party", desc).num_classes == data.num_classes
    with pytest.raises(DMMError, match="needs --data-root"):
        load_dataset("party")


def test_deployment_on_loopback_matches_the_simulation_engine(tmp_path):
    """SuperLink + 2 SuperNodes (separate processes, 127.0.0.1), 1 round of FedAvg with BN
    pooled + DMM on the server; each node reads only its party file and the server only the
    data's description. The global model equals the simulation engine's within 1e-5."""
    npz = write_npz(tmp_path / "d.npz")
    data = load_dataset("npz", npz)
    task = task_from_run_config({**RUN, "dataset": "npz", "data-root": str(npz)})
    part = PartitionConfig(**task.partition).split(data)
    desc, files = write_parties(data, part.indices, tmp_path / "parties")
    temp_before = _temp_entries()
    listing_before = sorted(p.relative_to(app_dir()) for p in app_dir().rglob("*")
                            if "__pycache__" not in p.parts)
    # Execute: the deployment
    r = deploy_run(app_dir(), RUN, files, desc, tmp_path / "dep.safetensors", threads=1)
    # Assert: every process it started (SuperLink, SuperNodes, SuperExecs, ServerApp,
    # ClientApps) is gone; nothing is left in the temp folder or the app's folder
    assert len(r.started) >= 5 and r.leftover == []
    assert not [p for p in r.started if _alive(p)]
    assert len(r.ports) == 3 and not [p for p in r.ports if _listening(p)]
    assert _temp_entries() == temp_before
    assert sorted(p.relative_to(app_dir()) for p in app_dir().rglob("*")
                  if "__pycache__" not in p.parts) == listing_before
    assert r.summary["failures"] == [] and r.summary["history"][0]["clients"] == [0, 1]
    assert "accuracy" not in r.summary  # the server has no test data
    assert r.summary["run_config"]["dataset"] == "party"
    deployed = checkpoint.load(r.checkpoint)
    assert deployed.meta["regime"] == "flower-fedavg+dmm"
    # the simulation engine with the same settings
    dmm = with_overrides(preset("default"), TINY_DMM, "test")
    dmm.seed = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, strategy = run_flower(task, pool_bn=True, dmm=dmm,
                                 refine_kwargs={"input_shape": tuple(data.input_shape),
                                                "pixel_range": data.pixel_range})
    finally:
        torch.set_num_threads(threads)
    sim = strategy.global_state()
    assert set(sim) == set(deployed.state)
    for k, v in sim.items():
        torch.testing.assert_close(deployed.state[k], v, rtol=0, atol=1e-5, msg=k)


def test_a_failed_deployment_leaves_nothing(tmp_path):
    """A run that fails (the run config names a key the app does not know) stops every
    process and writes no checkpoint."""
    data = load_dataset("npz", write_npz(tmp_path / "d.npz"))
    part = PartitionConfig(alpha=0.5, clients=2, min_size=5, seed=0).split(data)
    desc, files = write_parties(data, part.indices, tmp_path / "parties")
    temp_before, procs_before = _temp_entries(), _flower_processes()
    with pytest.raises(DMMError, match="flwr run exited"):
        deploy_run(app_dir(), {**RUN, "colour": 1}, files, desc, tmp_path / "m.safetensors",
                   timeout=300)
    assert not (tmp_path / "m.safetensors").exists()
    assert _temp_entries() == temp_before and _flower_processes() == procs_before


def test_free_ports_are_distinct_and_free():
    ports = free_ports(5)
    assert len(set(ports)) == 5 and all(1024 <= p < 65536 for p in ports)
