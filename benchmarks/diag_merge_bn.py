"""Diagnostic (not data-free): how much of a merge's failure is its BatchNorm statistics?

Merges a folder of client checkpoints with `average` and `rebasin`, evaluates with the pooled
statistics, then again after recomputing BN statistics on real training images.

    python benchmarks/diag_merge_bn.py RUN_DIR [--n-real 2000]
"""

from __future__ import annotations

import argparse
import copy

import torch

from dmm import checkpoint
from dmm.bn import recalibrate_bn
from dmm.data import load_dataset
from dmm.evaluate import evaluate
from dmm.merging import merge_states
from dmm.permute import spec_for, weight_matching


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--n-real", type=int, default=2000)
    args = ap.parse_args()
    data = load_dataset("fmnist")
    cks = checkpoint.load_dir(args.run)
    model = cks[0].build()
    states = [c.state for c in cks]
    w = [c.n_samples for c in cks]
    spec = spec_for(model)
    perms = weight_matching(spec, states[0], states[1], generator=torch.Generator().manual_seed(0))
    moved = sum(int((p != torch.arange(len(p))).any()) for p in perms.values())
    print(f"weight matching client 1 -> client 0: {moved} of {len(perms)} permutations "
          "differ from the identity")
    for i, c in enumerate(cks):
        ev = evaluate(c.build(), data.x_test, data.y_test, data.normalize)
        print(f"client {i}: {100 * ev.accuracy:.2f}%")
    g = torch.Generator().manual_seed(0)
    real = data.normalize(data.x_train[torch.randperm(len(data.x_train), generator=g)
                                       [: args.n_real]])
    for k in (len(states), 2):
        for name in ("average", "rebasin"):
            m = copy.deepcopy(model)
            m.load_state_dict(merge_states(states[:k], name, model=model, weights=w[:k]))
            pooled = evaluate(m, data.x_test, data.y_test, data.normalize).accuracy
            recalibrate_bn(m, real)
            recal = evaluate(m, data.x_test, data.y_test, data.normalize).accuracy
            print(f"{k} models, {name:<8} pooled BN {100 * pooled:6.2f}%   BN recomputed on "
                  f"{args.n_real} real images {100 * recal:6.2f}%")


if __name__ == "__main__":
    main()
