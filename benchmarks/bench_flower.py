"""The Flower engine against the in-process engine, and Flower at 100 clients.

1. Agreement: `dmm train` on Fashion-MNIST with the same seed, once in process and once in
   Flower's simulation engine (one SuperNode per client, Ray); prints both global models'
   test accuracy and the largest absolute difference between their tensors.
2. Scale: 100 SuperNodes, a participation fraction, 1 round; prints the wall time of the run
   (Ray start included) and of the round alone (the strategy's clock, from sending the
   train messages to the aggregated model).

    python benchmarks/bench_flower.py --clients 10 --rounds 3 --scale-clients 100 \
        --participation 0.1

Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dmm import checkpoint
from dmm.io import provenance, write_json


def train(out: Path, *args: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dmm.cli", "train", "--out", str(out), *args],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"dmm train failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale-clients", type=int, default=100)
    ap.add_argument("--participation", type=float, default=0.1)
    ap.add_argument("--out", default="benchmarks/results/flower.json")
    args = ap.parse_args()
    common = ["--dataset", "fmnist", "--alpha", str(args.alpha), "--seed", str(args.seed),
              "--local-iters", "10"]
    res: dict = {"config": vars(args), "provenance": provenance()}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        run = [*common, "--clients", str(args.clients), "--rounds", str(args.rounds)]
        s_in = train(t / "in", *run)
        s_fl = train(t / "fl", *run, "--engine", "flower")
        acc = {e: json.loads((t / e / "train.json").read_text())["eval"][0]["accuracy"]
               for e in ("in", "fl")}
        a = checkpoint.load(t / "in" / "global.safetensors").state
        b = checkpoint.load(t / "fl" / "global.safetensors").state
        diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        same = all(torch.equal(a[k], b[k]) for k in a)
        res["agreement"] = {"accuracy_inprocess": acc["in"], "accuracy_flower": acc["fl"],
                            "max_abs_diff": diff, "bitwise_equal": same,
                            "wall_s_inprocess": round(s_in, 1), "wall_s_flower": round(s_fl, 1)}
        print(f"{args.clients} clients x {args.rounds} rounds, alpha {args.alpha}, seed "
              f"{args.seed}: in-process {100 * acc['in']:.2f}% ({s_in:.0f} s), Flower "
              f"{100 * acc['fl']:.2f}% ({s_fl:.0f} s); max |diff| {diff:.3g}, bitwise equal "
              f"{same}")
        scale = ["--clients", str(args.scale_clients), "--rounds", "1", "--participation",
                 str(args.participation), "--min-size", "10", "--no-eval"]
        s_scale = train(t / "scale", *common, *scale, "--engine", "flower")
        info = json.loads((t / "scale" / "train.json").read_text())
        chosen = len(info["history"][0]["clients"])
        res["scale"] = {"clients": args.scale_clients, "participation": args.participation,
                        "sampled": chosen, "wall_s": round(s_scale, 1),
                        "engine_s": round(info["wall_time_s"], 1),
                        "round_s": round(info["history"][0]["seconds"], 1)}
        print(f"{args.scale_clients} SuperNodes, participation {args.participation} "
              f"({chosen} trained), 1 round: {s_scale:.1f} s for the command, "
              f"{info['wall_time_s']:.1f} s inside the engine, "
              f"{info['history'][0]['seconds']:.1f} s for the round itself")
    write_json(args.out, res)


if __name__ == "__main__":
    main()
