"""`dmm bench`: the paper's Table 1, references and ablations as a resumable, seeded grid."""

# importing registers the built-in rows
from dmm.bench import rows  # noqa: F401  isort: skip
from dmm.bench.program import BenchOutput, bench
from dmm.bench.registry import ROWS, Row, get_row, register_row
from dmm.bench.report import mean_std, render_csv, render_markdown, write_outputs
from dmm.bench.runner import run_bench
from dmm.bench.spec import PRESETS, BenchSpec, Cell, get_preset
from dmm.bench.store import ResultStore

__all__ = ["PRESETS", "ROWS", "BenchOutput", "BenchSpec", "Cell", "ResultStore", "Row", "bench",
           "get_preset", "get_row", "mean_std", "register_row", "render_csv", "render_markdown",
           "run_bench", "write_outputs"]
