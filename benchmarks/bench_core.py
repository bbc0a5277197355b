"""DMM core benchmark: FedAvg vs FedAvg + buffer aggregation vs FedAvg + DMM variants.

Protocol (shared/DESIGN.md section 7): Fashion-MNIST, ResNet-18 width 1/4, 10 clients,
Dirichlet alpha (default 0.01), FedAvg 60 rounds x 10 local iterations, batch 128, SGD lr 0.05.
Client models are trained once per seed (or reused from --runs-dir) and every row refines the
same FedAvg global model with the same clients as teachers. Rows sharing an inversion config
share the pseudo-data; each row's wall time still includes the synthesis it needs.

    python benchmarks/bench_core.py --seeds 0 1 2 --alpha 0.01

prints a table (mean +- std over seeds), the gain of every row over FedAvg per seed, the
refinement's wall time as a fraction of the FedAvg training it refines, and the synthesis
throughput; writes JSON and markdown under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dmm import checkpoint
from dmm.cli import main as dmm_main
from dmm.data import load_dataset
from dmm.evaluate import evaluate, rare_classes
from dmm.io import provenance, write_json, write_text
from dmm.pipeline import DMMConfig, preset, refine

# ---- rows: name -> DMMConfig (None = no refinement) -------------------------------------------


def rows() -> dict[str, DMMConfig | None]:
    off = dict(inversion_augmentation=False, distill=False)
    full_net = preset("head", distillation={"lr": 1e-3, "trainable": "all"})
    experts = preset("head", distill=True, selection="all")
    experts.distillation.teacher_signal = "experts"
    experts.distillation.gamma = experts.distillation.eta = 0.0
    return {
        "FedAvg": None,
        "+ buffer aggregation (samples)": preset("head", buffer_weights="samples", **off),
        "+ buffer aggregation (counts, Eq. 3-4)": preset("head", **off),
        "+ inversion augmentation, whole network (SGD 1e-3)": full_net,
        "+ inversion augmentation, head only (= preset head)": preset("head"),
        "DMM paper (+ selective KD, softmax, Adam)": preset("paper"),
        "DMM default (domain inversion, teacher check)": preset("default"),
        "preset head + KD experts (all teachers)": experts,
    }


def ensure_run(run: Path, alpha: float, seed: int, rounds: int) -> None:
    if (run / "global.safetensors").exists():
        return
    args = ["train", "--dataset", "fmnist", "--alpha", str(alpha), "--clients", "10",
            "--regime", "fedavg", "--rounds", str(rounds), "--local-iters", "10",
            "--seed", str(seed), "--out", str(run), "--no-eval"]
    if dmm_main(args) != 0:
        sys.exit(f"training failed for {run}")


def bench_seed(run: Path, data, names: dict[str, DMMConfig | None]) -> dict:
    glob = checkpoint.load(run / "global.safetensors").build().eval()
    cks = checkpoint.load_dir(run)
    teachers = [c.build().eval() for c in cks]
    n = [c.n_samples for c in cks]
    part = json.loads((run / "partition.json").read_text())
    train_s = json.loads((run / "train.json").read_text())["wall_time_s"]
    rare = rare_classes(np.array(part["label_counts"]))
    out: dict = {"run": str(run), "fedavg_train_s": train_s, "rare_classes": rare, "rows": {}}
    pseudo_cache: dict[str, object] = {}
    for name, cfg in names.items():
        t0 = time.perf_counter()
        if cfg is None:
            model, rep, seconds = glob, None, 0.0
        else:
            key = json.dumps([cfg.buffer_weights, cfg.inversion.to_dict(), cfg.seed])
            model, rep = refine(glob, teachers, cfg, n_samples=n, input_shape=(1, 32, 32),
                                pixel_range=data.pixel_range, pseudo=pseudo_cache.get(key),
                                label_counts=part["label_counts"])
            if rep.pseudo is not None:
                pseudo_cache.setdefault(key, rep.pseudo)
            seconds = rep.timings["total_s"]
        ev = evaluate(model, data.x_test, data.y_test, data.normalize)
        row = {"accuracy": ev.accuracy, "rare_class_accuracy": ev.class_mean(rare),
               "per_class": ev.per_class, "refine_s": seconds,
               "refine_fraction_of_training": seconds / train_s}
        if rep is not None:
            row["teachers"] = rep.teachers
            row["kept_fraction"] = rep.distillation.get("kept_fraction")
            inv = rep.inversion
            if inv:
                row["synthesis"] = {k: inv[k] for k in ("seconds", "images_per_second",
                                                        "image_iterations_per_second",
                                                        "bn_loss") if k in inv}
        out["rows"][name] = row
        print(f"  {name:<45} {100 * ev.accuracy:6.2f}%  rare {100 * ev.class_mean(rare):6.2f}%"
              f"  refine {seconds:6.1f} s ({time.perf_counter() - t0:.0f} s incl. eval)",
              flush=True)
    return out


def fmt(vals: list[float]) -> str:
    m = statistics.mean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--runs-dir", default="runs/bench_core")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = load_dataset("fmnist")
    names = rows()
    per_seed = {}
    for seed in args.seeds:
        run = Path(args.runs_dir) / f"fedavg_a{args.alpha}_s{seed}"
        ensure_run(run, args.alpha, seed, args.rounds)
        print(f"seed {seed}: {run}", flush=True)
        per_seed[seed] = bench_seed(run, data, names)

    lines = [f"FedAvg + DMM on Fashion-MNIST, alpha {args.alpha}, 10 clients, seeds "
             f"{args.seeds} (mean ± std, %)", "",
             "| row | accuracy | rare-class accuracy | gain over FedAvg per seed (pts) | "
             "refine time / FedAvg training |", "|---|---|---|---|---|"]
    for name in names:
        acc = [per_seed[s]["rows"][name]["accuracy"] for s in args.seeds]
        rare = [per_seed[s]["rows"][name]["rare_class_accuracy"] for s in args.seeds]
        gains = [100 * (per_seed[s]["rows"][name]["accuracy"] -
                        per_seed[s]["rows"]["FedAvg"]["accuracy"]) for s in args.seeds]
        frac = [per_seed[s]["rows"][name]["refine_fraction_of_training"] for s in args.seeds]
        per = ", ".join(f"{g:+.2f}" for g in gains)
        lines.append(f"| {name} | {fmt(acc)} | {fmt(rare)} | "
                     f"{per} (mean {statistics.mean(gains):+.2f}) "
                     f"| {100 * statistics.mean(frac):.1f}% |")
    synth = [r["synthesis"] for s in args.seeds for r in per_seed[s]["rows"].values()
             if "synthesis" in r]
    if synth:
        ips = statistics.mean(x["images_per_second"] for x in synth)
        iips = statistics.mean(x["image_iterations_per_second"] for x in synth)
        lines += ["", f"Synthesis throughput: {ips:.2f} finished images/s "
                      f"({iips:.0f} image-iterations/s) on {torch.get_num_threads()} threads."]
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    stem = f"core_fmnist_a{args.alpha}"
    write_json(out / f"{stem}.json", {
        "command": " ".join(sys.argv), "alpha": args.alpha, "seeds": args.seeds,
        "rows": {k: (v.to_dict() if v is not None else None) for k, v in names.items()},
        "results": per_seed, "provenance": provenance()})
    write_text(out / f"{stem}.md", table + "\n")


if __name__ == "__main__":
    main()
