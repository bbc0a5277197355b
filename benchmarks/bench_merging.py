"""Merging methods on the one-shot regime: accuracy and wall time of every registered method.

Protocol: Fashion-MNIST, ResNet-18 width 1/4, 10 clients, Dirichlet alpha (default 0.1); every
client trains once from the same seeded initialization for the FedAvg budget (60 x 10 local
iterations, SGD lr 0.05); each method merges the same 10 checkpoints (weights: samples).

    python benchmarks/bench_merging.py --alpha 0.1 --seeds 0

prints a table and writes benchmarks/results/merging_fmnist_a{alpha}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from bench_core import fmt

from dmm import checkpoint
from dmm.cli import main as dmm_main
from dmm.data import fmnist, load_dataset
from dmm.data.base import pixel_range
from dmm.evaluate import evaluate, rare_classes
from dmm.io import provenance, write_json, write_text
from dmm.merging import get_method, merge_states

FMNIST_RANGE = pixel_range(fmnist.MEAN, fmnist.STD)  # pseudo-images are clamped to it
METHODS: dict[str, dict] = {
    "average": {},
    "task_arithmetic": {"scale": 1.0},
    "ties": {"density": 0.2, "scale": 1.0},
    "rebasin": {},
    "pleas": {"input_shape": (1, 32, 32)},
    "cat": {"input_shape": (1, 32, 32), "scale": 1.0},
    "average+bn_reset": {"bn_reset": True, "pixel_range": FMNIST_RANGE},
    "rebasin+bn_reset": {"bn_reset": True, "pixel_range": FMNIST_RANGE},
}


def ensure_run(run: Path, alpha: float, seed: int, rounds: int, init: str) -> None:
    if (run / "client_009.safetensors").exists():
        return
    args = ["train", "--dataset", "fmnist", "--alpha", str(alpha), "--clients", "10",
            "--regime", "oneshot", "--rounds", str(rounds), "--local-iters", "10",
            "--seed", str(seed), "--out", str(run), "--oneshot-init", init]
    if dmm_main(args) != 0:
        sys.exit(f"training failed for {run}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--init", default="shared", choices=["shared", "independent"],
                    help="clients from one seeded init (federated-style) or each from its own")
    ap.add_argument("--runs-dir", default="runs/bench_merging")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    data = load_dataset("fmnist")
    results: dict = {}
    for seed in args.seeds:
        run = Path(args.runs_dir) / f"oneshot_{args.init}_a{args.alpha}_s{seed}"
        ensure_run(run, args.alpha, seed, args.rounds, args.init)
        cks = checkpoint.load_dir(run)
        model = cks[0].build()
        states = [c.state for c in cks]
        weights = [c.n_samples for c in cks]
        base = checkpoint.load(run / "init.safetensors").state
        rare = rare_classes(np.array(json.loads((run / "partition.json").read_text())
                                     ["label_counts"]))
        results[seed] = {}
        for name in args.methods:
            t0 = time.perf_counter()
            merged = merge_states(states, name.split("+")[0], model=model, weights=weights,
                                  base=base, **METHODS[name])
            seconds = time.perf_counter() - t0
            model.load_state_dict(merged)
            ev = evaluate(model, data.x_test, data.y_test, data.normalize)
            results[seed][name] = {"accuracy": ev.accuracy, "rare_class_accuracy":
                                   ev.class_mean(rare), "seconds": seconds,
                                   "per_class": ev.per_class, "params": METHODS[name]}
            print(f"seed {seed} {name:<16} {100 * ev.accuracy:6.2f}%  "
                  f"rare {100 * ev.class_mean(rare):6.2f}%  {seconds:6.1f} s", flush=True)
    lines = [f"Merging methods, one-shot regime ({args.init} init), Fashion-MNIST, alpha "
             f"{args.alpha}, 10 clients, seeds {args.seeds} (%, mean ± std)", "",
             "| method | accuracy | rare-class accuracy | merge wall time (s) |",
             "|---|---|---|---|"]
    for name in args.methods:
        acc = [results[s][name]["accuracy"] for s in args.seeds]
        rare = [results[s][name]["rare_class_accuracy"] for s in args.seeds]
        sec = [results[s][name]["seconds"] for s in args.seeds]
        label = get_method(name.split("+")[0]).pretty_name + (
            " + BN reset on pseudo-data" if "+bn_reset" in name else "")
        lines.append(f"| {label} | {fmt(acc)} | {fmt(rare)} | "
                     f"{statistics.mean(sec):.1f} |")
    table = "\n".join(lines)
    print("\n" + table)
    stem = f"merging_fmnist_{args.init}_a{args.alpha}"
    write_json(Path(args.out) / f"{stem}.json", {"command": " ".join(sys.argv),
                                                 "results": results, "provenance": provenance()})
    write_text(Path(args.out) / f"{stem}.md", table + "\n")


if __name__ == "__main__":
    main()
