"""Exploration for the transfer issue: does DMM carry what the client models know?

Two cases on the DESIGN §7 data (Fashion-MNIST, ResNet-18 width 1/4, 10 clients), trained once
through `dmm.jobs.train` and cached under --cache (checkpoints carry each client's label
histogram):
- `oneshot`: one-shot clients from one shared init (60 x 10 = 600 steps each), Dirichlet alpha
  0.5; the student is their plain average (what a new user merging checkpoints gets);
- `fedavg`: FedAvg, 30 rounds x 10 local iterations at alpha 0.01; the student is the global
  model, the teachers the clients' last local models.
Every variant refines the same student with the same teachers (`dmm.refine`); variants with
the same inversion share its pseudo-data (their refine time still counts the synthesis). The
references are the clients' softmax ensemble and its label-count routed form on the test set.

    .venv/bin/python benchmarks/explore_transfer.py --case oneshot --alpha 0.5 --seed 0

appends one record per (case, alpha, seed, variant) to benchmarks/results/explore_transfer.jsonl
(with config and provenance) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dmm import checkpoint
from dmm.data import PartitionConfig
from dmm.evaluate import eval_from_logits, evaluate, predict_logits
from dmm.federated import FederatedConfig, TrainConfig
from dmm.io import provenance
from dmm.jobs import DataConfig, TrainJob, train
from dmm.merging import merge_states
from dmm.pipeline import preset, refine

# ---- the variants (overrides of the head preset, or (preset, overrides)) ---------------
DOMAIN = {"mode": "ensemble", "merged_share": 0.0, "teacher_labels": "histogram",
          "n_images": 1280, "iterations": 150}
KD = {"teacher_signal": "routed", "temperature": 4.0, "optimizer": "adam", "lr": 1e-3,
      "trainable": "all", "steps": 1000, "gamma": 0.0, "eta": 0.0, "kd_weight": 1.0,
      "ce_weight": 0.0, "update_bn": True}
CACHED = {"cache_teachers": True, "augment": False}


def variants() -> dict[str, dict | str | tuple | None]:
    transfer = {"distill": True, "selection": "all", "inversion": DOMAIN, "distillation": KD}
    return {
        "student": None,
        "head (today's default)": {},
        "paper": "paper",
        "default (transfer + teacher check)": "default",
        "default, 500 steps": ("default", {"distillation": {"steps": 500}}),
        "default, 500 steps, 100 iterations": ("default", {"inversion": {"iterations": 100},
                                                           "distillation": {"steps": 500}}),
        "default, 1024 images, 600 steps": ("default", {"inversion": {"n_images": 1024},
                                                        "distillation": {"steps": 600}}),
        "domain + routed KD, BN updated": transfer,
        "domain + routed KD, BN frozen": {**transfer, "distillation": {**KD, "update_bn": False}},
        "domain + plain softmax KD, BN updated": {
            **transfer, "distillation": {**KD, "teacher_signal": "softmax"}},
        "domain + routed KD + 0.2 CE, BN updated": {
            **transfer, "distillation": {**KD, "kd_weight": 0.8, "ce_weight": 0.2}},
        "domain + routed KD + hard x2, BN updated": {
            **transfer, "distillation": {**KD, "hard_weight": 2.0}},
        # teacher logits computed once per pseudo-image (no augmentation): J teacher passes
        # per image instead of per step
        "cached: domain + routed KD, BN updated": {
            **transfer, "distillation": {**KD, **CACHED}},
        "cached: domain + routed KD, BN frozen": {
            **transfer, "distillation": {**KD, **CACHED, "update_bn": False}},
        "cached: domain + plain softmax KD, BN updated": {
            **transfer, "distillation": {**KD, **CACHED, "teacher_signal": "softmax"}},
        "cached: domain + routed KD + 0.2 CE, BN updated": {
            **transfer, "distillation": {**KD, **CACHED, "kd_weight": 0.8, "ce_weight": 0.2}},
        # the head-only refinement with what the clients know: targets from the domain pool
        "domain pool, head-only CE (histogram targets)": {
            "inversion": DOMAIN},
        "cached: domain + routed KD, head only": {
            **transfer, "distillation": {**KD, **CACHED, "trainable": "head",
                                         "update_bn": False}},
        "cached: domain + routed KD + CE, head only": {
            **transfer, "distillation": {**KD, **CACHED, "trainable": "head",
                                         "update_bn": False, "kd_weight": 0.5,
                                         "ce_weight": 0.5}},
        "cached: merged-only inversion + routed KD, BN updated": {
            **transfer, "inversion": {"mode": "merged", "n_images": 1280, "iterations": 150},
            "distillation": {**KD, **CACHED}},
    }


def ensure_trained(case: str, alpha: float, seed: int, cache: Path) -> Path:
    run = cache / f"{case}_a{alpha}_s{seed}"
    if (run / "train.json").exists():
        return run
    rounds = 60 if case == "oneshot" else 30
    job = TrainJob(DataConfig("fmnist"), PartitionConfig(alpha=alpha, clients=10, seed=seed),
                   FederatedConfig(regime="oneshot" if case == "oneshot" else "fedavg",
                                   rounds=rounds, seed=seed, train=TrainConfig(local_iters=10)),
                   evaluate=False)
    train(job, run)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=["oneshot", "fedavg"], default="oneshot")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=None, help="variant names (default: all)")
    ap.add_argument("--cache", default="runs/explore-transfer")
    ap.add_argument("--out", default="benchmarks/results/explore_transfer.jsonl")
    args = ap.parse_args()
    run = ensure_trained(args.case, args.alpha, args.seed, Path(args.cache))
    cks = checkpoint.load_dir(run)
    data = DataConfig("fmnist").load()
    teachers = [c.build().eval() for c in cks]
    n = [c.n_samples for c in cks]
    counts = [c.label_counts for c in cks]
    train_s = json.loads((run / "train.json").read_text())["wall_time_s"]
    if args.case == "oneshot":
        student = cks[0].build()
        student.load_state_dict(merge_states([c.state for c in cks], "average", model=student,
                                             weights=n))
    else:
        student = checkpoint.load(run / "global.safetensors").build()
    student.eval()
    prov = provenance()
    rows = []

    def record(name, acc, seconds, extra=None):
        rec = {"case": args.case, "alpha": args.alpha, "seed": args.seed, "variant": name,
               "accuracy": acc, "refine_s": seconds, "train_s": train_s,
               **(extra or {}), "provenance": prov}
        rows.append(rec)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec, sort_keys=True, default=str) + "\n")
        print(f"  {name:<45} {100 * acc:6.2f}%  ({seconds:6.1f} s, "
              f"{100 * seconds / train_s:5.1f}% of training)", flush=True)

    # references on the test set: softmax ensemble, label-count routed ensemble
    logits = torch.stack([predict_logits(t, data.x_test, data.normalize).float()
                          for t in teachers])
    p = F.softmax(logits, 2)
    record("ensemble (softmax average)", eval_from_logits(p.mean(0).log(), data.y_test,
                                                          data.num_classes).accuracy, 0.0)
    w = torch.tensor(counts, dtype=torch.float)              # (K, C)
    routed = (p * (w / w.sum(0).clamp_min(1)).unsqueeze(1)).sum(0)  # weight by class share
    record("ensemble, label-count routed", eval_from_logits(routed.clamp_min(1e-12).log(),
                                                            data.y_test,
                                                            data.num_classes).accuracy, 0.0)
    pseudo_cache: dict[str, object] = {}
    for name, over in variants().items():
        if args.only and name not in args.only:
            continue
        if over is None:
            ev = evaluate(student, data.x_test, data.y_test, data.normalize)
            record(name, ev.accuracy, 0.0)
            continue
        base, over = (over, {}) if isinstance(over, str) else \
            over if isinstance(over, tuple) else ("head", over)
        cfg = preset(base, seed=args.seed, **over)
        key = json.dumps([cfg.buffer_weights, cfg.inversion.to_dict()])
        t0 = time.perf_counter()
        model, rep = refine(student, teachers, cfg, n_samples=n, input_shape=data.input_shape,
                            pixel_range=data.pixel_range, label_counts=counts,
                            pseudo=pseudo_cache.get(key))
        if rep.pseudo is not None:
            pseudo_cache.setdefault(key, rep.pseudo)
        ev = evaluate(model, data.x_test, data.y_test, data.normalize)
        inv = rep.inversion
        record(name, ev.accuracy, rep.timings["total_s"],
               {"config": cfg.to_dict(), "timings": rep.timings,
                "images_per_minute": 60 * inv["images_per_second"] if inv else None,
                "wall_s": time.perf_counter() - t0,
                "teacher_check": rep.distillation.get("teacher_check")})


if __name__ == "__main__":
    main()
