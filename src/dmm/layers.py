"""The rooms of the package and the one direction data flows through them (shared/DESIGN.md §3):
a room imports only rooms of its own layer or below. `tests/test_layers.py` checks every import
in src/dmm against this table (module-level and function-level imports alike), and
`benchmarks/import_graph.py` draws the graph (docs/imports.png).

Registries register by import from their package's `__init__` (`dmm.models` imports its ResNets,
`dmm.data` its data sets, `dmm.multimodal` adds the image + text ones, `dmm.bench` its rows):
no registry imports its members, and no lower room reaches up to fill one.
"""

LAYERS: list[tuple[str, ...]] = [
    ("errors", "config", "io", "inputs", "statedict"),          # foundations
    ("data", "models", "text"),                                  # data sets, architectures
    ("evaluate", "bn", "divergence", "permute", "synth", "distill", "checkpoint", "validate",
     "dense"),                                                   # the method's parts
    ("federated", "multimodal"),                                 # client training; image + text
    ("merging",),                                                # merging methods
    ("pipeline",),                                               # DMM
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
