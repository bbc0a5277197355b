"""The package's import graph: data flows one way (dmm.layers), and dmm.bench has no cycle."""

from __future__ import annotations

from pathlib import Path

from dmm.layers import LAYERS, layer_of, package_imports
from dmm.layers import room_of as _room

SRC = Path(__file__).resolve().parents[1] / "src" / "dmm"


def _modules() -> dict[str, set[str]]:
    return package_imports(SRC)


def test_every_room_is_in_one_layer():
    rooms = {_room(m) for m in _modules()} - {None}
    listed = [r for layer in LAYERS for r in layer]
    assert len(listed) == len(set(listed))
    assert rooms == set(listed)


def test_no_room_imports_a_higher_room():
    # Prepare
    graph = _modules()
    # Execute
    upward = sorted((m, t) for m, targets in graph.items() for t in targets
                    if _room(m) and _room(t) and _room(t) in {r for layer in LAYERS for r in layer}
                    and layer_of(_room(t)) > layer_of(_room(m)))
    # Assert
    assert upward == []


def test_data_and_models_never_import_multimodal():
    graph = _modules()
    bad = [(m, t) for m, targets in graph.items() for t in targets
           if _room(m) in ("data", "models") and _room(t) == "multimodal"]
    assert bad == []


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for t in sorted(graph.get(n, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle_between_rooms_or_inside_bench():
    graph = _modules()
    rooms: dict[str, set[str]] = {}
    for m, targets in graph.items():
        if _room(m):
            rooms.setdefault(_room(m), set()).update(
                _room(t) for t in targets if _room(t) and _room(t) != _room(m))
    assert _cycle(rooms) is None
    bench = {m: {t for t in ts if t.startswith("dmm.bench.") and t in graph}
             for m, ts in graph.items() if m.startswith("dmm.bench.")}
    assert _cycle(bench) is None
    # and a cycle is found where there is one
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
