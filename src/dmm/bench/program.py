"""`dmm bench` as one library call: resolve the preset, run the grid (or only render it), write
tables, CSV and plots, and optionally a README section. The command line wraps it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dmm.bench.report import check_readme, render_markdown, update_readme, write_outputs
from dmm.bench.runner import load_bench_data, preflight, run_bench
from dmm.bench.spec import BenchSpec, get_preset
from dmm.bench.store import ResultStore
from dmm.errors import DMMError
from dmm.io import ensure_writable_dir, write_json

log = logging.getLogger(__name__)


@dataclass
class BenchOutput:
    spec: BenchSpec
    out: Path
    records: list[dict]            # the preset's cells found in out/cells.jsonl
    table: str                     # the markdown tables
    paths: dict                    # what was written (tables, CSV, plots)
    seconds: float | None          # wall time of the run (None: rendered only)


def bench(preset: str = "quick", *, overrides: dict | None = None, out: str | Path | None = None,
          cache_dir: str | Path = "runs/bench-cache", render_only: bool = False,
          readme: str | Path | None = None, progress: bool = True,
          report: Callable[[str], None] = log.info) -> BenchOutput:
    """Run every cell of the preset (with `overrides` of BenchSpec fields) that
    `out/cells.jsonl` does not hold yet, then render. `out` defaults to
    benchmarks/results/<dataset>-<preset>; `readme` gets the tables in its
    `<!-- dmm-bench:<dataset>-<preset> -->` section. Everything that can fail on the input (the
    preset, a setting, the data set, a split, the README) fails before any output."""
    spec = get_preset(preset, **(overrides or {}))
    spec.validate()
    out = Path(out or f"benchmarks/results/{spec.dataset}-{preset}")
    section = f"{spec.dataset}-{preset}"
    if readme:  # a bad README path fails now, not after hours of work
        check_readme(Path(readme), section)
    seconds = None
    if render_only:
        store = ResultStore(out / "cells.jsonl")
        if not len(store):
            raise DMMError(f"{out / 'cells.jsonl'}: no results to render")
    else:
        data = load_bench_data(spec)  # a missing or malformed data set fails before any output
        preflight(spec, data)         # so does a split that cannot be drawn
        ensure_writable_dir(out)
        ensure_writable_dir(cache_dir)
        write_json(out / "spec.json", {"preset": preset, "spec": spec.to_dict()})
        t0 = time.perf_counter()
        store = run_bench(spec, out, cache_dir, data=data, progress=progress, report=report)
        seconds = time.perf_counter() - t0
    wanted = {spec.cell_key(c) for c in spec.cells()}
    records = [r for k, r in store.records.items() if k in wanted]
    if not records:
        raise DMMError(f"{out / 'cells.jsonl'} holds no cell of this preset and settings")
    paths = write_outputs(records, spec, out)
    table = render_markdown(records, spec)
    if readme:
        update_readme(Path(readme), section, table)
    return BenchOutput(spec, out, records, table, paths, seconds)
