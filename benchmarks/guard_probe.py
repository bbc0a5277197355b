"""Would a data-free guard have kept FedAvg where post-hoc DMM lowered it?

For cached bench trainings (runs/bench-cache/<dataset>/fedavg_*), refine the FedAvg model with
the `head` and `transfer` presets (as the bench does: the clients as teachers, their label
histograms, the cell's seed), and score every candidate (FedAvg itself, head, transfer) on
- the test split (what a guard cannot see), and
- a fresh probe of pseudo-data (the default preset's domain inversion, its own seed, never
  trained on): the share of probe samples whose argmax equals the class-routed teacher target
  (`dmm.inloop.routed_agreement`), and the share whose argmax is the class the sample was
  synthesized for.
A guard that keeps FedAvg unless a refinement raises the probe score is right on a cache entry
when the candidate it picks has the best test accuracy, or at least no worse than FedAvg.

    python benchmarks/guard_probe.py runs/bench-cache/fmnist/fedavg_a0.1_k10_s1_* \\
        --json benchmarks/results/fmnist-transfer/guard_probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("entries", nargs="+", help="bench cache folders of FedAvg trainings")
    p.add_argument("--probe-images", type=int, default=512)
    p.add_argument("--probe-seed", type=int, default=7919)
    p.add_argument("--presets", nargs="+", default=["head", "transfer"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from dmm import checkpoint
    from dmm.bench.rows import dmm_config
    from dmm.bench.spec import get_preset
    from dmm.data.base import load_dataset
    from dmm.distill import _logits
    from dmm.evaluate import evaluate
    from dmm.inloop import routed_agreement
    from dmm.io import provenance, write_json
    from dmm.pipeline import preset, refine
    from dmm.synth import synthesize

    rows, data = [], None
    for entry in map(Path, args.entries):
        meta = json.loads((entry / "meta.json").read_text())
        st = meta["settings"]
        if data is None:
            data = load_dataset(st["dataset"], None)
        counts, ns = meta["label_counts"], meta["n_samples"]
        student = checkpoint.load(entry / "global.safetensors").build()
        teachers = [checkpoint.load(f).build() for f in sorted(entry.glob("client_*.safetensors"))]
        shape, rng = tuple(data.input_shape), data.pixel_range
        t0 = time.perf_counter()
        probe = synthesize(student, teachers,
                           replace(preset("default").inversion, n_images=args.probe_images),
                           num_classes=data.num_classes, input_shape=shape, seed=args.probe_seed,
                           pixel_range=rng, label_counts=counts)
        probe_s = time.perf_counter() - t0
        cands = {"fedavg": (student, 0.0, None)}
        for name in args.presets:  # exactly the bench's row configuration
            cfg = dmm_config(name, get_preset("transfer"), int(st["seed"]))
            t1 = time.perf_counter()
            model, rep = refine(student, teachers, cfg, n_samples=ns, input_shape=shape,
                                pixel_range=rng, label_counts=counts)
            cands[name] = (model, time.perf_counter() - t1,
                           rep.distillation.get("teacher_check"))
        ct = torch.as_tensor(counts)
        for name, (m, secs, check) in cands.items():
            m.eval()
            acc = evaluate(m, data.x_test, data.y_test, data.normalize,
                           num_classes=data.num_classes).accuracy
            with torch.no_grad():
                agree = routed_agreement(m, teachers, probe, ct)
                label = float((_logits(m, probe.images, True).argmax(1) == probe.labels)
                              .float().mean())
            row = {"entry": entry.name, "alpha": st["alpha"], "seed": st["seed"],
                   "candidate": name, "test_accuracy": acc, "probe_routed_agreement": agree,
                   "probe_label_accuracy": label, "refine_s": secs, "probe_s": probe_s,
                   "teacher_check": check}
            rows.append(row)
            print(f"a={st['alpha']:<5} s={st['seed']} {name:<9} test {100 * acc:6.2f}  "
                  f"probe routed {100 * agree:6.2f}  probe label {100 * label:6.2f}  "
                  f"({secs:.0f} s)", flush=True)
        if args.json:  # after every entry, so an interrupted run keeps what it measured
            write_json(args.json, {"config": vars(args), "rows": rows,
                                   "provenance": provenance()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
