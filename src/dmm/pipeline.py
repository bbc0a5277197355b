"""DMM as one pipeline: buffers -> divergence -> synthesize -> distill (shared/DESIGN.md §1).

`refine(student, teachers, config)` takes a merged model (the student) and the domain models
(the teachers) and returns the refined student with a report. It does not know how the student
was merged or how the models were trained. `merge_and_refine` adds the merge step (any
registered merging method) and the paper's "merge the similar ones first" option
(`exclude_divergent`).

The ablation rows of the paper (Section 4.3) are switches of one `DMMConfig`:
baseline (all off) | + buffer_aggregation | + inversion_augmentation (CE on pseudo-data) |
+ distill (full DMM).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from torch import nn

from dmm.bn import aggregate_bn_buffers
from dmm.config import check_fields, check_range
from dmm.distill import DistillConfig, distill, estimate_label_counts, teacher_check
from dmm.divergence import SELECTIONS, divergence_scores
from dmm.errors import DMMError
from dmm.merging import merge_states
from dmm.statedict import StateDict, bn_layers, check_finite, state_of
from dmm.synth import InversionConfig, PseudoData, probe_classifier, synthesize

log = logging.getLogger(__name__)


@dataclass
class DMMConfig:
    """Everything DMM's refinement does, checked when made (`validate`, also after
    `with_overrides` and at the start of `refine`).

    The ablation switches turn loss terms on and off; their weights live in `distillation`:
    the CE term (`inversion_augmentation`) weighs `distillation.ce_weight`, the Eq. 6 term
    (`distill`, and at least one divergent teacher selected) `distillation.kd_weight`.
    """

    buffer_aggregation: bool = True     # pool the teachers' BN statistics into the student
    buffer_weights: str = "counts"      # counts (num_batches_tracked, the paper) | samples (n_k)
    inversion_augmentation: bool = True  # CE on the pseudo-samples' target labels
    distill: bool = False               # selective KD from the divergent teachers (Eq. 6);
    #                                     off by default: it lowered accuracy in every measured
    #                                     configuration at alpha 0.01 (docs/dmm-core.md)
    exclude_divergent: bool = False     # merge_and_refine: merge only the non-divergent
    selection: str = "threshold"        # threshold | top_k | all
    tau: float = 0.0                    # threshold on the combined z-score
    top_k: int = 3                      # selection="top_k": this many teachers
    beta: float = 0.5                   # weight of parameter vs statistics divergence, in [0, 1]
    teacher_check: bool = False         # before distilling, check on a probe of pseudo-data
    #                                     that the teachers know something the student does
    #                                     not (dmm.distill.teacher_check); if not, the
    #                                     head-only refinement (`head_fallback`) runs instead
    check_images: int | None = None     # None: the check judges the pool itself; N: a probe
    #                                     of N pseudo-samples inverted like the pool
    check_pairs: bool = False           # the check also judges image + text models; off, they
    #                                     always take the transfer: on emoji-mm at alpha 0.01
    #                                     the check chose the head on every seed, where the
    #                                     transfer gained 11 points (docs/multimodal.md)
    inversion: InversionConfig = field(default_factory=lambda: InversionConfig(compile=True))
    distillation: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DMMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DMMError(f"unknown DMM config keys: {', '.join(sorted(unknown))}")
        d = dict(d)
        parts = {}
        for name, kind in (("inversion", InversionConfig), ("distillation", DistillConfig)):
            sub = d.pop(name, {})
            if not isinstance(sub, dict):
                raise DMMError(f"DMM config {name} must be an object of {kind.__name__} fields")
            sub_known = {f.name for f in fields(kind)}
            bad = sorted(set(sub) - sub_known)
            if bad:
                raise DMMError(f"unknown {name} setting(s): {', '.join(bad)}")
            parts[name] = kind(**sub)
        return cls(**d, **parts)

    def validate(self) -> None:
        check_fields(self, "DMM config")
        if self.buffer_weights not in ("samples", "counts"):
            raise DMMError(f"buffer_weights must be samples or counts, got {self.buffer_weights}")
        if self.selection not in SELECTIONS:
            raise DMMError(f"unknown teacher selection {self.selection!r}; choose one of "
                           f"{', '.join(SELECTIONS)}")
        check_range("DMM config", "beta", self.beta, 0, 1)
        check_range("DMM config", "top_k", self.top_k, lo=1)
        if self.check_images is not None:
            check_range("DMM config", "check_images", self.check_images, lo=1)
        for name, kind in (("inversion", InversionConfig), ("distillation", DistillConfig)):
            if not isinstance(getattr(self, name), kind):
                raise DMMError(f"DMM config {name} must be a {kind.__name__}")
        self.inversion.validate()
        self.distillation.validate()


PRESETS = ("default", "transfer", "head", "paper")
TRANSFER_IMAGES = 1280  # the domain pool
TRANSFER_STEPS = 500    # whole-network distillation steps (1,000 measured the same)


def preset(name: str, **overrides) -> DMMConfig:
    """Named configurations (docs/dmm-core.md measures each).
    - `default`: `transfer` with the teacher check: each client inverted against its own
      statistics with targets from its label histogram, the pool checked for whether the
      teachers know what the student does not (`dmm.distill.teacher_check`); if they do,
      class-routed KD into the whole network, if not, the head-only CE refinement on the same
      pool. Uses the clients' `label_counts` where the checkpoints carry them, estimates them
      otherwise. Image + text models skip the check (`check_pairs=False`) and always take the
      transfer: on pairs the check chose the head where the transfer measured better.
    - `transfer`: the same without the check (always the whole-network routed KD).
    - `head`: the head-only CE refinement on pseudo-data inverted from the merged model
      (`DMMConfig()`, the default before issue 13).
    - `paper`: the paper read literally (inversion against the merged model only, softmax
      teachers filtered by Eq. 6, counts as buffer weights).
    `overrides` go through `with_overrides`: an unknown name is an error, nested `inversion` /
    `distillation` dicts update field by field, a config object replaces the whole part."""
    if name == "paper":
        cfg = DMMConfig(buffer_weights="counts", inversion_augmentation=True, distill=True,
                        selection="threshold", tau=0.0,
                        inversion=InversionConfig(mode="merged", compile=True),
                        distillation=DistillConfig(teacher_signal="softmax", optimizer="adam",
                                                   lr=1e-3, trainable="all", gamma=0.9,
                                                   eta=0.5))
    elif name == "head":
        cfg = DMMConfig()
    elif name in ("default", "transfer"):
        cfg = DMMConfig(
            distill=True, selection="all", teacher_check=name == "default",
            inversion=InversionConfig(mode="ensemble", merged_share=0.0,
                                      teacher_labels="histogram", n_images=TRANSFER_IMAGES,
                                      iterations=150, compile=True),
            distillation=DistillConfig(teacher_signal="routed", temperature=4.0,
                                       optimizer="adam", lr=1e-3, trainable="all",
                                       steps=TRANSFER_STEPS, gamma=0.0, eta=0.0,
                                       ce_weight=0.0, update_bn=True, augment=False,
                                       cache_teachers=True))
    else:
        raise DMMError(f"unknown DMM preset {name!r}; choose one of {', '.join(PRESETS)}")
    return with_overrides(cfg, overrides, f"preset {name!r}") if overrides else cfg


def with_overrides(cfg: DMMConfig, overrides: object, where: str) -> DMMConfig:
    """`cfg` with a JSON object of DMMConfig fields applied (nested `inversion` and
    `distillation` objects update field by field; an InversionConfig or DistillConfig replaces
    the part whole); `where` names the source in errors."""
    if not isinstance(overrides, dict):
        raise DMMError(f"{where}: expected a JSON object of DMMConfig fields")
    merged = cfg.to_dict()
    for k, v in overrides.items():
        if isinstance(v, (InversionConfig, DistillConfig)):
            merged[k] = v.to_dict()
        elif isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = {**merged[k], **v}
        else:
            merged[k] = v
    try:
        out = DMMConfig.from_dict(merged)
    except (TypeError, DMMError) as e:
        raise DMMError(f"{where}: {e}") from e
    return out


@dataclass
class DMMReport:
    divergence: dict
    teachers: list[int]
    inversion: dict = field(default_factory=dict)
    distillation: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what refine changed in the config, why
    pseudo: PseudoData | None = field(default=None, repr=False)  # for grids; not serialized

    def to_dict(self) -> dict:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)
                if f.name != "pseudo"}


def _as_module(template: nn.Module, m: nn.Module | StateDict) -> nn.Module:
    if isinstance(m, nn.Module):
        return m
    out = copy.deepcopy(template)
    out.load_state_dict(m)
    return out


def refine(
    student: nn.Module | StateDict,
    teachers: Sequence[nn.Module | StateDict],
    config: DMMConfig | None = None,
    *,
    template: nn.Module | None = None,
    n_samples: Sequence[int] | None = None,
    input_shape: tuple[int, int, int] | None = None,
    pixel_range: tuple[float, float] | None = None,
    pseudo: PseudoData | None = None,
    label_counts: Sequence[Sequence[int]] | None = None,
    progress: bool = False,
) -> tuple[nn.Module, DMMReport]:
    """DMM refinement of a merged `student` with domain models `teachers`.

    Modules or state dicts are accepted (state dicts need `template`, a module of the shared
    architecture, unless the student is a module). The student is copied, never changed in
    place. `n_samples` are the teachers' sample counts (for `buffer_weights="samples"`).
    `label_counts` are the teachers' training samples per class (checkpoint metadata
    `label_counts`): the `histogram` inversion targets and the `routed` teacher signal use
    them; without them the routed signal estimates them from the pseudo-data
    (`dmm.distill.estimate_label_counts`, reported).
    `pseudo` reuses pseudo-data synthesized earlier (e.g. by another configuration of the same
    student and buffers) instead of synthesizing anew.
    """
    cfg = config or preset("default")
    cfg.validate()
    if not teachers:
        raise DMMError("DMM needs at least one domain model (teacher)")
    template = template or (student if isinstance(student, nn.Module) else
                            next((t for t in teachers if isinstance(t, nn.Module)), None))
    if template is None:
        raise DMMError("state dicts only: pass template=<a module of the architecture>")
    if not bn_layers(template):
        raise DMMError("DMM needs BatchNorm statistics (normalization inversion and buffer "
                       "aggregation read them); the model has no BatchNorm layer")
    model = copy.deepcopy(_as_module(template, student))
    teacher_mods = [_as_module(template, t) for t in teachers]
    t_states = [state_of(t) for t in teacher_mods]
    check_finite([state_of(model), *t_states], ["student", *[f"teacher {i}" for i in
                                                              range(len(t_states))]])
    shape, num_classes = probe_classifier(model, input_shape)
    cfg, notes = _resolve(cfg, label_counts)
    reused = pseudo is not None
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    if cfg.buffer_aggregation:
        if cfg.buffer_weights == "samples" and n_samples is None:
            raise DMMError("buffer_weights='samples' needs the teachers' sample counts")
        w = list(n_samples) if cfg.buffer_weights == "samples" else None
        model.load_state_dict(aggregate_bn_buffers(t_states, model, weights=w,
                                                   into=state_of(model)))
    timings["buffers_s"] = time.perf_counter() - t0

    div = divergence_scores(t_states, state_of(model), model, beta=cfg.beta,
                            mode=cfg.selection, tau=cfg.tau, top_k=cfg.top_k)
    selected = div.selected if cfg.distill else []
    report = DMMReport(div.to_dict(), selected, config=cfg.to_dict(), notes=notes)
    log.info("divergent teachers: %s", selected)

    synth = synthesize
    pairs = bool(getattr(model, "text_dim", None))
    if pairs:  # image + text: pseudo-pairs (dmm.multimodal)
        from dmm.multimodal.synth import synthesize_pairs as synth
    extra = {"label_counts": label_counts} if label_counts is not None else {}
    checked_pool_s = 0.0  # a reused pool the check judged on, when the head then ran
    checking = cfg.teacher_check and cfg.distill and selected and cfg.distillation.kd_weight > 0
    if checking and pairs and not cfg.check_pairs:
        checking = False
        notes.append("teacher check: not run for an image + text model (check_pairs false); "
                     "the routed transfer runs")
    if checking:
        # do the teachers know what the student does not? judged on the pool itself
        # (check_images None) or on a probe inverted like it (its own seed)
        if cfg.check_images is None:
            if pseudo is None:
                pseudo = synth(model, teacher_mods, cfg.inversion, num_classes=num_classes,
                               input_shape=shape, seed=cfg.seed, pixel_range=pixel_range,
                               progress=progress, **extra)
            probe = pseudo
        else:
            probe = synth(model, teacher_mods, replace(cfg.inversion, n_images=cfg.check_images),
                          num_classes=num_classes, input_shape=shape, seed=cfg.seed + 7919,
                          pixel_range=pixel_range, **extra)
        t1 = time.perf_counter()
        sel = [teacher_mods[i] for i in selected]
        c = _counts(label_counts, selected, teacher_mods, probe, n_samples, report)
        check = teacher_check(model, sel, probe, c, sources=selected,
                              bf16=cfg.distillation.bf16)
        timings["check_s"] = time.perf_counter() - t1
        report.distillation["teacher_check"] = check
        log.info("teacher check: %s", check)
        if not check["transfer"]:  # the teachers know nothing the student lacks
            if cfg.check_images is None:  # the pool was the check's: its cost counts
                checked_pool_s = pseudo.info.get("seconds", 0.0) if reused else 0.0
                timings["check_inversion_s"] = pseudo.info.get("seconds", 0.0)
            cfg = head_fallback(cfg)
            notes.append("teacher check: the clients know nothing the merged model lacks, so "
                         "the head-only refinement (preset 'head') runs")
            selected, report.teachers, report.config = [], [], cfg.to_dict()
            pseudo, reused = None, False  # the transfer's pool is not the head's

    if cfg.inversion_augmentation or (cfg.distill and selected):
        t1 = time.perf_counter()
        if pseudo is None:
            pseudo = synth(model, teacher_mods, cfg.inversion, num_classes=num_classes,
                           input_shape=shape, seed=cfg.seed, pixel_range=pixel_range,
                           progress=progress, **extra)
        timings["inversion_s"] = pseudo.info.get("seconds", time.perf_counter() - t1)
        report.inversion = {k: v for k, v in pseudo.info.items() if k != "batches"}
        report.inversion["bn_loss"] = _bn_summary(pseudo)
        t2 = time.perf_counter()
        dcfg = copy.deepcopy(cfg.distillation)
        # the switches turn the terms off; their weights are the distillation config's
        dcfg.kd_weight = dcfg.kd_weight if (cfg.distill and selected) else 0.0
        dcfg.ce_weight = dcfg.ce_weight if cfg.inversion_augmentation else 0.0
        counts = None
        if dcfg.kd_weight > 0 and dcfg.teacher_signal == "routed":
            counts = _counts(label_counts, selected, teacher_mods, pseudo, n_samples, report)
        model, drep = distill(model, [teacher_mods[i] for i in selected], pseudo.images,
                              pseudo.labels, dcfg, label_counts=counts, seed=cfg.seed,
                              progress=progress)
        timings["distill_s"] = time.perf_counter() - t2
        report.distillation = {**drep.to_dict(), **report.distillation}
        report.pseudo = pseudo
    # reused pseudo-data still count: the wall time is what this configuration costs alone
    timings["total_s"] = time.perf_counter() - t0 + checked_pool_s + (
        timings.get("inversion_s", 0.0) if reused else 0.0)
    report.timings = timings
    model.eval()
    return model, report


def _counts(label_counts, selected: list[int], teachers: list[nn.Module], pseudo: PseudoData,
            n_samples, report: DMMReport | None) -> torch.Tensor:
    """The selected teachers' label histograms: given, or estimated on `pseudo` (reported)."""
    if label_counts is not None:
        return torch.as_tensor([list(label_counts[i]) for i in selected])
    counts = estimate_label_counts([teachers[i] for i in selected], pseudo,
                                   [n_samples[i] if n_samples else 1 for i in selected],
                                   sources=selected)
    if report is not None:
        report.distillation["label_counts_estimated"] = counts.tolist()
    return counts


