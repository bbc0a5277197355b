"""DMM inside the federated loop: refine the global model on the server after aggregation every
N rounds (and after the last), with a pseudo-data pool carried across rounds and a data-free
guard against drift.

The paper applies DMM to FedAvg as "post-aggregation fine-tuning"; FedFTG (arXiv 2203.09249)
fine-tunes the global model on the server after every round, so that each round's clients start
from a better model. `LoopRefiner` is that server step, shared by the in-process engine
(`dmm.jobs.train(TrainJob(dmm_every=N))`, `dmm train --dmm-every N`) and the Flower strategy
(`dmm.flower.strategy.DMMFedAvg(dmm_every=N)`).

One refinement, after round r (teachers: the latest model of every client that has trained):
1. the first time, `dmm.refine` exactly as post-hoc: it synthesizes `config.inversion.n_images`
   pseudo-samples (domain inversion under the default preset) and refines; they become the
   pool. Later, `dmm.refine` on the pool as it is: the teachers' logits are recomputed on
   every pooled image, so old images are re-labelled by the current teachers (the routed
   targets follow the class each image was synthesized for), and `loop.steps` distillation
   steps run instead of the preset's;
2. the guard (`loop.guard`): `loop.refresh` fresh pseudo-samples from the current teachers; the
   refined model is kept only if its agreement with the class-routed teachers on them (argmax
   of the student against argmax of the routed target) is not lower than the aggregated
   model's; otherwise the aggregated model goes on (the report says the guard fired);
3. the fresh samples join the pool; beyond `loop.pool` samples the oldest leave it.
With `every` larger than the number of rounds and the guard off, the only refinement is the
post-hoc one, bit for bit (tested).

Deviations, stated: the fresh samples of a later round are inverted with the aggregated model
as the merged model (its BN statistics not yet pooled; the default inverts no merged share);
FedBN and one-shot have no global model between rounds and are refused by the in-process
engine.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from dmm.config import check_fields, check_range
from dmm.distill import _logits, estimate_label_counts, routed_log_targets
from dmm.pipeline import DMMConfig, inversion_for, preset, refine
from dmm.statedict import StateDict, state_of
from dmm.synth import PseudoData, probe_classifier, synthesize

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    """How DMM runs inside the loop. Checked when made."""

    every: int = 10          # refine after every N-th round's aggregation, and after the last
    pool: int = 2560         # pseudo-samples kept across refinements (the oldest leave first)
    refresh: int = 256       # fresh pseudo-samples per refinement (the guard's, then the pool's)
    steps: int = 200         # distillation steps of every refinement after the first
    guard: bool = True       # keep a refinement only if the routed agreement did not drop

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_fields(self, "in-loop DMM")
        for name in ("every", "pool", "refresh", "steps"):
            check_range("in-loop DMM", name, getattr(self, name), lo=1)

    def to_dict(self) -> dict:
        return asdict(self)


def _module(template: nn.Module, state: StateDict) -> nn.Module:
    m = copy.deepcopy(template)
    m.load_state_dict(state)
    return m.eval()


def _cat(a: PseudoData, b: PseudoData) -> PseudoData:
    return PseudoData(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]),
                      torch.cat([a.source, b.source]))


def routed_agreement(model: nn.Module, teachers: list[nn.Module], pseudo: PseudoData,
                     label_counts: torch.Tensor) -> float:
    """Share of pseudo-samples whose argmax under `model` equals the argmax of the class-routed
    teacher target (`dmm.distill.routed_log_targets`, completed by the model itself where no
    teacher holds the sample's class)."""
    s = _logits(model, pseudo.images, True)
    t = torch.stack([_logits(m, pseudo.images, True) for m in teachers])
    target, _ = routed_log_targets(t, pseudo.labels, label_counts, s, 1.0)
    return float((s.argmax(1) == target.argmax(1)).float().mean())


class LoopRefiner:
    """The server's DMM step between rounds (see the module docstring).

    `label_counts`: client id -> its label histogram (None: estimated from the pool, as
    `dmm.refine` does). `input_shape` and `pixel_range` as for `dmm.refine`. `rounds`: the
    number of rounds (the last one always refines)."""

    def __init__(self, config: DMMConfig | None, loop: LoopConfig, template: nn.Module, *,
                 rounds: int, input_shape: tuple[int, int, int] | None = None,
                 pixel_range: tuple[float, float] | None = None,
                 label_counts: dict[int, Sequence[int]] | None = None) -> None:
        self.config = config or preset("default")
        self.config.validate()
        loop.validate()
        self.loop, self.template, self.rounds = loop, copy.deepcopy(template).eval(), rounds
        self.input_shape, self.pixel_range = input_shape, pixel_range
        self.label_counts = label_counts
        self.pool: PseudoData | None = None   # source = client id (-1: the merged model)
        self.reports: list[dict] = []

    def due(self, round_: int) -> bool:
        return round_ == self.rounds or round_ % self.loop.every == 0

    def __call__(self, round_: int, global_state: StateDict, clients: dict[int, StateDict],
                 n_samples: dict[int, int]) -> StateDict:
        """The model the next round starts from: `global_state` refined (or kept, if the guard
        fired), with the latest state of each client in `clients` as teachers."""
        t0 = time.perf_counter()
        ids = sorted(clients)
        teachers = [_module(self.template, clients[i]) for i in ids]
        student = _module(self.template, global_state)
        counts = ([list(self.label_counts[i]) for i in ids] if self.label_counts is not None
                  else None)
        kw = dict(n_samples=[n_samples[i] for i in ids], input_shape=self.input_shape,
                  pixel_range=self.pixel_range, label_counts=counts)
        first = self.pool is None
        cfg = self.config
        if not first:
            cfg = replace(cfg, distillation=replace(cfg.distillation, steps=self.loop.steps))
        pool = None if first else self._as_positions(self.pool, ids)
        refined, rep = refine(student, teachers, cfg, pseudo=pool, **kw)
        info = {"round": round_, "first": first, "teachers": [ids[i] for i in rep.teachers],
                "pool": 0 if first else len(self.pool.labels), "notes": rep.notes,
                "teacher_check": rep.distillation.get("teacher_check"), "kept": True}
        if first and rep.pseudo is not None:
            self.pool = self._as_ids(rep.pseudo, ids)
        fresh = None
        if self.loop.guard or round_ < self.rounds:  # the last round's would feed no one
            fresh = self._fresh(student, teachers, round_, counts)
        if self.loop.guard and fresh is not None:
            c = torch.as_tensor(counts) if counts is not None else estimate_label_counts(
                teachers, fresh, kw["n_samples"])
            before = routed_agreement(student, teachers, fresh, c)
            after = routed_agreement(refined, teachers, fresh, c)
            info.update(guard_before=before, guard_after=after, kept=after >= before)
        if fresh is not None and self.pool is not None:
            self.pool = self._trim(_cat(self.pool, self._as_ids(fresh, ids)))
        info["seconds"] = time.perf_counter() - t0
        self.reports.append(info)
        log.info("in-loop DMM after round %d: %s", round_, info)
        return state_of(refined) if info["kept"] else global_state

    # ---- the pool --------------------------------------------------------------------------
    def _fresh(self, student: nn.Module, teachers: list[nn.Module], round_: int,
               counts) -> PseudoData:
        inv, _ = inversion_for(replace(self.config.inversion, n_images=self.loop.refresh),
                               counts)
        shape, num_classes = probe_classifier(student, self.input_shape)
        extra = {"label_counts": counts} if counts is not None else {}
        return synthesize(student, teachers, inv, num_classes=num_classes, input_shape=shape,
                          seed=self.config.seed + round_, pixel_range=self.pixel_range, **extra)

    def _trim(self, pool: PseudoData) -> PseudoData:
        n = self.loop.pool
        if len(pool.labels) <= n:
            return pool
        return PseudoData(pool.images[-n:], pool.labels[-n:], pool.source[-n:])

    @staticmethod
    def _as_ids(p: PseudoData, ids: list[int]) -> PseudoData:
        """Sources as client ids (teacher positions differ between rounds)."""
        src = torch.tensor([ids[s] if s >= 0 else -1 for s in p.source.tolist()])
        return PseudoData(p.images, p.labels, src)

    @staticmethod
    def _as_positions(p: PseudoData, ids: list[int]) -> PseudoData:
        pos = {c: i for i, c in enumerate(ids)}
        src = torch.tensor([pos.get(s, -1) for s in p.source.tolist()])
        return PseudoData(p.images, p.labels, src, {"reused": True})
