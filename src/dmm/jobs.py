"""One library call per job: `train`, `evaluate` and `inspect` (the bench's is
`dmm.bench.program.bench`). The command line parses arguments, calls one of these, and prints;
the bench, the demo and notebooks call the same functions (after fusion_bench's
`programs/*.run()` beside its three-line `scripts/cli.py`).

Each job validates everything it is given before it writes anything: a bad data set, split or
architecture fails with one `DMMError` and leaves no output folder behind.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
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
from dmm.models.hf import HF_ARCH
from dmm.sources import ModelSpec, read_models, save_hf_folder
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
    dmm_every: int = 0                  # DMM on the server after every N-th round and the
    #                                     last (dmm.inloop); 0 = off
    dmm: object | None = None           # its DMMConfig (None: preset "default")
    loop: object | None = None          # its dmm.inloop.LoopConfig (None: the defaults)

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise DMMError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if not isinstance(self.dmm_every, int) or self.dmm_every < 0:
            raise DMMError(f"dmm_every must be an integer >= 0, got {self.dmm_every!r}")
        if self.dmm_every and self.federated.regime not in ("fedavg", "fedprox"):
            raise DMMError(f"DMM between rounds needs a global model: regime fedavg or "
                           f"fedprox, not {self.federated.regime}")
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
    dmm_reports: list[dict] = field(default_factory=list)  # in-loop DMM, one per refinement


def train(job: TrainJob, out: str | Path | None = None, *, data: ImageDataset | None = None,
          partition: Partition | None = None, progress: bool = True,
          verbose: bool = False, init_state: StateDict | None = None) -> TrainOutput:
    """Run `job`; with `out`, write `init`, `client_*` and `global` checkpoints, partition.json
    and train.json there (the layout `dmm merge` reads). `data` reuses a loaded data set and
    `partition` the split its caller already drew from `job.partition` (the bench, the demo).
    `init_state` starts the training from given weights (a pretrained W_0; in-process engine):
    it is then the `init` checkpoint, the base that task vectors are taken against."""
    job.validate()
    if init_state is not None and job.engine != "inprocess":
        raise DMMError("a given start (init_state) needs the in-process engine")
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
    refiner, loop_kw = None, {}
    if job.dmm_every:
        from dmm.inloop import LoopConfig, LoopRefiner
        loop = replace(job.loop or LoopConfig(), every=job.dmm_every)
        counts = {k: c.tolist() for k, c in enumerate(part.counts)}  # client id -> histogram
        if job.engine == "flower":
            from dmm.pipeline import preset
            loop_kw = dict(dmm=job.dmm or preset("default"), dmm_every=job.dmm_every, loop=loop,
                           refine_kwargs={"input_shape": tuple(data.input_shape),
                                          "pixel_range": data.pixel_range},
                           label_counts=counts)
        else:
            refiner = LoopRefiner(job.dmm, loop, create(job.arch, **kw),
                                  rounds=job.federated.rounds,
                                  input_shape=tuple(data.input_shape),
                                  pixel_range=data.pixel_range, label_counts=counts)
    folder = ensure_writable_dir(out) if out is not None else None  # after every check
    if job.engine == "flower":
        import torch

        from dmm.flower.client import ClientTask
        from dmm.flower.simulation import run_flower
        task = ClientTask(dataset=job.data.dataset, arch=job.arch, arch_kwargs=kw,
                          federated=job.federated.to_dict(), partition=job.partition.to_dict(),
                          data_root=job.data.root, n_train=job.data.n_train,
                          n_test=job.data.n_test, threads=torch.get_num_threads())
        res, strategy = run_flower(task, cpus_per_client=job.cpus_per_client, verbose=verbose,
                                   **loop_kw)
        loop_reports = strategy.dmm_reports if job.dmm_every else []
    else:
        res = run_federated(lambda: create(job.arch, **kw).to(job.device), data, part,
                            job.federated, progress=progress, server_step=refiner,
                            init_state=init_state)
        loop_reports = refiner.reports if refiner is not None else []
    meta = checkpoint.data_meta(job.arch, kw, data, job.data.dataset)
    rows = []
    if res.global_state is not None and job.evaluate:
        model = create(job.arch, **kw)
        model.load_state_dict(res.global_state)
        ev = evaluate_model(model, data.x_test, data.y_test, data.normalize,
                            num_classes=data.num_classes)
        rows.append({"model": "global", "accuracy": ev.accuracy, "loss": ev.loss,
                     "per_class": ev.per_class})
    output = TrainOutput(res, part, kw, meta, rows, folder, loop_reports)
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
            "dmm_in_loop": {"every": job.dmm_every, "reports": loop_reports}
            if job.dmm_every else None, "provenance": provenance()})
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
             json_path: str | Path | None = None, spec: ModelSpec | None = None) -> list[dict]:
    """Test-split accuracy and loss of model files or folders (`dmm.sources`: dmm checkpoints,
    plain safetensors or `.pt` of `spec.arch`, transformers folders): every file is checked
    against the data set before the first evaluation."""
    from dmm.validate import validate_checkpoint

    ckpts = read_models(list(inputs), spec)
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

def load_group(inputs: Sequence[str | Path], reference: checkpoint.Checkpoint | None = None,
               spec: ModelSpec | None = None) -> tuple[list[checkpoint.Checkpoint], list]:
    """Model files of one architecture (that of `reference` if given; what the files lack from
    `spec`, `dmm.sources.read_models`), validated (`dmm.validate`: keys, shapes, dtypes,
    finite values, against a model built on the meta device) before anything is built, and the
    modules built from them."""
    from dmm.validate import validate_group

    ckpts = read_models(list(inputs), spec)
    validate_group(ckpts, reference=reference)
    return ckpts, [ck.build() for ck in ckpts]


def _student_spec(spec: ModelSpec | None) -> ModelSpec | None:
    """What `spec` says of a single extra model (a student, a base): the architecture and
    input, not the per-input sample counts and histograms."""
    return None if spec is None else replace(spec, n_samples=None, label_counts=None)


def pixel_range_of(meta: dict) -> tuple[float, float] | None:
    """The normalized pixel range of a model's inputs (metadata `input_mean`/`input_std`)."""
    from dmm.data.base import pixel_range

    if "input_mean" not in meta:
        return None
    return pixel_range(meta["input_mean"], meta["input_std"])


