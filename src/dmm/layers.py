"""The rooms of the package and the one direction data flows through them (shared/DESIGN.md §3):
a room imports only rooms of its own layer or below. `tests/test_layers.py` checks every import
in src/dmm against this table (module-level and function-level imports alike), and
`benchmarks/import_graph.py` draws the graph (docs/imports.png).

Registries register by import from their package's `__init__` (`dmm.models` imports its ResNets,
`dmm.data` its data sets, `dmm.multimodal` adds the image + text ones, `dmm.bench` its rows):
no registry imports its members, and no lower room reaches up to fill one.
"""

from __future__ import annotations

import ast
from pathlib import Path

LAYERS: list[tuple[str, ...]] = [
    ("errors", "config", "io", "inputs", "statedict"),          # foundations
    ("data", "models", "text"),                                  # data sets, architectures
    ("evaluate", "bn", "divergence", "permute", "synth", "distill", "checkpoint", "validate",
     "sources", "dense"),                                                   # the method's parts
    ("federated", "multimodal"),                                 # client training; image + text
    ("merging",),                                                # merging methods
    ("pipeline", "inloop"),                                      # DMM; DMM between rounds
    ("flower",),                                                 # the Flower apps
    ("jobs",),                                                   # one call per job
    ("bench", "demo"),                                           # the grid; the showcase
    ("cli", "layers"),                                           # the command line
]


def layer_of(room: str) -> int:
    for i, rooms in enumerate(LAYERS):
        if room in rooms:
            return i
    raise KeyError(f"room {room!r} is in no layer of dmm.layers.LAYERS")


def room_of(module: str) -> str | None:
    """`dmm.bench.rows` -> `bench`; the package itself has no room."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "dmm" else None


def file_imports(path: Path) -> set[str]:
    """dmm modules a file imports anywhere (module level or inside functions), except under
    `if TYPE_CHECKING:`; `from dmm.x import y` counts as dmm.x and dmm.x.y."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dmm"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("dmm"))
    return out


def package_imports(src: Path) -> dict[str, set[str]]:
    """Module name -> the dmm modules it imports, for every file of the package at `src`."""
    out = {}
    for path in src.rglob("*.py"):
        rel = path.relative_to(src.parent).with_suffix("")
        out[".".join(p for p in rel.parts if p != "__init__")] = file_imports(path)
    return out
