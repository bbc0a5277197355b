"""`dmm bench`: the paper's Table 1, references and ablations as a resumable, seeded grid."""

from dmm.bench.report import mean_std, render_csv, render_markdown, write_outputs
from dmm.bench.runner import run_bench
from dmm.bench.spec import PRESETS, ROWS, BenchSpec, Cell, get_preset
from dmm.bench.store import ResultStore

__all__ = ["PRESETS", "ROWS", "BenchSpec", "Cell", "ResultStore", "get_preset", "mean_std",
           "render_csv", "render_markdown", "run_bench", "write_outputs"]
