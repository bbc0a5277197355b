"""Fuzz campaign: the targets of tests/test_fuzz.py with many more cases each.

    python benchmarks/fuzz_campaign.py --examples 2000

runs pytest on tests/test_fuzz.py with DMM_FUZZ_EXAMPLES set (random, not derandomized) and
hypothesis' statistics, and prints and saves, per target, the number of cases run, how many
were valid/invalid, and the outcome (a failure prints hypothesis' minimal failing example).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from dmm.io import provenance, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000, help="cases per target")
    ap.add_argument("--out", default="benchmarks/results/fuzz_campaign.json")
    args = ap.parse_args()
    env = {**os.environ, "DMM_FUZZ_EXAMPLES": str(args.examples)}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "tests/test_fuzz.py", "-p",
                        "no:cacheprovider", "--hypothesis-show-statistics", "-q"],
                       env=env, capture_output=True, text=True)
    wall = time.time() - t0
    text = r.stdout + r.stderr
    targets = {}
    for block in re.split(r"\n(?=tests/test_fuzz.py::)", text):
        m = re.match(r"tests/test_fuzz.py::(\w+)", block)
        if not m or ":" not in block:
            continue
        counts = re.findall(r"(\d+) passing, (\d+) failing, and (\d+) invalid", block)
        if counts:  # summed over hypothesis' phases (generate, shrink, ...)
            t = {"passing": sum(int(c[0]) for c in counts),
                 "failing": sum(int(c[1]) for c in counts),
                 "invalid": sum(int(c[2]) for c in counts)}
            events = re.findall(r"\* ([\d.]+)%, (.+)", block)
            if events:
                t["events_percent"] = {name.strip(): float(pct) for pct, name in events}
            targets[m.group(1)] = t
    res = {"examples_per_target": args.examples, "wall_time_s": round(wall, 1),
           "pytest_exit": r.returncode, "targets": targets, "provenance": provenance()}
    for name, t in targets.items():
        print(f"{name}: {t['passing']} passing, {t['failing']} failing, {t['invalid']} invalid")
        for ev, pct in t.get("events_percent", {}).items():
            print(f"    {pct:5.1f}%  {ev}")
    print(f"pytest exit {r.returncode} in {wall:.0f} s")
    if r.returncode != 0:
        print(text[-6000:])
    write_json(args.out, res)
    sys.exit(r.returncode)


if __name__ == "__main__":
    main()
