"""Re-key committed bench records after a change of configuration *form* that computes the same
thing, so that `dmm bench` finds them instead of rerunning hours of cells.

Each record stores the settings its key was hashed from. A record is re-keyed only when its
stored settings, translated by the documented rules below, equal exactly the settings the current
code computes for its cell; any other record keeps its old key (and its cell runs again).

Rules (each a change of form, not of computation):
- 2026-12 (issue "one owner"): the CE weight of DMM's refinement had two fields,
  `DMMConfig.ce_weight` (used) and `DistillConfig.ce_weight` (overwritten by refine, so unused).
  There is one now, `distillation.ce_weight`: the old top-level value moves there.
- 2026-12 (issue "transfer"): `distillation.hard_weight` and `distillation.cache_teachers`
  added; 0.0 (no hard-sample emphasis) and false (teachers run on every step) compute exactly
  what was computed before they existed.

    .venv/bin/python benchmarks/rekey_cells.py benchmarks/results/fmnist-paper [...]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from dmm.bench.spec import BenchSpec, digest
from dmm.io import write_text


def translate(settings: dict) -> dict:
    s = copy.deepcopy(settings)
    d = s.get("row_config", {}).get("dmm")
    if d is not None and "ce_weight" in d:
        d["distillation"]["ce_weight"] = d.pop("ce_weight")
    if d is not None:
        d["distillation"].setdefault("hard_weight", 0.0)
        d["distillation"].setdefault("cache_teachers", False)
    return s


def rekey(folder: Path) -> tuple[int, int, int]:
    """(re-keyed, already current, left alone) for one results folder."""
    spec = BenchSpec.from_dict(json.loads((folder / "spec.json").read_text())["spec"])
    current = {}
    for c in spec.cells():
        settings = json.loads(json.dumps(spec.cell_settings(c), default=str))
        current[(c.alpha, c.k, c.seed, c.row)] = (spec.cell_key(c), settings)
    lines, counts = [], [0, 0, 0]
    for line in (folder / "cells.jsonl").read_text().splitlines():
        rec = json.loads(line)
        cell = (rec["alpha"], rec["k"], rec["seed"], rec["row"])
        key, settings = current.get(cell, (None, None))
        if key is not None and rec["key"] == key:
            counts[1] += 1
        elif key is not None and translate(rec["settings"]) == settings:
            assert digest(settings) == key
            rec.update(key=key, settings=settings, rekeyed_from=rec["key"])
            line = json.dumps(rec, sort_keys=True)
            counts[0] += 1
        else:
            counts[2] += 1
        lines.append(line)
    write_text(folder / "cells.jsonl", "\n".join(lines) + "\n")
    return tuple(counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    for folder in ap.parse_args().folders:
        done, current, left = rekey(folder)
        print(f"{folder}: {done} re-keyed, {current} already current, {left} left alone")


if __name__ == "__main__":
    main()
