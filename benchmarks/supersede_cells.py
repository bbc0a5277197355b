"""Move every record of one (alpha, seed) group of a results folder to its `superseded.jsonl`,
so that the group's cells run again, whole, under their current keys.

For a group whose records are sound but can no longer be extended on this machine: a cell key
names what a cell computes, not where it ran, and the cached models of a federated group
retrained on another processor differ by points (issue "benchmark protocol": bitwise determinism
holds on one machine and thread count). Mixing the old group's records with new rows computed
from the retrained models would compare rows of two different trainings in one column; moving
the old group out and rerunning it whole keeps every group one training. The records move
unchanged but for a `superseded` reason; `cells.jsonl` keeps only current cells.

    .venv/bin/python benchmarks/supersede_cells.py benchmarks/results/emoji-mm-transfer \
        --alpha 0.01 --seed 0 --reason "..."
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dmm.io import write_text


def supersede(folder: Path, alpha: float, seed: int, reason: str,
              k: int | None = None) -> int:
    """Move the group's records; returns how many moved (0 changes no file)."""
    if not reason.strip():
        raise ValueError("a superseded record needs a reason")
    cells = folder / "cells.jsonl"
    lines = cells.read_text().splitlines()
    keep, moved = [], []
    for line in lines:
        rec = json.loads(line)
        if rec["alpha"] == alpha and rec["seed"] == seed and k in (None, rec["k"]):
            rec["superseded"] = reason
            moved.append(json.dumps(rec, sort_keys=True))
        else:
            keep.append(line)
    if not moved:
        return 0
    old = folder / "superseded.jsonl"
    prior = old.read_text().splitlines() if old.exists() else []
    # the superseded file first: a crash between the writes duplicates, never loses, a record
    write_text(old, "\n".join(prior + moved) + "\n")
    write_text(cells, "\n".join(keep) + "\n" if keep else "")
    return len(moved)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--alpha", type=float, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--k", type=int, default=None, help="only this client count (default: all)")
    ap.add_argument("--reason", required=True)
    a = ap.parse_args()
    if not (a.folder / "cells.jsonl").is_file():
        print(f"supersede_cells: error: {a.folder / 'cells.jsonl'}: no such file", file=sys.stderr)
        sys.exit(2)
    try:
        n = supersede(a.folder, a.alpha, a.seed, a.reason, a.k)
    except ValueError as e:
        print(f"supersede_cells: error: --reason: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{a.folder}: {n} record(s) of alpha {a.alpha} seed {a.seed} moved to superseded.jsonl")


if __name__ == "__main__":
    main()
