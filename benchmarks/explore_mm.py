"""Why DMM's refinement does nothing on emoji-mm, and whether a weaker class tie changes that.

On the bench's cached FedAvg models (emoji-mm, paper preset, K = 10), refines the FedAvg
global model with the default DMM configuration and with the inversion's CE weight lowered,
and prints, per seed: the head's cross-entropy on the pseudo-pairs before training (how
certain the merged model already is), the largest change of the head's weights, and test
accuracy against FedAvg's.

    python benchmarks/explore_mm.py --alpha 0.01 --seeds 0 1 --ce-weights 0.5 0.05

Needs the bench cache (`dmm bench --preset paper --dataset emoji-mm --seeds 0 1`).
Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from dmm import checkpoint
from dmm import inputs as I
from dmm.data import load_dataset
from dmm.errors import DMMError
from dmm.evaluate import evaluate
from dmm.io import provenance, write_json
from dmm.pipeline import preset, refine
from dmm.statedict import state_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--ce-weights", type=float, nargs="+", default=[0.5, 0.05])
    ap.add_argument("--cache", default="runs/bench-cache/emoji-mm")
    ap.add_argument("--out", default="benchmarks/results/explore_mm.json")
    args = ap.parse_args()
    data = load_dataset("emoji-mm")
    rows = []
    for seed in args.seeds:
        found = sorted(Path(args.cache).glob(f"fedavg_a{args.alpha}_k10_s{seed}_*"))
        if not found:
            raise DMMError(f"no cached FedAvg models for alpha {args.alpha}, seed {seed} under "
                           f"{args.cache}: run the emoji-mm bench first")
        g = checkpoint.load(found[0] / "global.safetensors")
        clients = checkpoint.load_dir(found[0])
        student = g.build().eval()
        base = evaluate(student, data.x_test, data.y_test, data.normalize,
                        num_classes=data.num_classes).accuracy
        for w in args.ce_weights:
            cfg = preset("head")  # what this exploration measured (the default before issue 13)
            cfg.seed = seed
            cfg.inversion.ce_weight = w
            model, rep = refine(copy.deepcopy(student), [c.build() for c in clients], cfg,
                                n_samples=[c.n_samples for c in clients],
                                input_shape=tuple(data.input_shape),
                                pixel_range=data.pixel_range)
            pseudo = rep.pseudo
            # the CE of the buffer-aggregated model (before the head moved) on the pairs
            pre = copy.deepcopy(model)
            pre.fc.load_state_dict(student.fc.state_dict())
            with torch.no_grad():
                logits = pre(*I.args(pseudo.images))
                ce0 = float(F.cross_entropy(logits.float(), pseudo.labels))
            dfc = float((state_of(model)["fc.weight"] - g.state["fc.weight"]).abs().max())
            acc = evaluate(model, data.x_test, data.y_test, data.normalize,
                           num_classes=data.num_classes).accuracy
            row = {"seed": seed, "inversion_ce_weight": w, "pseudo_ce_before": ce0,
                   "head_max_change": dfc, "fedavg": base, "refined": acc}
            rows.append(row)
            print(f"seed {seed} ce_weight {w}: CE on pseudo-pairs {ce0:.4f}, head change "
                  f"{dfc:.2e}, accuracy {100 * base:.2f} -> {100 * acc:.2f}")
    write_json(args.out, {"alpha": args.alpha, "rows": rows, "provenance": provenance()})


if __name__ == "__main__":
    main()
