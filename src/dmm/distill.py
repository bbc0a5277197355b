"""Selective multi-teacher distillation on pseudo-data (paper Eq. 6; DESIGN step 3c).

For each pseudo-batch x (crop/flip augmented), teacher probabilities p_T at temperature T and
student probabilities p_S. A pair (x, teacher) is kept only where the teacher is confident,
max softmax(T(x)) >= gamma, and the student is uncertain, H(softmax(S(x))) / log C >= eta (both
measured at temperature 1; the paper does not say at which temperature). The loss is

    T^2 * KL(p_T || p_S) averaged over the kept pairs,

plus optional terms that the ablations and the measured variants need: `ce_weight` * CE on the
pseudo-samples' target labels (the paper's "inversion augmentation"), and `anchor_weight` * KD
towards the initial student on samples that no teacher is kept for.

Teacher signals (`teacher_signal`):
- `softmax` (the paper): every selected teacher's own softmax.
- `agree`: a teacher counts for a sample only where its argmax equals the class the sample was
  synthesized for.
- `experts`: one calibrated teacher built from all selected teachers, data-free. Each teacher
  owns the class it predicts most often on the pseudo-data; its logit for that class is
  standardized over the pseudo-data; the score of class c is the largest standardized logit of
  the teachers that own c, and the initial student's standardized logit for classes no teacher
  owns. Softmax of the scores is the target. This addresses teachers that are constant under
  argmax (a client that saw one class predicts it everywhere): their softmax says nothing about
  the input, but their logits still rank inputs.

The student's BatchNorm statistics stay frozen (eval-mode BN) unless `update_bn`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dmm import inputs as I
from dmm.config import check_fields
from dmm.data.augment import random_crop_flip
from dmm.errors import DMMError
from dmm.evaluate import autocast, model_device

log = logging.getLogger(__name__)
SIGNALS = ("softmax", "agree", "experts")


@dataclass
class DistillConfig:
    """The refinement's optimizer and loss terms. These defaults are DMM's (`preset("default")`:
    head-only SGD at 1e-2 with CE on the pseudo-labels; whole-network updates on pseudo-data
    collapsed the features on one seed of three, docs/dmm-core.md); the paper preset sets Adam
    1e-3 on the whole network. Checked when made (`validate`)."""

    steps: int = 200               # optimizer steps
    batch_size: int = 128          # pseudo-samples per step
    lr: float = 1e-2               # step size (see the measured pitfalls: keep it small)
    optimizer: str = "sgd"         # adam | sgd
    momentum: float = 0.0          # sgd only
    weight_decay: float = 0.0
    temperature: float = 2.0       # T of Eq. 6
    gamma: float = 0.9             # keep a pair if the teacher's max probability >= gamma
    eta: float = 0.5               # ... and the student's normalized entropy >= eta
    grad_clip: float | None = 5.0  # max gradient norm, None = off
    kd_weight: float = 1.0         # weight of the Eq. 6 term (0 = no distillation)
    ce_weight: float = 1.0         # CE on the pseudo-samples' target labels (inversion
    #                                augmentation); the one CE weight: DMMConfig switches it
    anchor_weight: float = 0.0     # KD to the initial student where no teacher is kept
    teacher_signal: str = "softmax"  # softmax | agree | experts
    update_bn: bool = False        # let the student's BN statistics move
    trainable: str = "head"        # all | head (only the last linear layer learns)
    augment: bool = True           # crop (pad 4) + flip on pseudo-images
    bf16: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        check_fields(self, "distillation")
        if self.teacher_signal not in SIGNALS:
            raise DMMError(f"unknown teacher signal {self.teacher_signal!r}; choose one of "
                           f"{', '.join(SIGNALS)}")
        if self.trainable not in ("all", "head"):
            raise DMMError(f"trainable must be 'all' or 'head', got {self.trainable!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise DMMError(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.steps < 0 or self.batch_size < 1:
            raise DMMError("distillation steps must be >= 0 and batch size >= 1")
        if not 0 <= self.gamma <= 1 or not 0 <= self.eta <= 1:
            raise DMMError(f"gamma and eta must be in [0, 1], got {self.gamma}, {self.eta}")
        if not self.temperature > 0 or not self.lr > 0:
            raise DMMError("temperature and lr must be > 0")
        for name in ("momentum", "weight_decay", "kd_weight", "ce_weight", "anchor_weight"):
            if not getattr(self, name) >= 0:
                raise DMMError(f"distillation {name} must be >= 0, got {getattr(self, name)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise DMMError(f"grad_clip must be > 0 or None, got {self.grad_clip}")


@dataclass
class DistillReport:
    loss_curve: list[float] = field(default_factory=list)
    kept_fraction: list[float] = field(default_factory=list)   # per teacher
    seconds: float = 0.0
    steps: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) / log C per row, in [0, 1]."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1) / math.log(logits.shape[1])


def selection_mask(teacher_logits: torch.Tensor, student_logits: torch.Tensor, gamma: float,
                   eta: float) -> torch.Tensor:
    """(J, B) bool: teacher j confident on sample b and the student uncertain on b."""
    conf = F.softmax(teacher_logits.float(), dim=2).amax(2) >= gamma
    unsure = normalized_entropy(student_logits) >= eta
    return conf & unsure.unsqueeze(0)


def kd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """T^2 * KL(p_T || p_S) averaged over the kept (teacher, sample) pairs (Eq. 6).

    teacher_logits (J, B, C), student_logits (B, C), mask (J, B). Zero if nothing is kept.
    """
    t = temperature
    log_ps = F.log_softmax(student_logits.float() / t, dim=1).unsqueeze(0)
    log_pt = F.log_softmax(teacher_logits.float() / t, dim=2)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(2)  # (J, B)
    kept = mask.float()
    return t * t * (kl * kept).sum() / kept.sum().clamp_min(1.0)


@torch.no_grad()
def _logits(model: nn.Module, x: I.Inputs, bf16: bool, batch: int = 512) -> torch.Tensor:
    model.eval()
    dev = model_device(model)
    out = []
    for i in range(0, I.count(x), batch):
        with autocast(bf16, dev.type):
            xb = I.channels_last(I.to(I.take(x, slice(i, i + batch)), dev))
            out.append(model(*I.args(xb)).float().cpu())
    return torch.cat(out)


class ExpertTeacher:
    """The `experts` signal: calibrated one-class experts, completed by the initial student."""

    def __init__(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> None:
        # teacher_logits (J, N, C), student_logits (N, C): logits on the whole pseudo-set
        j, _, c = teacher_logits.shape
        self.owned = teacher_logits.argmax(2).mode(dim=1).values  # (J,) class each teacher owns
        own = teacher_logits[torch.arange(j), :, self.owned]      # (J, N)
        self.t_mean, self.t_std = own.mean(1), own.std(1).clamp_min(1e-6)
        self.s_mean, self.s_std = student_logits.mean(0), student_logits.std(0).clamp_min(1e-6)
        self.num_classes = c

    def scores(self, teacher_logits: torch.Tensor, student0_logits: torch.Tensor) -> torch.Tensor:
        """(B, C) class scores for a batch, from (J, B, C) teacher and (B, C) student logits."""
        dev = teacher_logits.device
        teacher_logits, student0_logits = teacher_logits.cpu(), student0_logits.cpu()
        j = teacher_logits.shape[0]
        z_t = (teacher_logits[torch.arange(j), :, self.owned] - self.t_mean[:, None]) \
            / self.t_std[:, None]                                  # (J, B)
        scores = (student0_logits - self.s_mean) / self.s_std      # (B, C) fallback
        for c in range(self.num_classes):
            owners = (self.owned == c).nonzero().flatten()
            if len(owners):
                scores[:, c] = z_t[owners].amax(0)
        return scores.to(dev)


def distill(
    student: nn.Module,
    teachers: list[nn.Module],
    images: I.Inputs,
    labels: torch.Tensor,
    cfg: DistillConfig,
    *,
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, DistillReport]:
    """Refine `student` in place on pseudo-data (images, target labels); returns it and a report.

    With no teachers (or kd_weight 0) only the CE and anchor terms act. `images` may be a
    tuple (images, side inputs...) for multi-input models (`dmm.inputs`).
    """
    cfg.validate()
    g = torch.Generator().manual_seed(seed)
    report = DistillReport(kept_fraction=[0.0] * len(teachers))
    if cfg.steps == 0 or I.count(images) == 0:
        return student, report
    t0 = time.perf_counter()
    use_kd = bool(teachers) and cfg.kd_weight > 0
    initial = copy.deepcopy(student).eval() if (
        cfg.anchor_weight > 0 or (use_kd and cfg.teacher_signal == "experts")) else None
    experts = None
    if use_kd and cfg.teacher_signal == "experts":
        all_t = torch.stack([_logits(t, images, cfg.bf16) for t in teachers])
        experts = ExpertTeacher(all_t, _logits(initial, images, cfg.bf16))
    # Same memory format as the student: identical weights then give bitwise identical logits,
    # so a teacher equal to the student yields an exactly zero gradient (Adam would otherwise
    # blow rounding noise up to full-size steps).
    student.to(memory_format=torch.channels_last)
    for t in teachers:
        t.eval().to(memory_format=torch.channels_last)
    if initial is not None:
        initial.to(memory_format=torch.channels_last)
    params = [p for p in student.parameters() if p.requires_grad]
    if cfg.trainable == "head":
        head = [m for m in student.modules() if isinstance(m, nn.Linear)]
        if not head:
            raise DMMError("trainable='head' needs a final nn.Linear layer")
        params = [p for p in head[-1].parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
    kept_counts = torch.zeros(len(teachers))
    seen = 0
    dev = model_device(student)
    ac = dev.type
    for _ in tqdm(range(cfg.steps), desc="distill", disable=not progress):
        n = I.count(images)
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g)
        x, y = I.take(images, idx), labels[idx]
        if cfg.augment:
            x = I.map_image(x, lambda t: random_crop_flip(t, generator=g))
        x = I.channels_last(I.to(x, dev))
        xa = I.args(x)
        y = y.to(dev)
        student.train(cfg.update_bn)
        with autocast(cfg.bf16, ac):
            s_logits = student(*xa).float()
        loss = torch.zeros((), device=dev)
        no_teacher = torch.ones(len(y), dtype=torch.bool, device=dev)
        if use_kd:
            with torch.no_grad(), autocast(cfg.bf16, ac):
                t_logits = torch.stack([t(*xa).float() for t in teachers])  # (J, B, C)
            if experts is not None:
                with torch.no_grad(), autocast(cfg.bf16, ac):
                    s0 = initial(*xa).float()
                t_logits = experts.scores(t_logits, s0).unsqueeze(0)
            mask = selection_mask(t_logits, s_logits.detach(), cfg.gamma, cfg.eta)
            if cfg.teacher_signal == "agree":
                mask &= t_logits.argmax(2) == y.unsqueeze(0)
            loss = loss + cfg.kd_weight * kd_loss(t_logits, s_logits, mask, cfg.temperature)
            no_teacher = ~mask.any(0)
            if experts is None:
                kept_counts += mask.float().sum(1).cpu()
            else:
                kept_counts += mask.float().sum().cpu()  # the expert vote speaks for all teachers
        seen += len(y)
        if cfg.ce_weight > 0:
            loss = loss + cfg.ce_weight * F.cross_entropy(s_logits, y)
        if initial is not None and cfg.anchor_weight > 0 and no_teacher.any():
            with torch.no_grad(), autocast(cfg.bf16, ac):
                a_logits = initial(*xa).float()
            loss = loss + cfg.anchor_weight * kd_loss(
                a_logits.unsqueeze(0), s_logits, no_teacher.unsqueeze(0), cfg.temperature)
        opt.zero_grad(set_to_none=True)
        # A loss of exactly zero (e.g. a teacher identical to the student) has a gradient of
        # pure rounding noise (~1e-9), which Adam would normalize into full-size steps.
        if loss.requires_grad and float(loss.detach()) > 0.0:
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
        report.loss_curve.append(float(loss.detach()))
    student.eval()
    report.kept_fraction = (kept_counts / max(seen, 1)).tolist()
    report.seconds = time.perf_counter() - t0
    report.steps = cfg.steps
    return student, report
