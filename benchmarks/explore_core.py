"""Exploration of DMM variants on one FedAvg run (the scratch tool behind docs/dmm-core.md).

    python benchmarks/explore_core.py RUN base
    BUF=counts python benchmarks/explore_core.py RUN syn MODE N ITERS 'INV_JSON' 'VARIANTS_JSON'

`base` prints FedAvg, the buffer-aggregation weightings, every client and the divergence table.
`syn` synthesizes pseudo-data (cached under $DMM_EXPLORE_CACHE, default runs/explore) with
InversionConfig(mode=MODE, n_images=N, iterations=ITERS, **INV_JSON) against the buffered student
(BUF=counts: num_batches_tracked weights, else sample counts), then trains one copy of the
student per variant: VARIANTS_JSON maps a name to DistillConfig fields plus `teachers` (client
indices, default all) and `recal` ("all": recalibrate BN on the pseudo-data first).
Single seed, single run: leads, not results.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dmm import checkpoint
from dmm.bn import aggregate_bn_buffers, recalibrate_bn
from dmm.data import load_dataset
from dmm.distill import DistillConfig, distill
from dmm.divergence import divergence_scores
from dmm.evaluate import evaluate, rare_classes
from dmm.statedict import state_of
from dmm.synth import InversionConfig, save_grid, synthesize

run, what = Path(sys.argv[1]), sys.argv[2]
data = load_dataset("fmnist")
glob = checkpoint.load(run / "global.safetensors").build().eval()
clients = checkpoint.load_dir(run)
teachers = [c.build().eval() for c in clients]
n = [c.n_samples for c in clients]
part = json.loads((run / "partition.json").read_text())
rare = rare_classes(np.array(part["label_counts"]))
lo, hi = (0 - data.mean[0]) / data.std[0], (1 - data.mean[0]) / data.std[0]


def ev(m, tag):
    r = evaluate(m, data.x_test, data.y_test, data.normalize)
    per = [round(100 * x) for x in r.per_class]
    print(f"{tag:50s} acc {100 * r.accuracy:6.2f}  rare {100 * r.class_mean(rare):6.2f}  "
          f"per-class {per}", flush=True)


def buffered(weights):
    m = copy.deepcopy(glob)
    states = [state_of(t) for t in teachers]
    m.load_state_dict(aggregate_bn_buffers(states, m, weights=weights, into=state_of(m)))
    return m.eval()


if what == "base":
    print("rare classes", rare, "sizes", n)
    ev(glob, "fedavg")
    ev(buffered(n), "fedavg + buffer (samples)")
    ev(buffered(None), "fedavg + buffer (counts)")
    for i, t in enumerate(teachers):
        ev(t, f"client {i} n={n[i]} own={np.argmax(part['label_counts'][i])}")
    st = buffered(n)
    print(divergence_scores([state_of(t) for t in teachers], state_of(st), st).table())
    sys.exit()

mode, nimg, iters = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
extra = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
variants = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
student = buffered(None if os.environ.get("BUF") == "counts" else n)
digest = hashlib.md5(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:6]
cache = Path(os.environ.get("DMM_EXPLORE_CACHE", "runs/explore"))
path = cache / f"pseudo_{run.name}_{mode}_{nimg}_{iters}_{digest}.pt"
if path.exists():
    pd = torch.load(path, weights_only=True)
else:
    cfg = InversionConfig(n_images=nimg, iterations=iters, mode=mode, **extra)
    t0 = time.time()
    ps = synthesize(student, teachers, cfg, num_classes=10, input_shape=(1, 32, 32),
                    pixel_range=(lo, hi), seed=0)
    b = ps.info["batches"]
    mean = {k: np.mean([x[k] for x in b]) for k in ("bn_initial", "bn_final", "ce_final")}
    print(f"synth {time.time() - t0:.1f} s; bn {mean['bn_initial']:.1f} -> "
          f"{mean['bn_final']:.1f}; ce {mean['ce_final']:.2f}")
    pd = {"images": ps.images, "labels": ps.labels, "source": ps.source}
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(pd, path)
    save_grid(ps.images, ps.labels, path.with_suffix(".png"), mean=data.mean, std=data.std)
imgs, labels, src = pd["images"], pd["labels"], pd["source"]
with torch.no_grad():
    agree = float((student(imgs).argmax(1) == labels).float().mean())
print(f"student agrees with the pseudo-labels on {100 * agree:.1f}%")
ev(student, "buffered student")
# the variants were written against DistillConfig's earlier defaults (Adam 1e-3, whole network,
# no CE term); DistillConfig now defaults to DMM's own refinement (SGD 1e-2, head, CE)
OLD_DEFAULTS = {"optimizer": "adam", "lr": 1e-3, "trainable": "all", "ce_weight": 0.0}
for name, v in variants.items():
    sel = v.pop("teachers", "all")
    recal = v.pop("recal", None)
    base = copy.deepcopy(student)
    if recal:
        recalibrate_bn(base, imgs)
    chosen = list(range(len(teachers))) if sel == "all" else sel
    t0 = time.time()
    m, rep = distill(base, [teachers[i] for i in chosen], imgs, labels,
                     DistillConfig(**{**OLD_DEFAULTS, **v}), seed=0)
    kept = np.round(rep.kept_fraction, 2).tolist()
    ev(m, f"{name} ({time.time() - t0:.0f}s) kept {kept}")
