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
- `routed` (FedFTG's and FedGen's class-level ensemble): for a pseudo-sample synthesized for
  class y, teacher k's softmax counts with weight n_k^y / sum_j n_j^y, its share of the training
  samples of class y (`label_counts`, from the checkpoints' metadata or estimated); where no
  teacher holds y, the initial student's softmax is the target. A one-class client then teaches
  only its class. The mixture is formed in log space, so one teacher with all the weight gives
  exactly its own log-probabilities.
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
SIGNALS = ("softmax", "agree", "experts", "routed")


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
    hard_weight: float = 0.0       # extra KD weight on samples whose student argmax differs
    #                                from the target's (hard-sample emphasis, FedFTG)
    teacher_signal: str = "softmax"  # softmax | agree | experts | routed
    update_bn: bool = False        # let the student's BN statistics move
    trainable: str = "head"        # all | head (only the last linear layer learns)
    augment: bool = True           # crop (pad 4) + flip on pseudo-images
    cache_teachers: bool = False   # teacher logits computed once per pseudo-image and reused
    #                                by every step (needs augment=False: a view changes them);
    #                                J teacher passes per image instead of per step and sample
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
        for name in ("momentum", "weight_decay", "kd_weight", "ce_weight", "anchor_weight",
                     "hard_weight"):
            if not getattr(self, name) >= 0:
                raise DMMError(f"distillation {name} must be >= 0, got {getattr(self, name)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise DMMError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.cache_teachers and self.augment:
            raise DMMError("cache_teachers needs augment=False (an augmented view changes the "
                           "teachers' logits)")


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
            temperature: float, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(p_T || p_S) averaged over the kept (teacher, sample) pairs (Eq. 6).

    teacher_logits (J, B, C), student_logits (B, C), mask (J, B). Zero if nothing is kept.
    `sample_weight` (B,) weighs each sample's pairs (hard-sample emphasis); None: all 1.
    """
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=2)
    return kl_to_log_targets(log_pt, student_logits, mask, temperature, sample_weight)


def kl_to_log_targets(log_pt: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor,
                      temperature: float, sample_weight: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """T^2 * KL(p || p_S) for targets given as log-probabilities `log_pt` (J, B, C) (already at
    temperature T), averaged over the kept pairs, each pair weighted by its sample's weight."""
    t = temperature
    log_ps = F.log_softmax(student_logits.float() / t, dim=1).unsqueeze(0)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(2)  # (J, B)
    kept = mask.float()
    if sample_weight is not None:
        kept = kept * sample_weight.unsqueeze(0)
    return t * t * (kl * kept).sum() / mask.float().sum().clamp_min(1.0)


def routed_log_targets(teacher_logits: torch.Tensor, labels: torch.Tensor,
                       label_counts: torch.Tensor, fallback_logits: torch.Tensor,
                       temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-routed targets (FedFTG / FedGen): log of sum_k w_k(y_b) softmax(T_k(x_b) / T) with
    w_k(y) = n_k^y / sum_j n_j^y, and log softmax(fallback(x_b) / T) where no teacher holds
    y_b. teacher_logits (J, B, C), labels (B,), label_counts (J, C), fallback_logits (B, C).
    Returns the (B, C) log-targets and the (B,) mask of samples some teacher holds."""
    counts = label_counts.to(teacher_logits.device).float()
    w = counts[:, labels]                                   # (J, B)
    total = w.sum(0)                                        # (B,)
    held = total > 0
    log_w = torch.log(w / total.clamp_min(1e-12))           # -inf where a teacher lacks y
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=2)  # (J, B, C)
    mixed = torch.logsumexp(log_w.unsqueeze(2) + log_pt, dim=0)          # (B, C)
    fallback = F.log_softmax(fallback_logits.float() / temperature, dim=1)
    return torch.where(held.unsqueeze(1), mixed, fallback), held


@torch.no_grad()
def estimate_label_counts(teachers: list[nn.Module], pseudo, n_samples, *,
                          sources: list[int] | None = None, bf16: bool = True) -> torch.Tensor:
    """Data-free estimate of each teacher's label histogram: n_k times its mean softmax over
    the pseudo-images of its own domain (inverted against its own statistics, `pseudo.source
    == sources[k]`), or over all pseudo-images when it has none. (J, C), float."""
    out = []
    for j, t in enumerate(teachers):
        own = pseudo.source == (sources[j] if sources is not None else j)
        x = I.take(pseudo.images, own.nonzero().flatten()) if own.any() else pseudo.images
        p = F.softmax(_logits(t, x, bf16), 1).mean(0)
        out.append(p * float(n_samples[j]))
    return torch.stack(out)


@torch.no_grad()
def teacher_check(student: nn.Module, teachers: list[nn.Module], pseudo, label_counts, *,
                  sources: list[int] | None = None, bf16: bool = True) -> dict:
    """Data-free check whether the teachers know something the student does not.

    On the pseudo-data, each sample labelled by the class it was synthesized for, it compares
    the student's accuracy with that of the label-count routed ensemble of the teachers *other
    than the sample's source* (score of class c: sum_k w_k^c softmax(T_k(x))_c with
    w_k^c = n_k^c / sum_j n_j^c over those teachers): a teacher always recognizes its own
    inversions, so only the others say whether the knowledge is shared and transferable. Where
    the clients are one-class experts, no other teacher holds a sample's class and the ensemble
    scores nothing; where they overlap, the others recognize it. `label_counts` (J, C),
    `sources[j]` the `pseudo.source` id of teacher j (default j). Returns both accuracies and
    `transfer` (the ensemble strictly better)."""
    counts = torch.as_tensor(label_counts).float()                   # (J, C)
    ids = torch.as_tensor(sources if sources is not None else list(range(len(teachers))))
    probs = torch.stack([F.softmax(_logits(t, pseudo.images, bf16), 1) for t in teachers])
    others = (ids.unsqueeze(1) != pseudo.source.unsqueeze(0)).float()  # (J, N)
    w = counts.unsqueeze(1) * others.unsqueeze(2)                     # (J, N, C)
    w = w / w.sum(0, keepdim=True).clamp_min(1e-12)
    scores = (w * probs).sum(0)                                       # (N, C)
    y = pseudo.labels
    ens = ((scores.argmax(1) == y) & (scores.amax(1) > 0)).float().mean().item()
    stu = (_logits(student, pseudo.images, bf16).argmax(1) == y).float().mean().item()
    return {"student_accuracy": stu, "others_ensemble_accuracy": ens, "transfer": ens > stu}


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
    label_counts: torch.Tensor | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, DistillReport]:
    """Refine `student` in place on pseudo-data (images, target labels); returns it and a report.

    With no teachers (or kd_weight 0) only the CE and anchor terms act. `images` may be a
    tuple (images, side inputs...) for multi-input models (`dmm.inputs`). `label_counts`
    (J, C), the teachers' training samples per class, is what the `routed` signal weighs by.
    """
    cfg.validate()
    routed = bool(teachers) and cfg.kd_weight > 0 and cfg.teacher_signal == "routed"
    if routed:
        if label_counts is None:
            raise DMMError("the routed teacher signal needs the teachers' label counts")
        label_counts = torch.as_tensor(label_counts)
        if label_counts.ndim != 2 or label_counts.shape[0] != len(teachers):
            raise DMMError(f"label counts must be (teachers, classes) = ({len(teachers)}, C), "
                           f"got {tuple(label_counts.shape)}")
    g = torch.Generator().manual_seed(seed)
    report = DistillReport(kept_fraction=[0.0] * len(teachers))
    if cfg.steps == 0 or I.count(images) == 0:
        return student, report
    t0 = time.perf_counter()
    use_kd = bool(teachers) and cfg.kd_weight > 0
    initial = copy.deepcopy(student).eval() if (
        cfg.anchor_weight > 0 or (use_kd and cfg.teacher_signal in ("experts", "routed"))
    ) else None
    experts = None
    all_t = None
    if use_kd and (cfg.teacher_signal == "experts" or cfg.cache_teachers):
        all_t = torch.stack([_logits(t, images, cfg.bf16) for t in teachers])  # (J, N, C)
    if use_kd and cfg.teacher_signal == "experts":
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
            if cfg.cache_teachers:
                t_logits = all_t[:, idx].to(dev)
            else:
                with torch.no_grad(), autocast(cfg.bf16, ac):
                    t_logits = torch.stack([t(*xa).float() for t in teachers])  # (J, B, C)
            if experts is not None or routed:
                with torch.no_grad(), autocast(cfg.bf16, ac):
                    s0 = initial(*xa).float()
            if experts is not None:
                t_logits = experts.scores(t_logits, s0).unsqueeze(0)
            if routed:
                log_t, _ = routed_log_targets(t_logits, y, label_counts, s0, cfg.temperature)
                log_t = log_t.unsqueeze(0)                                   # (1, B, C)
                conf = log_t.exp().amax(2) >= cfg.gamma
                mask = conf & (normalized_entropy(s_logits.detach()) >= cfg.eta).unsqueeze(0)
                target_arg = log_t[0].argmax(1)
            else:
                mask = selection_mask(t_logits, s_logits.detach(), cfg.gamma, cfg.eta)
                if cfg.teacher_signal == "agree":
                    mask &= t_logits.argmax(2) == y.unsqueeze(0)
                target_arg = t_logits.mean(0).argmax(1)
            weight = None
            if cfg.hard_weight > 0:  # emphasize where the student and the target disagree
                hard = (s_logits.detach().argmax(1) != target_arg).float()
                weight = 1.0 + cfg.hard_weight * hard
            if routed:
                loss = loss + cfg.kd_weight * kl_to_log_targets(log_t, s_logits, mask,
                                                                cfg.temperature, weight)
            else:
                loss = loss + cfg.kd_weight * kd_loss(t_logits, s_logits, mask,
                                                      cfg.temperature, weight)
            no_teacher = ~mask.any(0)
            if experts is None and not routed:
                kept_counts += mask.float().sum(1).cpu()
            elif routed:  # a teacher counts for the kept samples of the classes it holds
                w = label_counts[:, y.cpu()].float() > 0                      # (J, B)
                kept_counts += (w & mask.cpu()).float().sum(1)
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
