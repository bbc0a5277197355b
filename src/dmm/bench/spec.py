"""What a bench runs: the grid (data set x alpha x K x row x seed), its budget and presets.

A *cell* is one (dataset, alpha, K, seed, row). Its cache key hashes every setting that can change
its number: the data set and its size, the architecture, the training budget of the regime it
consumes, and the row's own configuration (DMM config, merging parameters, DENSE budget).
Settings that cannot change the number (output paths, progress bars) are not in the key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from dmm.bench.registry import ROWS, W0, get_row
from dmm.errors import DMMError

# ---- rows (registered in dmm.bench.registry; presets list their names) -------------------
TABLE1 = ["fedavg", "fedprox", "fedbn", "fedavg+dmm", "pleas", "rebasin", "cat", "cat+dmm"]
# "oracle": trained centrally to convergence (oracle_epochs over all client data); "central":
# the same network at rounds x local iterations steps (1/K of FedAvg's compute)
REFERENCES = ["ensemble", "oracle", "central", "dense"]
ABLATIONS = ["fedavg+buffer", "fedavg+dmm_paper", "fedavg+dmm_head", "cat+buffer",
             "cat+dmm_paper", "cat+dmm_head"]
# the transfer grid: federated rows at alpha 0.1 and 0.01, one-shot rows at every alpha
FEDERATED_TRANSFER = ["fedavg", "fedavg+dmm", "fedavg+dmm_head", "fedavg+dmm_paper",
                      "fedavg+dmm_transfer", "fedavg+dmm_round", "fedavg+dmm_round_head"]
ONESHOT_TRANSFER = ["ensemble", "ensemble_routed", "average", "average+dmm", "dense",
                    "average+dmm_merged", "average+dmm_plain", "average+dmm_estimated"]
# from a pretrained start W_0 (issue "benchmark protocol"): Table 1, the references and the
# ablations on clients fine-tuned from W_0 (needs public_slice > 0)
FROM_W0 = ["pretrain"] + [f"{r}@w0" for r in (
    "fedavg", "fedavg+dmm", "pleas", "rebasin", "cat", "cat+dmm", "average", "average+dmm",
    "task_arithmetic", "ties", "ensemble", "ensemble_routed", "dense", *ABLATIONS)]
# image + text data sets (ImageTextNet): only the rows registered with image_text=True apply.
# Git Re-Basin needs a permutation spec of the model, PLeaS and CAT hook single-input conv/linear
# layers, DENSE generates images only; none of them has an image + text form here.
PAIR_DATASETS = ("emoji-mm", "crisismmd")
# regimes trained on the union of the client data, one model for every split
CENTRAL = ("central", "oracle")
# regimes that do not depend on the split: those, and W_0 (the public slice is one fixed draw)
SPLIT_FREE = CENTRAL + ("pretrain",)
# rows a preset adds for image + text data sets: the pair inversion's own ablations
PAIR_ROWS = {"transfer": ["fedavg+dmm_free", "fedavg+dmm_head_free", "fedavg+dmm_checked"]}


@dataclass
class BenchSpec:
    dataset: str = "fmnist"
    data_root: str | None = None
    n_train: int | None = None           # subsample (None = the whole split)
    n_test: int | None = None
    arch: str = "resnet18"
    width: float = 0.25
    alphas: list[float] = field(default_factory=lambda: [0.5, 0.1, 0.01])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    clients: int = 10
    rows: list[str] = field(default_factory=lambda: TABLE1 + REFERENCES + ABLATIONS)
    k_values: list[int] = field(default_factory=list)   # K ablation (besides `clients`)
    k_alphas: list[float] = field(default_factory=lambda: [0.01])
    k_rows: list[str] = field(default_factory=lambda: ["fedavg", "fedavg+buffer", "fedavg+dmm",
                                                        "fedavg+dmm_head"])
    rounds: int = 10
    local_iters: int = 10
    batch_size: int = 128
    lr: float = 0.05
    mu: float = 0.01                     # FedProx
    oracle_epochs: int = 5               # the converged oracle: passes over all client data
    # the shared pretrained start W_0 (rows "...@w0"): training samples withheld from every
    # split as the server's public slice (0: none, and no W_0), and W_0's epochs over it
    public_slice: int = 0
    pretrain_epochs: int = 5
    min_size: int = 10
    # rows listed here run only at these alphas (the transfer grid: federated rows at 0.1 and
    # 0.01, one-shot rows at every alpha); rows not listed run at every alpha
    row_alphas: dict[str, list[float]] = field(default_factory=dict)
    # DMM's budget (and DENSE's: images x iterations); None keeps each preset's own
    inversion_images: int | None = 384
    inversion_iters: int | None = 150
    distill_steps: int | None = 200
    dense_budget_scale: float = 1.0
    compile: bool = True                 # torch.compile the inversion (3.6x faster steps)
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BenchSpec:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise DMMError(f"unknown bench setting(s): {', '.join(unknown)}")
        return cls(**d)

    def check_types(self) -> None:
        """Every setting of the right type (values from --set arrive as parsed JSON)."""
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return is_int(v) or isinstance(v, float)

        def is_str(v):
            return isinstance(v, str)

        checks = {"integer": (is_int, _INT), "number": (is_num, _NUM), "string": (is_str, _STR),
                  "true or false": (lambda v: isinstance(v, bool), ("compile",))}
        for kind, (ok, names) in checks.items():
            for name in names:
                v = getattr(self, name)
                if not ok(v) and not (v is None and name in _OPTIONAL):
                    raise DMMError(f"bench setting {name} must be {kind}, got {v!r}")
        for name, ok, kind in (("alphas", is_num, "numbers"), ("k_alphas", is_num, "numbers"),
                               ("seeds", is_int, "integers"), ("k_values", is_int, "integers"),
                               ("rows", is_str, "row names"), ("k_rows", is_str, "row names")):
            v = getattr(self, name)
            if not isinstance(v, list) or not all(ok(x) for x in v):
                raise DMMError(f"bench setting {name} must be a list of {kind}, got {v!r}")
        if not isinstance(self.row_alphas, dict) or not all(
                isinstance(v, list) and all(is_num(a) for a in v)
                for v in self.row_alphas.values()):
            raise DMMError(f"bench setting row_alphas must map row names to lists of alphas, "
                           f"got {self.row_alphas!r}")

    def validate(self) -> None:
        self.check_types()
        if not self.rows:
            raise DMMError("no bench rows given")
        bad = [r for r in self.rows + self.k_rows if r not in ROWS]
        if bad:
            raise DMMError(f"unknown bench row(s) {', '.join(bad)}; choose from "
                           f"{', '.join(ROWS)}")
        bad = [r for r in self.row_alphas if r not in self.rows]
        if bad:
            raise DMMError(f"row_alphas names row(s) {', '.join(bad)} that the grid does not run")
        if self.public_slice < 0:
            raise DMMError(f"public_slice must be >= 0, got {self.public_slice}")
        starts = [r for r in dict.fromkeys(self.rows + self.k_rows)
                  if ROWS[r].regime == "pretrain" or ROWS[r].regime.endswith(W0)]
        if starts and not self.public_slice:
            raise DMMError(f"row(s) {', '.join(starts)} start from the pretrained W_0, which "
                           f"trains on a public slice: set public_slice (e.g. 5000)")
        if (self.inversion_images is None) != (self.inversion_iters is None):
            raise DMMError("inversion_images and inversion_iters are set together (or both "
                           "None: each preset's own budget)")
        if self.arch == "image_text":
            bad = [r for r in self.rows + self.k_rows if not ROWS[r].image_text]
            if bad:
                raise DMMError(f"row(s) {', '.join(bad)} do not apply to image + text models; "
                               f"these do: {', '.join(n for n, r in ROWS.items() if r.image_text)}")
        if not self.alphas or any(not a > 0 for a in self.alphas):
            raise DMMError(f"alphas must be > 0, got {self.alphas}")
        if not self.seeds:
            raise DMMError("no seeds given")
        if self.clients < 2 or any(k < 2 for k in self.k_values):
            raise DMMError("every number of clients must be >= 2")
        for name in ("rounds", "local_iters", "oracle_epochs", "pretrain_epochs", "batch_size",
                     "min_size", "inversion_images", "inversion_iters", "distill_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise DMMError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise DMMError(f"device must be cpu or cuda[:N], got {self.device!r}")

    # ---- the grid --------------------------------------------------------------------------
    def cells(self) -> list[Cell]:
        """Every cell once (repeated alphas, seeds, rows or K values count once)."""
        out = [Cell(a, self.clients, s, r) for a in self.alphas for s in self.seeds
               for r in self.rows if a in self.row_alphas.get(r, [a])]
        for k in self.k_values:
            if k == self.clients:
                continue
            out += [Cell(a, k, s, r) for a in self.k_alphas for s in self.seeds
                    for r in self.k_rows]
        return list(dict.fromkeys(out))

    def train_settings(self, regime: str, alpha: float, k: int, seed: int) -> dict:
        """Everything that determines the client models of one regime (the training key)."""
        d = {"dataset": self.dataset, "n_train": self.n_train, "arch": self.arch,
             "width": self.width, "regime": regime, "seed": seed, "rounds": self.rounds,
             "local_iters": self.local_iters, "batch_size": self.batch_size, "lr": self.lr}
        if regime in ("oracle", "pretrain"):  # their budget is epochs, not rounds
            del d["rounds"], d["local_iters"]
            d["epochs"] = self.oracle_epochs if regime == "oracle" else self.pretrain_epochs
        if regime not in SPLIT_FREE:  # the centrally trained models ignore the split
            d.update(alpha=alpha, clients=k, min_size=self.min_size)
        if regime == "fedprox":
            d["mu"] = self.mu
        if self.public_slice:  # only when set, so that the keys of the other cells stay put
            d["public_slice"] = self.public_slice
        if regime.endswith(W0):  # started from W_0: its training is part of theirs
            d["start"] = self.train_settings("pretrain", alpha, k, seed)
        # only when set, so that the keys of the default (CPU, built-in data) cells stay put
        if self.data_root is not None:
            d["data_root"] = str(self.data_root)
        if self.device != "cpu":
            d["device"] = self.device
        return d

    def cell_settings(self, cell: Cell) -> dict:
        row = get_row(cell.row)
        regime = row.regime
        d = {"row": cell.row, "n_test": self.n_test,
             "train": self.train_settings(regime, cell.alpha, cell.k, cell.seed),
             "row_config": row.config(self, cell.seed)}
        if regime in SPLIT_FREE:  # one model for every split, but the rare classes are the split's
            d["split"] = {"alpha": cell.alpha, "k": cell.k, "min_size": self.min_size}
        return d

    def cell_key(self, cell: Cell) -> str:
        return digest(self.cell_settings(cell))


_INT = ("clients", "rounds", "local_iters", "oracle_epochs", "public_slice", "pretrain_epochs",
        "batch_size", "min_size", "inversion_images", "inversion_iters", "distill_steps",
        "n_train", "n_test")
_NUM = ("width", "lr", "mu", "dense_budget_scale")
_STR = ("dataset", "arch", "device", "data_root")
_OPTIONAL = ("n_train", "n_test", "data_root", "inversion_images", "inversion_iters",
             "distill_steps")


@dataclass(frozen=True)
class Cell:
    alpha: float
    k: int
    seed: int
    row: str


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


PRESETS: dict[str, BenchSpec] = {
    # every row at alpha 0.01, one seed, a smaller budget: <= 15 min on 2 CPU cores
    # (without the converged oracle: its 5 epochs would double the preset's wall time)
    "quick": BenchSpec(alphas=[0.01], seeds=[0], rounds=5, inversion_images=256,
                       inversion_iters=100, distill_steps=100,
                       rows=[r for r in TABLE1 + REFERENCES + ABLATIONS if r != "oracle"]),
    # the paper's grid, sized by measurement for 2 CPU cores (README, "Benchmark")
    "paper": BenchSpec(alphas=[0.5, 0.1, 0.01], seeds=[0, 1, 2], rounds=10,
                       k_values=[5, 10, 20]),
    # does DMM carry what the clients know (issue 13): DESIGN §7 protocol (60 rounds x 10
    # iterations), each DMM preset at its own budget
    "transfer": BenchSpec(alphas=[0.5, 0.1, 0.01], seeds=[0, 1, 2], rounds=60,
                          rows=FEDERATED_TRANSFER + ONESHOT_TRANSFER,
                          row_alphas={r: [0.1, 0.01] for r in FEDERATED_TRANSFER},
                          inversion_images=None, inversion_iters=None, distill_steps=None),
}


def get_preset(name: str, **overrides) -> BenchSpec:
    if name not in PRESETS:
        raise DMMError(f"unknown bench preset {name!r}; choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(BenchSpec.__dataclass_fields__))
    if unknown:
        raise DMMError(f"unknown bench setting(s) {', '.join(unknown)} (--set KEY=VALUE takes "
                       f"a field of dmm.bench.BenchSpec)")
    spec = replace(PRESETS[name], **overrides)
    if "rows" in overrides and "row_alphas" not in overrides:
        # a subset of the preset's rows keeps the preset's alphas for the rows it names
        spec.row_alphas = {r: a for r, a in spec.row_alphas.items() if r in spec.rows}
    if spec.dataset in PAIR_DATASETS:  # image + text: the model and the rows that apply
        if "arch" not in overrides:
            spec.arch = "image_text"
        if "rows" not in overrides:
            extra = PAIR_ROWS.get(name, [])
            spec.rows = [r for r in spec.rows if get_row(r).image_text] + extra
            alphas = {r: a for r, a in spec.row_alphas.items() if r in spec.rows}
            if "fedavg+dmm" in alphas:  # the extra rows at the alphas of the row they ablate
                alphas.update({r: alphas["fedavg+dmm"] for r in extra})
            spec.row_alphas = alphas
        if "k_values" not in overrides:
            spec.k_values = []
    return spec
