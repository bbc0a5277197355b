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
- 2026-12 (issue "transfer", the new default): `DMMConfig.teacher_check` added (false computes
  what was computed before); then `DMMConfig.check_images` (None: the check judges the pool
  itself; N: a separate probe), which changes nothing where the check is off. A checked record
  without it judged the pool itself: where its verdict was the transfer, it computed exactly
  what `check_images=None` computes; where the check fell back (then to a head-only
  refinement on the domain pool, now to preset `head`), it runs again. The
  head-only refinement that `fedavg+dmm` and `cat+dmm` ran before the default changed is now
  the row `fedavg+dmm_head` / `cat+dmm_head`: a record of
  the old row whose settings are exactly the new row's moves there (and the row joins the
  folder's spec.json rows), so that its number stays shown under the name of what it
  measured; the old row's cells run again under the new default.

- 2026-12 (issue "image + text transfer"): `inversion.text` added (how pseudo-pairs get their
  text features). Image models have no text: every value computes what was computed before,
  and the record takes the default (`drawn`). Records of image + text data sets computed free
  text features under a default then resolved to the head-only refinement: they keep their
  keys, and their cells run again.

- 2026-12 (issue "image + text transfer", the check): `DMMConfig.check_pairs` added (whether
  the teacher check judges image + text models). Where the check is off, or on image data
  sets, every value computes the same (false). An image + text record with the check on ran
  it (true): a `fedavg+dmm` record of one moves to the row `fedavg+dmm_checked`, whose
  settings are exactly its own, and the default's cell runs again.

    .venv/bin/python benchmarks/rekey_cells.py benchmarks/results/fmnist-paper [...]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from dmm.bench.spec import PAIR_DATASETS, BenchSpec, digest
from dmm.io import write_text


def translate(settings: dict, rec: dict | None = None) -> dict:
    s = copy.deepcopy(settings)
    d = s.get("row_config", {}).get("dmm")
    pairs = s.get("train", {}).get("dataset") in PAIR_DATASETS
    if d is not None and "ce_weight" in d:
        d["distillation"]["ce_weight"] = d.pop("ce_weight")
    if d is not None and not pairs:
        d["inversion"].setdefault("text", "drawn")
    if d is not None and "check_pairs" not in d:
        d["check_pairs"] = bool(pairs and d.get("teacher_check"))
    if d is not None:
        d["distillation"].setdefault("hard_weight", 0.0)
        d["distillation"].setdefault("cache_teachers", False)
        d.setdefault("teacher_check", False)
        if not d["teacher_check"]:  # the probe matters only where the check runs
            d["check_images"] = None
        elif "check_images" not in d and ((rec or {}).get("distillation") or {}).get(
                "teacher_check", {}).get("transfer"):
            # the first checked default judged the pool itself, and where it chose the
            # transfer it computed exactly what check_images=None computes
            d["check_images"] = None
    return s


RENAMED = {"fedavg+dmm": "fedavg+dmm_head", "cat+dmm": "cat+dmm_head"}
PAIR_RENAMED = {"fedavg+dmm": "fedavg+dmm_checked"}  # image + text data sets


def renamed(rec: dict) -> tuple[str, dict] | None:
    """(new row, translated settings) for a record of a row that moved, else None."""
    pairs = rec["settings"].get("train", {}).get("dataset") in PAIR_DATASETS
    new = (PAIR_RENAMED if pairs else RENAMED).get(rec["row"])
    if new is None:
        return None
    s = translate(rec["settings"], rec)
    s["row"] = new
    return new, s


def rekey(folder: Path) -> tuple[int, int, int]:
    """(re-keyed, already current, left alone) for one results folder."""
    spec_file = json.loads((folder / "spec.json").read_text())
    spec = BenchSpec.from_dict(spec_file["spec"])
    records = [json.loads(line) for line in (folder / "cells.jsonl").read_text().splitlines()]
    moved = {renamed(r)[0] for r in records if renamed(r) is not None}
    added = [r for r in sorted(moved) if r not in spec.rows]
    if added:  # the rows that now hold the moved records join the grid
        spec.rows += added
        if spec.k_values and any(r in spec.k_rows for r in RENAMED):
            spec.k_rows += [RENAMED[r] for r in RENAMED if r in spec.k_rows
                            and RENAMED[r] not in spec.k_rows]
    current = {}
    for c in spec.cells():
        settings = json.loads(json.dumps(spec.cell_settings(c), default=str))
        current[(c.alpha, c.k, c.seed, c.row)] = (spec.cell_key(c), settings)
    lines, counts = [], [0, 0, 0]
    for rec in records:
        line = json.dumps(rec, sort_keys=True)
        cell = (rec["alpha"], rec["k"], rec["seed"], rec["row"])
        key, settings = current.get(cell, (None, None))
        move = renamed(rec)
        if key is not None and rec["key"] == key:
            counts[1] += 1
        elif key is not None and translate(rec["settings"], rec) == settings:
            assert digest(settings) == key
            rec.update(key=key, settings=settings, rekeyed_from=rec["key"])
            line = json.dumps(rec, sort_keys=True)
            counts[0] += 1
        elif move is not None and current.get(cell[:3] + (move[0],), (None, None))[1] == move[1]:
            key = current[cell[:3] + (move[0],)][0]
            assert digest(move[1]) == key
            rec.update(key=key, settings=move[1], row=move[0], rekeyed_from=rec["key"],
                       renamed_from=rec["row"])
            line = json.dumps(rec, sort_keys=True)
            counts[0] += 1
        else:
            counts[2] += 1
        lines.append(line)
    write_text(folder / "cells.jsonl", "\n".join(lines) + "\n")
    if added:
        spec_file["spec"] = spec.to_dict()
        write_text(folder / "spec.json", json.dumps(spec_file, indent=2) + "\n")
    return tuple(counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    for folder in ap.parse_args().folders:
        done, current, left = rekey(folder)
        print(f"{folder}: {done} re-keyed, {current} already current, {left} left alone")


if __name__ == "__main__":
    main()
