"""The bench's rows in one registry (after MergeKit's `merge_methods/registry.py`).

A *row* is one line of the paper's tables: a name, a pretty name, the regime whose trained models
it consumes, how it builds its predictor from a group of trained models, and its own settings as
they enter a cell's cache key. Adding a row is one `register_row` call (in `dmm.bench.rows` for
the built-in ones) and its test; the spec, the runner and the report read everything from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dmm.errors import DMMError

# "pretrain": the shared start W_0, trained centrally on the public slice; a regime with the
# suffix W0 is the same training started from W_0 instead of the seeded random initialization
W0 = "_w0"
REGIMES = ("fedavg", "fedprox", "fedbn", "oneshot", "central", "oracle", "pretrain",
           "fedavg" + W0, "oneshot" + W0)
SECTIONS = ("table1", "reference", "ablation", "w0")  # w0: Table 1 and references from W_0


def no_config(spec: Any, seed: int) -> dict:
    """A row without settings of its own (its number depends on the trained models only)."""
    return {}


@dataclass(frozen=True)
class Row:
    name: str
    pretty_name: str
    regime: str                                   # whose trained models it consumes
    build: Callable[[Any], tuple[Any, dict]]      # build(group) -> (model or test logits, info)
    config: Callable[[Any, int], dict] = no_config  # config(spec, seed): enters the cache key
    section: str = "table1"                       # the report table it belongs to
    ablation: tuple[str, int] | None = None       # (family, position) in the ablation table
    image_text: bool = False                      # applies to image + text models too


ROWS: dict[str, Row] = {}


def register_row(row: Row) -> Row:
    if row.name in ROWS:
        raise DMMError(f"bench row {row.name!r} is registered already")
    if row.regime not in REGIMES:
        raise DMMError(f"bench row {row.name!r}: unknown regime {row.regime!r}; choose one of "
                       f"{', '.join(REGIMES)}")
    if row.section not in SECTIONS:
        raise DMMError(f"bench row {row.name!r}: unknown section {row.section!r}; choose one "
                       f"of {', '.join(SECTIONS)}")
    ROWS[row.name] = row
    return row


def get_row(name: str) -> Row:
    if name not in ROWS:
        raise DMMError(f"unknown bench row {name!r}; choose from {', '.join(ROWS)}")
    return ROWS[name]


def rows_in(*sections: str) -> list[str]:
    """Row names of the given sections, in registration order."""
    return [n for n, r in ROWS.items() if r.section in sections]


def ablation_rows() -> list[str]:
    """The ablation table's rows: family by family (in order of first registration), each
    family's rows by position."""
    fams = list(dict.fromkeys(r.ablation[0] for r in ROWS.values() if r.ablation))
    ranked = [(fams.index(r.ablation[0]), r.ablation[1], n) for n, r in ROWS.items()
              if r.ablation]
    return [n for _, _, n in sorted(ranked)]