HEAD_IMAGES, HEAD_STEPS = 384, 200  # the head-only refinement's budget (preset "head")


def head_fallback(cfg: DMMConfig) -> DMMConfig:
    """What the default runs where the teacher check finds nothing to transfer: the head-only
    refinement (`preset("head")` for the default's own budget; a smaller budget given to the
    default caps it), with the config's seed, buffer weights, compile and bf16 settings."""
    head = preset("head")
    inv = replace(cfg.inversion, mode=head.inversion.mode,
                  merged_share=head.inversion.merged_share,
                  teacher_labels=head.inversion.teacher_labels,
                  n_images=min(cfg.inversion.n_images, HEAD_IMAGES))
    dist = replace(head.distillation, bf16=cfg.distillation.bf16,
                   steps=min(cfg.distillation.steps, HEAD_STEPS))
    return replace(head, seed=cfg.seed, buffer_weights=cfg.buffer_weights, inversion=inv,
                   distillation=dist)


def _resolve(cfg: DMMConfig, label_counts) -> tuple[DMMConfig, list[str]]:
    """What `cfg` becomes for these inputs (each change is a report note): without label
    histograms for `teacher_labels="histogram"`, each teacher's targets are its own
    predictions on its inversions instead (the routed signal then estimates the histograms).
    Image + text models run every configuration as images do, on pseudo-pairs
    (`dmm.multimodal.synth`)."""
    notes = []
    inv, note = inversion_for(cfg.inversion, label_counts)
    if note:
        notes.append(note)
        cfg = replace(cfg, inversion=inv)
    return cfg, notes


