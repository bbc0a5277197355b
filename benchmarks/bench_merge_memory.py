"""Peak resident memory of `dmm merge` over many checkpoints: streamed against whole.

Writes K checkpoints of a quarter-width ResNet-18 (10 classes, 1 channel, each from its own
seed, with BatchNorm statistics of their own) into a temporary folder, then runs, each in a
fresh process whose peak RSS is read with getrusage:

- `import`: the interpreter with torch and dmm imported, nothing merged (the floor);
- `stream`: `dmm merge DIR --refine none` (averaging, BN pooled), which reads the inputs
  tensor by tensor (`checkpoint.LazyState`);
- `in-memory`: the same with `--in-memory`, every input loaded whole and built as a module.

    python benchmarks/bench_merge_memory.py --k 50

Both merges must write the same bytes; the script checks it. Writes JSON under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dmm import checkpoint
from dmm.io import provenance, write_json
from dmm.models import create

ARCH = {"width": 0.25, "num_classes": 10, "in_channels": 1}
RUSAGE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
          "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak RSS (MB) of `cmd`, run as the only child of a fresh interpreter."""
    r = subprocess.run([sys.executable, "-c", RUSAGE, *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return int(r.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=50, help="number of checkpoints")
    ap.add_argument("--out", default="benchmarks/results/merge_memory.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "clients"
        for k in range(args.k):
            torch.manual_seed(k)
            m = create("resnet18", **ARCH)
            m.train()
            with torch.no_grad():
                m(torch.randn(8, 1, 32, 32) * (1 + k / args.k) + k / args.k)
            checkpoint.save(d / f"client_{k:03d}.safetensors", m, arch="resnet18",
                            arch_kwargs=ARCH, n_samples=100 + k, client_id=k)
        size_mb = sum(p.stat().st_size for p in d.iterdir()) / 2**20
        dmm = [sys.executable, "-m", "dmm.cli", "merge", str(d), "--refine", "none"]
        floor = peak_rss_mb([sys.executable, "-c", "import torch, dmm.cli, dmm.merging, "
                             "dmm.validate, safetensors.torch"])
        stream = peak_rss_mb([*dmm, "--out", f"{tmp}/s.safetensors"])
        whole = peak_rss_mb([*dmm, "--in-memory", "--out", f"{tmp}/w.safetensors"])
        same = checkpoint.load(f"{tmp}/s.safetensors").state.keys() == \
            checkpoint.load(f"{tmp}/w.safetensors").state.keys() and all(
                torch.equal(a, b) for a, b in zip(
                    checkpoint.load(f"{tmp}/s.safetensors").state.values(),
                    checkpoint.load(f"{tmp}/w.safetensors").state.values(), strict=True))
    res = {"k": args.k, "arch": "resnet18", "arch_kwargs": ARCH,
           "checkpoints_mb": round(size_mb, 1), "peak_rss_mb": {
               "import": round(floor, 1), "stream": round(stream, 1),
               "in_memory": round(whole, 1)},
           "above_import_mb": {"stream": round(stream - floor, 1),
                               "in_memory": round(whole - floor, 1)},
           "identical_output": same, "provenance": provenance()}
    print(f"{args.k} checkpoints of quarter-width ResNet-18, {size_mb:.1f} MB on disk")
    print(f"peak RSS: import only {floor:.0f} MB | streamed merge {stream:.0f} MB "
          f"(+{stream - floor:.0f}) | in-memory merge {whole:.0f} MB (+{whole - floor:.0f})")
    print(f"same merged model: {same}")
    write_json(args.out, res)
    if not same:
        raise SystemExit("the streamed and in-memory merges differ")


if __name__ == "__main__":
    main()
