"""`dmm demo`: the method's showcase on the embedded default data (Fashion-MNIST, offline).

10 clients, Dirichlet alpha 0.01 (most clients hold one class), FedAvg for a reduced CPU budget,
then FedAvg + buffer aggregation (Eq. 3-4), then FedAvg + DMM (default preset). Prints accuracy,
rare-class accuracy and wall time for each, and writes results.json and the pseudo-data grid.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch

from dmm.bn import aggregate_bn_buffers
from dmm.data import PartitionConfig
from dmm.evaluate import evaluate, rare_classes
from dmm.federated import FederatedConfig, TrainConfig
from dmm.io import ensure_writable_dir, provenance, write_json
from dmm.jobs import DataConfig, TrainJob, train
from dmm.models import create
from dmm.pipeline import preset, refine
from dmm.statedict import state_of
from dmm.synth import save_grid

log = logging.getLogger(__name__)

# ---- the demo's budget (one place) -----------------------------------------------------------
CLIENTS = 10
ALPHA = 0.01
ROUNDS = 30            # x 10 local iterations x batch 128 per client (the bench uses 60)
LOCAL_ITERS = 10
ARCH, WIDTH = "resnet18", 0.25


def run_demo(out: Path, *, seed: int = 0, rounds: int = ROUNDS, n_train: int | None = None,
             n_test: int | None = None, dmm_overrides: dict | None = None,
             report=print) -> list[dict]:
    """Run the demo; returns the result rows (also written to out/results.json)."""
    out = ensure_writable_dir(out)
    job = TrainJob(DataConfig("fmnist", n_train=n_train, n_test=n_test),
                   PartitionConfig(alpha=ALPHA, clients=CLIENTS, seed=seed),
                   FederatedConfig(regime="fedavg", rounds=rounds, seed=seed,
                                   train=TrainConfig(local_iters=LOCAL_ITERS)),
                   arch=ARCH, width=WIDTH, evaluate=False)
    data = job.data.load()
    split = job.partition.split(data)
    rare = rare_classes(split.counts)
    report(f"FedAvg: {CLIENTS} clients, alpha {ALPHA}, {rounds} rounds x {LOCAL_ITERS} local "
           f"iterations, {ARCH} width {WIDTH}; rare classes (>= 90% with one client): {rare}")
    trained = train(job, data=data, partition=split)
    fed, part, cfg = trained.result, trained.partition, job.federated
    model = create(ARCH, **trained.arch_kwargs)
    model.load_state_dict(fed.global_state)
    clients = []
    for s in fed.client_states:
        c = create(ARCH, **trained.arch_kwargs)
        c.load_state_dict(s)
        clients.append(c.eval())

    def row(name: str, m: torch.nn.Module, seconds: float) -> dict:
        ev = evaluate(m, data.x_test, data.y_test, data.normalize, num_classes=data.num_classes)
        return {"method": name, "accuracy": ev.accuracy, "rare_class_accuracy":
                ev.class_mean(rare), "wall_time_s": seconds, "per_class": ev.per_class}

    rows = [row("FedAvg", model, fed.wall_time)]
    t0 = time.perf_counter()
    buffered = copy.deepcopy(model)
    # the same weighting as the DMM default (num_batches_tracked, the paper's c_k)
    buffered.load_state_dict(aggregate_bn_buffers(fed.client_states, model, weights=None,
                                                  into=state_of(model)))
    rows.append(row("FedAvg + buffer aggregation", buffered, time.perf_counter() - t0))

    dmm_cfg = preset("default", seed=seed, **(dmm_overrides or {}))
    t0 = time.perf_counter()
    refined, rep = refine(model, clients, dmm_cfg, n_samples=fed.n_samples,
                          input_shape=tuple(data.x_train.shape[1:]), pixel_range=data.pixel_range,
                          label_counts=part.counts.tolist(), progress=True)
    rows.append(row("FedAvg + DMM", refined, time.perf_counter() - t0))
    check = rep.distillation.get("teacher_check")
    if check is not None:
        report(f"DMM teacher check: the clients' routed ensemble scores "
               f"{100 * check['others_ensemble_accuracy']:.1f}% on each other's pseudo-data, "
               f"the global model {100 * check['student_accuracy']:.1f}%: "
               + ("whole-network transfer" if check["transfer"] else
                  "nothing to transfer, head-only refinement"))
    pseudo = rep.pseudo
    if pseudo is not None:
        save_grid(pseudo.images, pseudo.labels, out / "pseudo_data.png", mean=data.mean,
                  std=data.std, class_names=data.classes)

    write_json(out / "results.json", {
        "rows": rows, "rare_classes": rare, "partition": part.to_dict(),
        "config": {"clients": CLIENTS, "alpha": ALPHA, "rounds": rounds,
                   "local_iters": LOCAL_ITERS, "arch": ARCH, "width": WIDTH, "seed": seed,
                   "federated": cfg.to_dict(), "dmm": dmm_cfg.to_dict()},
        "dmm_report": rep.to_dict(), "provenance": provenance()})
    report("")
    report(f"{'method':<30} {'accuracy':>9} {'rare-class':>11} {'wall time':>10}")
    for r in rows:
        report(f"{r['method']:<30} {100 * r['accuracy']:8.2f}% "
               f"{100 * r['rare_class_accuracy']:10.2f}% {r['wall_time_s']:9.1f}s")
    report(f"\nwrote {out / 'results.json'}" + (f" and {out / 'pseudo_data.png'}" if pseudo
                                               is not None else ""))
    return rows