def inversion_for(inv: InversionConfig, label_counts) -> tuple[InversionConfig, str | None]:
    """`inv` as it can run with these label histograms: without them, histogram targets become
    each teacher's own predictions (and a note says so)."""
    if label_counts is None and inv.mode == "ensemble" and inv.teacher_labels == "histogram":
        return replace(inv, teacher_labels="prediction"), (
            "no label histograms given: each teacher's inversion targets are its own "
            "predictions, the routed weights are estimated")
    return inv, None


def _bn_summary(pseudo: PseudoData) -> dict:
    b = pseudo.info.get("batches", [])
    if not b:
        return {}
    return {"initial_mean": sum(x["bn_initial"] for x in b) / len(b),
            "final_mean": sum(x["bn_final"] for x in b) / len(b)}


def merge_and_refine(
    models: Sequence[nn.Module | StateDict],
    config: DMMConfig | None = None,
    *,
    method: str = "average",
    template: nn.Module | None = None,
    weights: Sequence[float] | None = None,
    n_samples: Sequence[int] | None = None,
    base: StateDict | None = None,
    method_params: dict | None = None,
    refine_model: bool = True,
    **refine_kwargs,
) -> tuple[nn.Module, DMMReport | None]:
    """Merge `models` with a registered method, then (optionally) refine with DMM.

    With `exclude_divergent`, the merge is redone over the non-divergent models only (the
    paper's "merge the similar models first"); all models still serve as teachers.
    """
    cfg = config or preset("default")
    template = template or next((m for m in models if isinstance(m, nn.Module)), None)
    if template is None:
        raise DMMError("state dicts only: pass template=<a module of the architecture>")
    states = [state_of(m) for m in models]
    params = method_params or {}
    merged = merge_states(states, method, model=template, weights=weights, base=base, **params)
    if refine_model and cfg.exclude_divergent and len(states) > 2:
        div = divergence_scores(states, merged, template, beta=cfg.beta, mode=cfg.selection,
                                tau=cfg.tau, top_k=cfg.top_k)
        keep = [i for i in range(len(states)) if i not in div.selected]
        if keep:
            merged = merge_states([states[i] for i in keep], method, model=template,
                                  weights=None if weights is None else [weights[i] for i in keep],
                                  base=base, **params)
    student = _as_module(template, merged)
    if not refine_model:
        return student, None
    return refine(student, states, cfg, template=template, n_samples=n_samples, **refine_kwargs)
