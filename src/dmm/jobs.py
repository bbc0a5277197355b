"""One library call per job: `train`, `evaluate` and `inspect` (the bench's is
`dmm.bench.program.bench`). The command line parses arguments, calls one of these, and prints;
the bench, the demo and notebooks call the same functions (after fusion_bench's
`programs/*.run()` beside its three-line `scripts/cli.py`).

Each job validates everything it is given before it writes anything: a bad data set, split or
architecture fails with one `DMMError` and leaves no output folder behind.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dmm import checkpoint
from dmm.config import check_fields
from dmm.data import Partition, PartitionConfig, load_dataset
from dmm.data.base import ImageDataset
from dmm.errors import DMMError
from dmm.evaluate import evaluate as evaluate_model
from dmm.federated import FederatedConfig, FederatedResult, run_federated
from dmm.io import ensure_writable_dir, provenance, save_with, write_json
from dmm.models import arch_kwargs, create
from dmm.statedict import StateDict

log = logging.getLogger(__name__)
ENGINES = ("inprocess", "flower")


# ---- data --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataConfig:
    """Which data set, from where, and how much of it (None: the whole split)."""

    dataset: str = "fmnist"
    root: str | None = None
    n_train: int | None = None
    n_test: int | None = None

    def __post_init__(self) -> None:
        check_fields(self, "data")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise DMMError(f"{name} must be >= 1, got {v}")

    def load(self) -> ImageDataset:
        return load_dataset(self.dataset, self.root, n_train=self.n_train, n_test=self.n_test)


# ---- train -------------------------------------------------------------------------------------

@dataclass
class TrainJob:
    """Client models on a Dirichlet split: federated (FedAvg / FedProx / FedBN) or one-shot."""

    data: DataConfig
    partition: PartitionConfig
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    arch: str = "resnet18"
    width: float = 0.25                 # the built-in architectures' channel multiplier
    engine: str = "inprocess"           # inprocess | flower (Flower's simulation engine)
    cpus_per_client: int | None = None  # flower engine only
    evaluate: bool = True               # evaluate the global model on the test split
    device: str = "cpu"                 # inprocess engine: where the models train

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise DMMError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.partition.seed != self.federated.seed:
            raise DMMError(f"the partition's seed ({self.partition.seed}) and the training "
                           f"seed ({self.federated.seed}) differ; dmm draws both from one seed")
        self.federated.validate()


@dataclass
class TrainOutput:
    result: FederatedResult
    partition: Partition
    arch_kwargs: dict
    meta: dict                          # the checkpoints' metadata (checkpoint.data_meta)
    eval: list[dict]
    out: Path | None = None


def train(job: TrainJob, out: str | Path | None = None, *, data: ImageDataset | None = None,
          partition: Partition | None = None, progress: bool = True,
          verbose: bool = False) -> TrainOutput:
    """Run `job`; with `out`, write `init`, `client_*` and `global` checkpoints, partition.json
    and train.json there (the layout `dmm merge` reads). `data` reuses a loaded data set and
    `partition` the split its caller already drew from `job.partition` (the bench, the demo)."""
    job.validate()
    if job.engine == "flower":  # loaded once per process: the engine's server side reuses it
        from dmm.flower import require_flower
        require_flower()
        from dmm.flower.client import cached_dataset
        d = job.data
        data = data if data is not None else cached_dataset(d.dataset, d.root, d.n_train,
                                                            d.n_test)
    else:
        data = data if data is not None else job.data.load()
    kw = arch_kwargs(job.arch, num_classes=data.num_classes, in_channels=data.in_channels,
                     width=job.width)
    create(job.arch, **kw)  # fail fast on a bad architecture, before any training
    part = partition if partition is not None else job.partition.split(data)
    folder = ensure_writable_dir(out) if out is not None else None  # after every check
    if job.engine == "flower":
        import torch

        from dmm.flower.client import ClientTask
        from dmm.flower.simulation import run_flower
        task = ClientTask(dataset=job.data.dataset, arch=job.arch, arch_kwargs=kw,
                          federated=job.federated.to_dict(), partition=job.partition.to_dict(),
                          data_root=job.data.root, n_train=job.data.n_train,
                          n_test=job.data.n_test, threads=torch.get_num_threads())
        res, _ = run_flower(task, cpus_per_client=job.cpus_per_client, verbose=verbose)
    else:
        res = run_federated(lambda: create(job.arch, **kw).to(job.device), data, part,
                            job.federated, progress=progress)
    meta = checkpoint.data_meta(job.arch, kw, data, job.data.dataset)
    rows = []
    if res.global_state is not None and job.evaluate:
        model = create(job.arch, **kw)
        model.load_state_dict(res.global_state)
        ev = evaluate_model(model, data.x_test, data.y_test, data.normalize,
                            num_classes=data.num_classes)
        rows.append({"model": "global", "accuracy": ev.accuracy, "loss": ev.loss,
                     "per_class": ev.per_class})
    output = TrainOutput(res, part, kw, meta, rows, folder)
    if folder is not None:
        save_models(folder, res.init_state, res.global_state, res.client_states,
                    res.n_samples, meta, regime=job.federated.regime,
                    label_counts=part.counts.tolist())
        write_json(folder / "partition.json", part.to_dict())
        write_json(folder / "train.json", {
            "config": {**job.federated.to_dict(), "engine": job.engine,
                       "dataset": job.data.dataset, "arch": job.arch, "arch_kwargs": kw,
                       **{k: v for k, v in job.partition.to_dict().items() if k != "seed"}},
            "wall_time_s": res.wall_time, "history": res.history, "eval": rows,
            "provenance": provenance()})
    return output


def save_models(folder: Path, init: StateDict, global_state: StateDict | None,
                clients: Sequence[StateDict], n_samples: Sequence[int], meta: dict, *,
                regime: str, label_counts: Sequence[Sequence[int]] | None = None) -> None:
    """The checkpoints of one training run: init (n_samples 0), one per client (with its label
    histogram when given), the global model (if any) with the total sample count."""
    checkpoint.save(folder / "init.safetensors", init, **meta, n_samples=0)
    for k, state in enumerate(clients):
        extra = {} if label_counts is None else {"label_counts": [int(x)
                                                                  for x in label_counts[k]]}
        checkpoint.save(folder / f"client_{k:03d}.safetensors", state, **meta,
                        n_samples=int(n_samples[k]), client_id=k, **extra)
    if global_state is not None:
        checkpoint.save(folder / "global.safetensors", global_state, **meta,
                        n_samples=int(sum(n_samples)), regime=regime)


# ---- evaluate ----------------------------------------------------------------------------------

def evaluate(inputs: Sequence[str | Path], data: DataConfig, *,
             json_path: str | Path | None = None) -> list[dict]:
    """Test-split accuracy and loss of checkpoint files (or folders of client_*): every file is
    checked against the data set before the first evaluation."""
    from dmm.validate import validate_checkpoint

    ckpts = checkpoint.resolve_inputs(list(inputs))
    d = data.load()
    for ck in ckpts:
        validate_checkpoint(ck, num_classes=d.num_classes)
    rows = []
    for ck in ckpts:
        ev = evaluate_model(ck.build(), d.x_test, d.y_test, d.normalize,
                            num_classes=d.num_classes)
        rows.append({"checkpoint": str(ck.path), **ev.to_dict()})
    if json_path:
        write_json(json_path, {"dataset": data.dataset, "results": rows})
    return rows


# ---- inputs ------------------------------------------------------------------------------------

def load_group(inputs: Sequence[str | Path], reference: checkpoint.Checkpoint | None = None
               ) -> tuple[list[checkpoint.Checkpoint], list]:
    """Checkpoints of one architecture (that of `reference` if given), validated
    (`dmm.validate`: keys, shapes, dtypes, finite values) before anything is built, and the
    modules built from them."""
    from dmm.validate import validate_group

    ckpts = checkpoint.resolve_inputs(list(inputs))
    validate_group(ckpts, reference=reference)
    return ckpts, [ck.build() for ck in ckpts]


# ---- inspect -----------------------------------------------------------------------------------

@dataclass
class InspectOutput:
    names: list[str]
    report: object                      # dmm.divergence.DivergenceReport
    chart: Path

    def table(self) -> str:
        return self.report.table(self.names)


def inspect(inputs: Sequence[str | Path], *, student: str | Path | None = None,
            beta: float = 0.5, tau: float = 0.0, chart: str | Path | None = None
            ) -> InspectOutput:
    """Divergence scores of client models against a merge (paper Section 3.3): against
    `student`, or against the sample-weighted average of the inputs; a bar chart of the scores
    with the divergent teachers in red (default: divergence.png beside the first input)."""
    from dmm.divergence import divergence_scores
    from dmm.merging import merge_states
    from dmm.statedict import state_of

    ckpts, modules = load_group(inputs)
    states = [state_of(m) for m in modules]
    if student is not None:
        merged = state_of(load_group([student], reference=ckpts[0])[1][0])
    else:
        w = [ck.meta.get("n_samples") or 1 for ck in ckpts]
        merged = merge_states(states, "average", model=modules[0], weights=w)
    rep = divergence_scores(states, merged, modules[0], beta=beta, tau=tau)
    names = [Path(c.path).stem for c in ckpts]
    path = Path(chart) if chart else Path(ckpts[0].path).parent / "divergence.png"
    _divergence_chart(rep, names, tau, path)
    return InspectOutput(names, rep, path)


def _divergence_chart(rep, names: list[str], tau: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(names) + 2), 3))
    colors = ["tab:red" if i in rep.selected else "tab:gray" for i in range(len(names))]
    ax.bar(range(len(names)), rep.score, color=colors)
    ax.axhline(tau, color="k", lw=0.8, ls="--", label=f"tau = {tau}")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("divergence score d_k")
    ax.set_title("divergent teachers in red")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# ---- convert -----------------------------------------------------------------------------------

def convert(path: str | Path, out: str | Path, *, arch: str, arch_kwargs: dict,
            n_samples: int | None = None) -> checkpoint.Checkpoint:
    """A PyTorch state dict (`.pt`/`.pth`, loaded with `weights_only=True`: no code runs) ->
    a dmm checkpoint, checked against `arch` before it is written."""
    from dmm.validate import validate_checkpoint

    out = Path(out)
    if out.suffix != ".safetensors":
        raise DMMError(f"--out must end in .safetensors, got {out}")
    if not isinstance(arch_kwargs, dict):
        raise DMMError("--arch-kwargs must be a JSON object")
    meta = {"arch": arch, "arch_kwargs": arch_kwargs}
    if n_samples:
        meta["n_samples"] = n_samples
    ck = checkpoint.import_pt(path, **meta)
    validate_checkpoint(ck)
    checkpoint.save(out, ck.state, **meta, source=str(path))
    return ck


__all__ = ["DataConfig", "InspectOutput", "TrainJob", "TrainOutput", "convert", "evaluate",
           "inspect", "load_group", "save_models", "train"]