# ---- merge -------------------------------------------------------------------------------------

@dataclass
class MergeOutput:
    path: Path                          # the merged checkpoint (or transformers folder)
    report_path: Path                   # its JSON report
    grid: Path | None                   # the pseudo-data grid, when DMM synthesized any
    inputs: list[Path]
    method: str
    refine: str
    streamed: bool
    seconds: float
    report: object | None               # dmm.pipeline.DMMReport, when DMM ran


def dmm_config(preset_name: str, config: dict | str | Path | None, seed: int):
    """A DMM preset with `config` overrides (a dict, or the path of a JSON file) and `seed`."""
    from dmm.pipeline import preset, with_overrides

    cfg = preset(preset_name)
    if config is not None:
        where = "config"
        if not isinstance(config, dict):
            where = str(config)
            try:
                config = json.loads(Path(config).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise DMMError(f"{where}: cannot read JSON config ({e})") from e
        cfg = with_overrides(cfg, config, where)
    cfg.seed = seed
    return cfg


def merge_files(inputs: Sequence[str | Path], out: str | Path, *, method: str = "average",
                refine: str = "dmm", preset: str = "default",
                config: dict | str | Path | None = None, student: str | Path | None = None,
                base: str | Path | None = None, weights: str = "samples",
                params: dict | None = None, seed: int = 0, bn_reset: bool = False,
                in_memory: bool = False, spec: ModelSpec | None = None,
                report: str | Path | None = None, grid: str | Path | None = None,
                progress: bool = True) -> MergeOutput:
    """Load, validate, merge, refine and save: what `dmm merge` does, as one call.

    `inputs`: model files and folders (`dmm.sources`: dmm checkpoints, plain safetensors or
    `.pt` of a user's class, transformers folders); `spec` gives what they lack. `method` is a
    registered merging method with `params`; `refine="dmm"` runs DMM with the `preset` and the
    `config` overrides (a dict, or a JSON file). `student`: refine this model instead of a
    merge, the inputs as teachers. `base`: the common initialization (task arithmetic, TIES,
    CAT). `weights`: by each model's `n_samples`, or uniform. With `refine="none"` and no
    student, averaging, task arithmetic and TIES read the inputs tensor by tensor unless
    `in_memory`. Writes `out` (`.safetensors`, or a folder for transformers inputs; loads into
    the inputs' class with the same keys and dtypes), the JSON report (default: beside it) and
    the pseudo-data grid. Every check runs before anything is written."""
    from dmm.merging import get_method, merge_states
    from dmm.merging.registry import PROVIDED
    from dmm.pipeline import merge_and_refine
    from dmm.pipeline import refine as dmm_refine
    from dmm.synth import save_grid
    from dmm.validate import validate_group

    if refine not in ("dmm", "none"):
        raise DMMError(f"refine must be dmm or none, got {refine!r}")
    if weights not in ("samples", "uniform"):
        raise DMMError(f"weights must be samples or uniform, got {weights!r}")
    params = dict(params or {})
    for key in params:
        if key in PROVIDED:
            raise DMMError(f"method parameter {key}: set by dmm merge itself"
                           + (" (use --seed)" if key == "seed" else ""))
    out = Path(out)
    stream = (refine == "none" and student is None and not bn_reset and not in_memory
              and get_method(method).streams)
    if stream:  # tensors stay in the files until the merge reads them, key by key
        ckpts = read_models(list(inputs), spec, lazy=True)
        validate_group(ckpts)
        modules = []
        template = ckpts[0].new_model()
    else:
        ckpts, modules = load_group(inputs, spec=spec)
    hf = ckpts[0].meta.get("arch") == HF_ARCH
    if hf and out.suffix:
        raise DMMError(f"--out {out}: transformers inputs are written back as a folder; give "
                       "a folder name without a suffix")
    if not hf and out.suffix != ".safetensors":
        raise DMMError(f"--out must end in .safetensors, got {out}")
    if refine == "dmm" and len(ckpts) < 2 and student is None:
        raise DMMError("DMM needs at least two models to merge (or --student and a teacher)")
    cfg = dmm_config(preset, config, seed)
    n_samples = [ck.meta.get("n_samples") for ck in ckpts]
    if weights == "samples" and any(not isinstance(n, int) or n <= 0 for n in n_samples):
        bad = next(ck.path for ck, n in zip(ckpts, n_samples, strict=True)
                   if not isinstance(n, int) or n <= 0)
        raise DMMError(f"{bad}: no positive n_samples in its metadata; give --n-samples (one "
                       "per input) or use --weights uniform")
    w = n_samples if weights == "samples" else [1] * len(ckpts)
    meta = ckpts[0].meta
    shape = tuple(meta["input_size"]) if "input_size" in meta else None
    kwargs = dict(n_samples=w, input_shape=shape, pixel_range=pixel_range_of(meta),
                  progress=progress)
    counts = [ck.label_counts for ck in ckpts]
    if all(c is not None for c in counts):  # the clients' label histograms (dmm train's)
        kwargs["label_counts"] = counts
    params.update(seed=seed, input_shape=shape)
    if bn_reset:
        params.update(bn_reset=True, pixel_range=pixel_range_of(meta))
    base_state = None
    if base is not None:
        base_state = load_group([base], reference=ckpts[0],
                                spec=_student_spec(spec))[1][0].state_dict()
    student_module = None
    if student is not None:
        student_module = load_group([student], reference=ckpts[0],
                                    spec=_student_spec(spec))[1][0]
    t0 = time.perf_counter()
    rep = None
    if stream:
        model = template
        model.load_state_dict(merge_states([ck.state for ck in ckpts], method, model=template,
                                           weights=w, base=base_state, **params))
    elif student_module is not None:
        model = student_module
        if refine == "dmm":
            model, rep = dmm_refine(student_module, modules, cfg, **kwargs)
    else:
        model, rep = merge_and_refine(modules, cfg, method=method, weights=w, base=base_state,
                                      method_params=params, refine_model=refine == "dmm",
                                      **kwargs)
    seconds = time.perf_counter() - t0
    report_path = Path(report) if report else out.with_suffix(".json") if out.suffix else \
        out.with_name(out.name + ".json")
    merge_meta = {"method": method, "refine": refine, "inputs": [str(c.path) for c in ckpts],
                  "streamed": stream}
    if hf:
        save_hf_folder(model, out, source=Path(ckpts[0].path),
                       extra={"merge": merge_meta, "n_samples": int(sum(w))})
    else:
        checkpoint.save(out, model, **{**meta, "client_id": None, "n_samples": int(sum(w)),
                                       "merge": merge_meta})
    pseudo = rep.pseudo if rep is not None else None
    grid_path = None
    if pseudo is not None:
        grid_path = Path(grid) if grid else out.with_name(out.stem + "_pseudo.png")
        save_grid(pseudo.images, pseudo.labels, grid_path,
                  mean=tuple(meta.get("input_mean", [0.0])),
                  std=tuple(meta.get("input_std", [1.0])), class_names=meta.get("classes"))
    write_json(report_path, {
        "method": method, "refine": refine, "preset": preset,
        "inputs": [str(c.path) for c in ckpts], "student": str(student) if student else None,
        "weights": w, "wall_time_s": seconds, "report": rep.to_dict() if rep else None,
        "provenance": provenance()})
    return MergeOutput(out, report_path, grid_path, [Path(c.path) for c in ckpts], method,
                       refine, stream, seconds, rep)


# ---- inspect -----------------------------------------------------------------------------------

@dataclass
class InspectOutput:
    names: list[str]
    report: object                      # dmm.divergence.DivergenceReport
    chart: Path

    def table(self) -> str:
        return self.report.table(self.names)


def inspect(inputs: Sequence[str | Path], *, student: str | Path | None = None,
            beta: float = 0.5, tau: float = 0.0, chart: str | Path | None = None,
            spec: ModelSpec | None = None) -> InspectOutput:
    """Divergence scores of client models against a merge (paper Section 3.3): against
    `student`, or against the sample-weighted average of the inputs; a bar chart of the scores
    with the divergent teachers in red (default: divergence.png beside the first input).
    `spec` gives what the files lack (`dmm.sources.ModelSpec`)."""
    from dmm.divergence import divergence_scores
    from dmm.merging import merge_states
    from dmm.statedict import state_of

    ckpts, modules = load_group(inputs, spec=spec)
    states = [state_of(m) for m in modules]
    if student is not None:
        merged = state_of(load_group([student], reference=ckpts[0],
                                     spec=_student_spec(spec))[1][0])
    else:
        w = [ck.meta.get("n_samples") or 1 for ck in ckpts]
        merged = merge_states(states, "average", model=modules[0], weights=w)
    rep = divergence_scores(states, merged, modules[0], beta=beta, tau=tau)
    names = [Path(c.path).stem for c in ckpts]
    first = Path(ckpts[0].path)
    path = Path(chart) if chart else (first if first.is_dir() else first.parent) / \
        "divergence.png"
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
    """A PyTorch state dict (`.pt`/`.pth`, loaded with `weights_only=True`: no code runs) or a
    plain safetensors file -> a dmm checkpoint, checked against `arch` before it is written."""
    from dmm.validate import validate_checkpoint

    out = Path(out)
    if out.suffix != ".safetensors":
        raise DMMError(f"--out must end in .safetensors, got {out}")
    spec = ModelSpec(arch=arch, arch_kwargs=arch_kwargs,
                     n_samples=[n_samples] if n_samples else None)
    src = Path(path)
    if src.is_dir():
        raise DMMError(f"{src}: convert takes one file (.pt, .pth or .safetensors)")
    (ck,) = read_models([src], spec)
    validate_checkpoint(ck)
    meta = {k: v for k, v in ck.meta.items() if k != "source"}
    checkpoint.save(out, dict(ck.state), **meta, source=str(path))
    return ck


__all__ = ["DataConfig", "InspectOutput", "MergeOutput", "ModelSpec", "TrainJob", "TrainOutput",
           "convert", "dmm_config", "evaluate", "inspect", "load_group", "merge_files",
           "pixel_range_of",
           "save_models", "train"]
