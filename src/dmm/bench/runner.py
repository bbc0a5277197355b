"""The grid runner: shared training done once, every cell written as soon as it finishes.

Cells are grouped by (alpha, K, seed). Within a group, the models of each regime (FedAvg,
FedProx, FedBN, one-shot, central) are trained at most once and kept on disk under the cache
folder (keyed by their training settings), so a resumed run or another row reuses them. The
Cat-Merge result and the pseudo-data of identical inversions are shared by the rows of a group;
a row's wall time still counts the synthesis and merge it needs, as if it ran alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dmm import checkpoint
from dmm import inputs as I
from dmm.bench.registry import W0, get_row
from dmm.bench.spec import SPLIT_FREE, BenchSpec, Cell, digest
from dmm.bench.store import ResultStore
from dmm.data import PartitionConfig, load_dataset
from dmm.data.base import ImageDataset
from dmm.errors import DMMError
from dmm.evaluate import EvalResult, eval_from_logits, evaluate, rare_classes
from dmm.federated import FederatedConfig, TrainConfig
from dmm.federated.client import train_local
from dmm.io import provenance
from dmm.merging import merge_states
from dmm.models import arch_kwargs, create
from dmm.statedict import StateDict, state_of
from dmm.validate import validate_group

log = logging.getLogger(__name__)


class Trained:
    """The models one regime produced for one (alpha, K, seed), with its wall time.

    A cache entry is checked like any input (`dmm.validate`): the bench's architecture, every
    key, shape and dtype, finite values. A damaged entry is one error naming the file and key.
    """

    def __init__(self, folder: Path, arch: str, arch_kwargs: dict) -> None:
        try:
            meta = json.loads((folder / "meta.json").read_text())
            self.wall_time: float = float(meta["wall_time_s"])
            self.n_samples: list[int] = [int(n) for n in meta["n_samples"]]
            # the clients' label histograms (the split's counts; older entries lack them)
            self.label_counts: list[list[int]] | None = meta.get("label_counts")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DMMError(f"{folder / 'meta.json'}: damaged bench cache entry ({e}); delete "
                           "the folder to retrain") from e
        ckpts = [checkpoint.load(folder / "init.safetensors")]
        g = folder / "global.safetensors"
        if g.exists():
            ckpts.append(checkpoint.load(g))
        clients = (checkpoint.load_dir(folder) if any(folder.glob("client_*.safetensors"))
                   else [])
        for ck in ckpts + clients:
            if ck.arch != arch or ck.meta.get("arch_kwargs", {}) != arch_kwargs:
                raise DMMError(f"{ck.path}: cached model is {ck.arch} "
                               f"{ck.meta.get('arch_kwargs')}, the bench runs {arch} "
                               f"{arch_kwargs}; delete {folder} to retrain")
        validate_group(ckpts + clients)
        self.init = ckpts[0].state
        self.global_state = ckpts[1].state if g.exists() else None
        self.clients = [c.state for c in clients]


class Group:
    """Lazily trained regimes and shared intermediate results of one (alpha, K, seed)."""

    def __init__(self, spec: BenchSpec, data: ImageDataset, alpha: float, k: int, seed: int,
                 cache_dir: Path, grids_dir: Path | None) -> None:
        self.spec, self.data, self.alpha, self.k, self.seed = spec, data, alpha, k, seed
        self.cache_dir, self.grids_dir = cache_dir, grids_dir
        self.arch_kwargs = arch_kwargs(spec.arch, num_classes=data.num_classes,
                                       in_channels=data.in_channels, width=spec.width)
        self.partition_config = PartitionConfig(alpha=alpha, clients=k, min_size=spec.min_size,
                                                seed=seed, public=spec.public_slice)
        self.partition = self.partition_config.split(data)
        self.rare = rare_classes(self.partition.counts)
        self.input_shape = data.input_shape
        self._trained: dict[str, Trained] = {}
        self._merged: dict[str, tuple[StateDict, float]] = {}
        self._pseudo: dict[str, object] = {}

    # ---- models ------------------------------------------------------------------------
    def model(self, state: StateDict | None = None, *, device: str | None = None
              ) -> torch.nn.Module:
        """A model of the bench's architecture on `device` (default: the bench's device).
        Merging methods get CPU templates: they are state-dict arithmetic plus small probes."""
        m = create(self.spec.arch, **self.arch_kwargs)
        if state is not None:
            m.load_state_dict(state)
        return m.to(device or self.spec.device).eval()

    def trained(self, regime: str) -> Trained:
        if regime not in self._trained:
            settings = self.spec.train_settings(regime, self.alpha, self.k, self.seed)
            folder = self.cache_dir / f"{regime}_a{self.alpha}_k{self.k}_s{self.seed}_" \
                                      f"{digest(settings)}"
            if not (folder / "meta.json").exists():
                self._train(regime, settings, folder)
            self._trained[regime] = Trained(folder, self.spec.arch, self.arch_kwargs)
        return self._trained[regime]

    def _train_config(self, regime: str) -> TrainConfig:
        spec = self.spec
        return TrainConfig(lr=spec.lr, batch_size=spec.batch_size, local_iters=spec.local_iters,
                           prox_mu=spec.mu if regime == "fedprox" else 0.0)

    def _job(self, regime: str, **kw):
        """The `dmm.jobs.TrainJob` of a federated regime under the bench's settings (`kw`: the
        in-loop DMM fields of `TrainJob`)."""
        from dmm.jobs import DataConfig, TrainJob

        spec = self.spec
        return TrainJob(DataConfig(spec.dataset, spec.data_root, spec.n_train, spec.n_test),
                        self.partition_config,
                        FederatedConfig(regime=regime, rounds=spec.rounds, seed=self.seed,
                                        train=self._train_config(regime)),
                        arch=spec.arch, width=spec.width, evaluate=False, device=spec.device,
                        **kw)

    def train_in_loop(self, regime: str, dmm, loop) -> tuple[StateDict, float, list[dict]]:
        """`regime` trained with DMM on the server every `loop.every` rounds
        (`dmm.inloop.LoopRefiner`, the clients' label histograms known): the final global
        state, the whole wall time (training and refinements) and one report per refinement.
        Not cached: the row's cell holds the result."""
        from dmm.jobs import train

        t0 = time.perf_counter()
        out = train(self._job(regime, dmm_every=loop.every, dmm=dmm, loop=loop),
                    data=self.data, partition=self.partition, progress=False)
        return state_of(out.result.global_state), time.perf_counter() - t0, out.dmm_reports

    def _train(self, regime: str, settings: dict, folder: Path) -> None:
        from dmm.jobs import save_models, train

        spec = self.spec
        tc = self._train_config(regime)
        # from W_0: the pretrained start first (its own cache entry, not in this wall time)
        start = self.trained("pretrain").global_state if regime.endswith(W0) else None
        t0 = time.perf_counter()
        if regime in SPLIT_FREE:
            torch.manual_seed(self.seed)
            model = self.new_model()
            init = state_of(model)
            if regime == "oracle":  # to convergence: epochs over all client data
                tc.local_iters, tc.local_epochs = None, spec.oracle_epochs
            elif regime == "pretrain":  # W_0: epochs over the public slice
                tc.local_iters, tc.local_epochs = None, spec.pretrain_epochs
            else:                   # at 1/K of FedAvg's compute
                tc.local_iters = spec.rounds * spec.local_iters
            x, y = self._central_data(regime)
            train_local(model, x, y, self.data.normalize, tc,
                        generator=torch.Generator().manual_seed(self.seed))
            glob, clients, n = model.state_dict(), [], [len(y)]
        else:
            res = train(self._job(regime.removesuffix(W0)), data=self.data,
                        partition=self.partition, progress=False, init_state=start).result
            init, glob, clients, n = res.init_state, res.global_state, res.client_states, \
                res.n_samples
        init, clients = state_of(init), [state_of(c) for c in clients]
        glob = state_of(glob) if glob is not None else None
        wall = time.perf_counter() - t0
        # write into a hidden folder, then rename: a killed run never leaves half a cache entry
        tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir(parents=True)
        try:
            meta = checkpoint.data_meta(spec.arch, self.arch_kwargs, self.data, spec.dataset)
            save_models(tmp, init, glob, clients, n, meta, regime=regime,
                        label_counts=self.partition.counts.tolist() if clients else None)
            (tmp / "meta.json").write_text(json.dumps(
                {"settings": settings, "wall_time_s": wall, "n_samples": list(n),
                 "label_counts": self.partition.counts.tolist(), "provenance": provenance()},
                indent=2))
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    def _central_data(self, regime: str):
        """What a centrally trained model sees: W_0 the public slice; the others the union of
        the client data (all training data where no slice is withheld)."""
        public = self.partition.public
        if regime == "pretrain":
            idx = torch.as_tensor(public)
        elif public is None:
            return self.data.x_train, self.data.y_train
        else:
            idx = torch.as_tensor(np.sort(np.concatenate(self.partition.indices)))
        return I.take(self.data.x_train, idx), self.data.y_train[idx]

    def from_start(self, suffix: str) -> StartView:
        """This group as the rows of another start see it (`W0`: every model trained from
        the pretrained W_0)."""
        return StartView(self, suffix)

    # ---- what rows share (dmm.bench.rows builds each row from these) -----------------------
    def new_model(self) -> torch.nn.Module:
        """A freshly initialized model of the bench's architecture (seeded by the caller)."""
        return create(self.spec.arch, **self.arch_kwargs).to(self.spec.device)

    def merged(self, method: str, params: dict, regime: str = "oneshot"
               ) -> tuple[StateDict, float]:
        """The one-shot clients of `regime` merged by `method` with `params` (seeded by the
        group; task vectors against their common start) and the seconds it took, computed once
        per group: the Cat-Merge rows and their + DMM rows share it."""
        key = json.dumps([regime, method, params], sort_keys=True)
        if key not in self._merged:
            t = self.trained(regime)
            t0 = time.perf_counter()
            state = merge_states(t.clients, method, model=self.model(device="cpu"),
                                 weights=t.n_samples, base=t.init, seed=self.seed,
                                 input_shape=self.input_shape,
                                 pixel_range=self.data.pixel_range, **params)
            self._merged[key] = (state, time.perf_counter() - t0)
        return self._merged[key]

    def run(self, row: str) -> tuple[torch.nn.Module | torch.Tensor, dict]:
        """The row's predictor (a model, or test logits for the ensemble) and its details."""
        t0 = time.perf_counter()
        out, info = get_row(row).build(self)
        info.setdefault("row_s", time.perf_counter() - t0)
        return out, info

    def refine(self, student_name: str, state: StateDict, t: Trained, cfg, *,
               histograms: bool = True):
        """DMM refinement of `state` with the regime's clients as teachers (and their label
        histograms unless `histograms=False`); pseudo-data of identical inversions are shared
        by the rows of the group."""
        from dmm.pipeline import refine
        counts = t.label_counts if histograms else None  # None: estimated (a report note)
        def key_of(c: dict) -> str:
            return json.dumps([student_name, c["buffer_weights"], c["inversion"], c["seed"],
                               histograms], sort_keys=True)

        teachers = [self.model(s) for s in t.clients]
        model, rep = refine(self.model(state), teachers, cfg, n_samples=t.n_samples,
                            input_shape=self.input_shape, pixel_range=self.data.pixel_range,
                            pseudo=self._pseudo.get(key_of(cfg.to_dict())),
                            label_counts=counts)
        # kept under the configuration that made it: the default's teacher check may have
        # switched to the head-only refinement, whose pseudo-data another row must not reuse
        key = key_of(rep.config)
        if rep.pseudo is not None and key not in self._pseudo:
            self._pseudo[key] = rep.pseudo
            if self.grids_dir is not None and self.seed == self.spec.seeds[0]:
                from dmm.synth import save_grid
                save_grid(rep.pseudo.images, rep.pseudo.labels, self.grids_dir /
                          f"pseudo_{student_name}_a{self.alpha}_k{self.k}_s{self.seed}.png",
                          mean=self.data.mean, std=self.data.std, class_names=self.data.classes)
        return model, rep


class StartView:
    """A group as the rows of another start see it: `trained(regime)` is the regime from that
    start, merges take its one-shot clients (task vectors against W_0) and reset BN statistics
    data-free afterwards, and pseudo-data are shared only among rows of the same start."""

    def __init__(self, group: Group, suffix: str) -> None:
        self._group, self._suffix = group, suffix

    def __getattr__(self, name: str):
        return getattr(self._group, name)

    def trained(self, regime: str) -> Trained:
        return self._group.trained(regime + self._suffix)

    def merged(self, method: str, params: dict) -> tuple[StateDict, float]:
        return self._group.merged(method, {**params, "bn_reset": True},
                                  regime="oneshot" + self._suffix)

    def refine(self, student_name: str, *args, **kw):
        return self._group.refine(student_name + self._suffix, *args, **kw)

    def train_in_loop(self, *args, **kw):
        raise DMMError("the in-loop rows train from the seeded initialization only")


def evaluate_output(out, data: ImageDataset) -> EvalResult:
    if isinstance(out, torch.Tensor):
        return eval_from_logits(out, data.y_test, data.num_classes)
    return evaluate(out, data.x_test, data.y_test, data.normalize, num_classes=data.num_classes)


def preflight(spec: BenchSpec, data: ImageDataset) -> None:
    """Fail before any output on what the grid would hit later: every split must be drawable
    and DENSE needs an input size divisible by 4."""
    for a, k, s in sorted({(c.alpha, c.k, c.seed) for c in spec.cells()}):
        PartitionConfig(alpha=a, clients=k, min_size=spec.min_size, seed=s,
                        public=spec.public_slice).split(data)
    if "dense" in spec.rows:
        h, w = data.input_shape[-2:]
        if h % 4 or w % 4:
            raise DMMError(f"the dense row needs an input size divisible by 4, "
                           f"{spec.dataset} has {h}x{w}; leave the row out (--rows)")


def load_bench_data(spec: BenchSpec) -> ImageDataset:
    return load_dataset(spec.dataset, spec.data_root, n_train=spec.n_train, n_test=spec.n_test)


def run_bench(spec: BenchSpec, out_dir: str | Path, cache_dir: str | Path, *,
              data: ImageDataset | None = None, progress: bool = True,
              report: Callable[[str], None] = print) -> ResultStore:
    """Run every cell of `spec` that `out_dir/cells.jsonl` does not hold yet."""
    spec.validate()
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    store = ResultStore(out_dir / "cells.jsonl")
    if store.dropped:
        report(f"dropped {store.dropped} torn record(s) from {store.path}; they run again")
    cells = spec.cells()
    keyed = [(c, spec.cell_key(c)) for c in cells]
    todo = [(c, key) for c, key in keyed if key not in store]
    report(f"bench: {len(cells)} cells, {len(cells) - len(todo)} already done in "
           f"{store.path}, {len(todo)} to run")
    if not todo:
        return store
    data = data if data is not None else load_bench_data(spec)
    run_id = uuid.uuid4().hex[:12]
    prov = provenance()
    def group_of(ck):
        return (ck[0].alpha, ck[0].k, ck[0].seed)

    def order(ck):  # main grid first, seed by seed: an interrupted run still covers all alphas
        c = ck[0]
        return (c.k != spec.clients, c.seed, -c.alpha, c.k)

    # closed on an error too, so that the error starts a line of its own
    with tqdm(total=len(cells), initial=len(cells) - len(todo), desc="bench cells",
              disable=not progress, unit="cell") as bar:
        for (alpha, k, seed), items in groupby(sorted(todo, key=order), key=group_of):
            group = Group(spec, data, alpha, k, seed, cache_dir / spec.dataset,
                          out_dir / "grids")
            for cell, key in items:
                bar.set_postfix_str(f"a={alpha} K={k} s={seed} {cell.row}")
                record = run_cell(group, cell, key, spec)
                record.update(run_id=run_id, provenance=prov)
                store.append(record)
                bar.update(1)
                name = get_row(cell.row).pretty_name
                bar.write(f"  alpha {alpha:<5} K {k:<3} seed {seed}  {name:<46} "
                          f"{100 * record['accuracy']:6.2f}%  ({record['row_s']:.0f} s)")
    return store


def run_cell(group: Group, cell: Cell, key: str, spec: BenchSpec) -> dict:
    torch.manual_seed(cell.seed)
    out, info = group.run(cell.row)
    t0 = time.perf_counter()
    ev = evaluate_output(out, group.data)
    info["eval_s"] = time.perf_counter() - t0
    rare = ev.class_mean(group.rare) if group.rare else None
    if rare is not None and math.isnan(rare):  # rare classes without test samples
        rare = None
    return {"key": key, "dataset": spec.dataset, "alpha": cell.alpha, "k": cell.k,
            "seed": cell.seed, "row": cell.row, "accuracy": ev.accuracy, "loss": ev.loss,
            "per_class": ev.per_class, "rare_classes": group.rare,
            "rare_class_accuracy": rare,
            "settings": spec.cell_settings(cell), **info,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

