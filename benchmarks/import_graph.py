"""Draw the import graph of src/dmm by room, one row per layer of dmm.layers (docs/imports.png).

Edges are every import between rooms, module-level or inside a function; an edge that points up
(to a higher layer) would be drawn red, and tests/test_layers.py fails on it.

    .venv/bin/python benchmarks/import_graph.py --out docs/imports.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dmm.layers import LAYERS, layer_of, package_imports, room_of  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src" / "dmm"


def room_edges() -> set[tuple[str, str]]:
    return {(room_of(m), room_of(t)) for m, targets in package_imports(SRC).items()
            for t in targets if room_of(m) and room_of(t) and room_of(m) != room_of(t)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/imports.png")
    args = ap.parse_args()
    pos = {}
    for y, rooms in enumerate(LAYERS):
        for x, r in enumerate(rooms):
            pos[r] = (x - (len(rooms) - 1) / 2, y)
    edges = room_edges()
    fig, ax = plt.subplots(figsize=(11, 8))
    for a, b in sorted(edges):
        up = layer_of(b) > layer_of(a)
        (x0, y0), (x1, y1) = pos[a], pos[b]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="->", lw=1.6 if up else 0.6, alpha=0.9 if up
                                    else 0.35, color="red" if up else "tab:blue",
                                    shrinkA=12, shrinkB=12,
                                    connectionstyle="arc3,rad=0.08"))
    for r, (x, y) in pos.items():
        ax.text(x, y, r, ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="round", fc="white", ec="0.4"))
    ax.set_xlim(-5, 5)
    ax.set_ylim(-0.7, len(LAYERS) - 0.3)
    ax.axis("off")
    n_up = sum(layer_of(b) > layer_of(a) for a, b in edges)
    ax.set_title(f"dmm: imports between rooms, lower layers at the bottom "
                 f"({len(edges)} edges, {n_up} upward)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}: {len(edges)} edges, {n_up} upward")


if __name__ == "__main__":
    main()
