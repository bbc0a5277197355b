"""Pseudo-data by normalization inversion (paper Eq. 5; DeepInversion, Yin et al., CVPR 2020).

A batch of inputs x, initialized N(0, 1), is optimized with Adam so that at every BatchNorm
layer of the inverted network the batch statistics of the layer's input match stored statistics:

    L = w_bn * sum_l m_l (||mean_l(x) - mu_l||_2 + ||var_l(x) - s2_l||_2)
        + w_ce * CE(f(x), y) + w_tv * TV(x) + w_l2 * ||x||^2,

with m_1 = `first_bn_multiplier` and m_l = 1 after; random jitter (roll) and horizontal flips each
step; inputs clamped to the normalized pixel range. Targets y are class-balanced.

Two modes (`InversionConfig.mode`):
- `merged` (the paper): invert the merged model against its (aggregated) statistics.
- `ensemble`: additionally invert every teacher against its own statistics (the statistics of
  its private data: its domain, as FedF2DG does); each teacher's share is labelled by the
  teacher (`teacher_labels="prediction"`: no CE term, label = the teacher's argmax afterwards),
  steered to class-balanced targets through the teacher (`"balanced"`), or steered to targets
  drawn from the teacher's own label histogram (`"histogram"`, FedF2DG; `label_counts`), so a
  one-class client is asked only for its class.

Deviations from DeepInversion's CIFAR script: a few hundred steps with a cosine step size
instead of 2000 (a CPU budget), TV as the mean squared neighbour difference, optional bf16
autocast and torch.compile for speed (measured in benchmarks/bench_core.py).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dmm.config import check_fields, check_range
from dmm.errors import DMMError
from dmm.evaluate import autocast, model_device
from dmm.synth.hooks import BNStatLoss, Stats, running_stats

log = logging.getLogger(__name__)
MODES = ("merged", "ensemble")
TEACHER_LABELS = ("prediction", "balanced", "histogram")
TEXT_MODES = ("drawn", "free")


@dataclass
class InversionConfig:
    n_images: int = 384            # pseudo-images in total
    batch_size: int = 128          # images optimized together (BN statistics are per batch)
    iterations: int = 150          # Adam steps per batch
    lr: float = 0.25               # Adam step size on the pixels (cosine-decayed)
    bn_weight: float = 1.0         # w_bn
    first_bn_multiplier: float = 10.0
    ce_weight: float = 0.5         # w_ce (0: statistics only)
    tv_weight: float = 1e-3        # w_tv on mean squared neighbour differences
    l2_weight: float = 0.0         # w_l2 on mean squared pixel
    jitter: int = 2                # max roll in pixels
    flip: bool = True
    bf16: bool = True              # bf16 autocast for the network passes
    compile: bool = False          # torch.compile the inverted network: 3.6x faster steps,
    #                                ~35 s first compile (measured, quarter-width ResNet-18)
    mode: str = "merged"           # merged | ensemble
    teacher_labels: str = "prediction"  # ensemble: prediction | balanced | histogram
    merged_share: float = 0.5      # ensemble: fraction of images inverted on the merged model
    text: str = "drawn"            # image + text pairs only (dmm.multimodal.synth): the text
    #                                features drawn from the source model's fused BatchNorm
    #                                statistics and held fixed (drawn), or optimized freely on
    #                                the unit sphere (free, the first pair inversion)

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        check_fields(self, "inversion")
        for name in ("bn_weight", "first_bn_multiplier", "ce_weight", "tv_weight", "l2_weight",
                     "jitter"):
            check_range("inversion", name, getattr(self, name), lo=0)
        if not self.lr > 0:
            raise DMMError(f"inversion lr must be > 0, got {self.lr}")
        if self.mode not in MODES:
            raise DMMError(f"unknown inversion mode {self.mode!r}; choose {' or '.join(MODES)}")
        if self.teacher_labels not in TEACHER_LABELS:
            raise DMMError(f"teacher_labels must be one of {', '.join(TEACHER_LABELS)}, got "
                           f"{self.teacher_labels!r}")
        for name in ("n_images", "batch_size", "iterations"):
            if getattr(self, name) < 1:
                raise DMMError(f"inversion {name} must be >= 1")
        if not 0 <= self.merged_share <= 1:
            raise DMMError("merged_share must be in [0, 1]")
        if self.text not in TEXT_MODES:
            raise DMMError(f"inversion text must be one of {', '.join(TEXT_MODES)}, got "
                           f"{self.text!r}")


@dataclass
class PseudoData:
    images: torch.Tensor           # (N, C, H, W) float, in the models' normalized input space
    labels: torch.Tensor           # (N,) target class of each image
    source: torch.Tensor           # (N,) -1 = merged model, k = teacher k
    info: dict = field(default_factory=dict)


def probe_classifier(model: nn.Module, input_shape: tuple[int, ...] | None = None
                     ) -> tuple[tuple[int, ...], int]:
    """Input shape (C, H, W) and number of classes of an image classifier.

    Without `input_shape`, the first conv's in_channels at 32x32 (the CIFAR-style default).
    """
    if input_shape is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise DMMError("cannot infer the input shape: give input_shape=(C, H, W)")
        input_shape = (conv.in_channels, 32, 32)
    was = model.training
    model.eval()
    dev = model_device(model)
    probe = [torch.zeros(2, *input_shape, device=dev)]
    if getattr(model, "text_dim", None):  # image + text models take (image, text features)
        probe.append(torch.zeros(2, model.text_dim, device=dev))
    try:
        with torch.no_grad():
            out = model(*probe)
    finally:
        model.train(was)
    return tuple(input_shape), int(out.shape[1])


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between horizontally and vertically neighbouring pixels."""
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + \
        (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()


def histogram_labels(n: int, counts, generator: torch.Generator) -> torch.Tensor:
    """n labels in proportion to a label histogram (largest remainders, so a class with a
    share p gets floor(n p) or one more), shuffled; classes with no samples never appear."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    if c.ndim != 1 or not (c >= 0).all() or c.sum() <= 0:
        raise DMMError("a label histogram must be non-negative counts with a positive sum")
    share = c / c.sum() * n
    k = share.floor().long()
    rest = n - int(k.sum())
    if rest:
        frac = share - share.floor()
        k[torch.argsort(frac, descending=True, stable=True)[:rest]] += 1
    y = torch.repeat_interleave(torch.arange(len(c)), k)
    return y[torch.randperm(n, generator=generator)]


def balanced_labels(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """n labels with every class as equally often as possible, shuffled."""
    reps = math.ceil(n / num_classes)
    y = torch.arange(num_classes).repeat(reps)[:n]
    return y[torch.randperm(n, generator=generator)]


@contextmanager
def frozen_eval(model: nn.Module):
    """The model in eval mode with no parameter gradients for the block; restored after."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)


def jitter_flip(x: torch.Tensor, cfg: InversionConfig, generator: torch.Generator
                ) -> torch.Tensor:
    """DeepInversion's view of the batch for one step: a random roll by up to `cfg.jitter`
    pixels, then a horizontal flip with probability 1/2 (one draw each, in this order)."""
    if cfg.jitter > 0:
        dx, dy = (int(v) for v in torch.randint(-cfg.jitter, cfg.jitter + 1, (2,),
                                                generator=generator))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if cfg.flip and bool(torch.rand(1, generator=generator) < 0.5):
        x = x.flip(3)
    return x


def inversion_loss(cfg: InversionConfig, bn_loss: torch.Tensor, x: torch.Tensor,
                   logits: torch.Tensor, labels: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5's objective for one step: w_bn * the statistic term + w_tv * TV(x), + w_ce * CE
    of the logits against `labels` (given, w_ce > 0) + w_l2 * mean x^2 (w_l2 > 0). Returns
    (loss, ce), ce 0 where the CE term is off."""
    loss = cfg.bn_weight * bn_loss + cfg.tv_weight * total_variation(x)
    ce = torch.zeros((), device=x.device)
    if labels is not None and cfg.ce_weight > 0:
        ce = F.cross_entropy(logits.float(), labels)
        loss = loss + cfg.ce_weight * ce
    if cfg.l2_weight > 0:
        loss = loss + cfg.l2_weight * x.pow(2).mean()
    return loss, ce


def invert_batch(
    model: nn.Module,
    labels: torch.Tensor | None,
    shape: tuple[int, ...],
    cfg: InversionConfig,
    *,
    generator: torch.Generator,
    targets: Stats | None = None,
    pixel_range: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Optimize one batch of inputs of `shape` against `model`'s BN statistics (or `targets`).

    `labels=None` drops the CE term. Returns the images and {bn_initial, bn_final, ce_final}.
    The model's parameters are not changed and get no gradients.
    """
    dev = model_device(model)
    labels = labels.to(dev) if labels is not None else None
    x = torch.randn(shape, generator=generator).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iterations, eta_min=cfg.lr * 0.05)
    info: dict = {}
    with frozen_eval(model), \
            BNStatLoss(model, targets if targets is not None else running_stats(model)) as bn:
        for it in range(cfg.iterations):
            xj = jitter_flip(x, cfg, generator)
            with autocast(cfg.bf16, dev.type):
                logits = model(xj.contiguous(memory_format=torch.channels_last))
            bn_loss = bn.total(cfg.first_bn_multiplier)
            loss, ce = inversion_loss(cfg, bn_loss, x, logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if pixel_range is not None:
                with torch.no_grad():
                    x.clamp_(*pixel_range)
            if it == 0:
                info["bn_initial"] = float(bn_loss.detach())
        info["bn_final"] = float(bn_loss.detach())
        info["ce_final"] = float(ce.detach())
    return x.detach().cpu(), info


@torch.no_grad()
def bn_matching_loss(model: nn.Module, x: torch.Tensor, targets: Stats | None = None,
                     first_multiplier: float = 1.0) -> float:
    """The statistic-matching term of Eq. 5 for inputs `x` (no jitter), for reporting."""
    was = model.training
    model.eval()
    try:
        with BNStatLoss(model, targets) as bn:
            model(x)
            return float(bn.total(first_multiplier))
    finally:
        model.train(was)


def compile_once(model: nn.Module, cache: dict[int, nn.Module]) -> nn.Module:
    """torch.compile once per model; eager if compilation is unavailable here."""
    if id(model) not in cache:
        try:
            model.to(memory_format=torch.channels_last)
            cache[id(model)] = torch.compile(model)
        except Exception as e:  # noqa: BLE001 - any compiler trouble means: run eager
            log.warning("torch.compile unavailable (%s); inverting eagerly", e)
            cache[id(model)] = model
    return cache[id(model)]


def call_compiled(fn, model: nn.Module, compiled: dict[int, nn.Module], use_compile: bool,
                  *args, what: str = "inversion", **kw):
    """`fn(net, *args, **kw)` on the compiled form of `model` (`compile_once`) where
    `use_compile`; a compiler failure, which surfaces at the first call, is logged and the
    model runs eagerly from then on."""
    net = compile_once(model, compiled) if use_compile else model
    try:
        return fn(net, *args, **kw)
    except Exception as e:  # noqa: BLE001 - compiler failures surface at first call
        if net is model:
            raise
        log.warning("compiled %s failed (%s); falling back to eager", what, e)
        compiled[id(model)] = model
        return fn(model, *args, **kw)


def argmax_labels(model: nn.Module, inputs: tuple, bf16: bool) -> torch.Tensor:
    """The labels `model` gives its own inversions (`teacher_labels="prediction"`)."""
    dev = model_device(model)
    with torch.no_grad(), autocast(bf16, dev.type):
        return model.eval()(*(x.to(dev) for x in inputs)).float().argmax(1).cpu()


def plan(cfg: InversionConfig, merged: nn.Module, teachers: list[nn.Module] | None,
         label_counts=None) -> list[tuple[int, nn.Module, int]]:
    """What an inversion runs: (source, model, number of samples) per source, -1 the merged
    model, k teacher k (`cfg.merged_share` of the samples on the merged model in `ensemble`
    mode, the rest shared evenly by the teachers). Checks `cfg` and the histograms."""
    cfg.validate()
    if cfg.mode == "ensemble" and teachers and cfg.teacher_labels == "histogram":
        if label_counts is None or len(label_counts) != len(teachers):
            raise DMMError("teacher_labels='histogram' needs one label histogram per teacher "
                           "(label_counts)")
    if cfg.mode == "merged" or not teachers:
        return [(-1, merged, cfg.n_images)]
    jobs = []
    n_merged = int(round(cfg.merged_share * cfg.n_images))
    if n_merged:
        jobs.append((-1, merged, n_merged))
    rest = cfg.n_images - n_merged
    per = [rest // len(teachers) + (1 if k < rest % len(teachers) else 0)
           for k in range(len(teachers))]
    jobs.extend((k, t, n) for k, (t, n) in enumerate(zip(teachers, per, strict=True)) if n)
    return jobs


def batch_targets(cfg: InversionConfig, source: int, b: int, num_classes: int, label_counts,
                  generator: torch.Generator) -> tuple[torch.Tensor, bool]:
    """Targets of one batch of `source` and whether the CE term steers to them (False: the
    source labels its inversions by its own argmax afterwards, `teacher_labels="prediction"`).
    Histogram targets for a teacher where `teacher_labels="histogram"`, else class-balanced."""
    use_ce = source == -1 or cfg.teacher_labels in ("balanced", "histogram")
    if source >= 0 and cfg.teacher_labels == "histogram" and label_counts is not None:
        return histogram_labels(b, label_counts[source], generator), use_ce
    return balanced_labels(b, num_classes, generator), use_ce


def synthesize(
    merged: nn.Module,
    teachers: list[nn.Module] | None,
    cfg: InversionConfig,
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    seed: int = 0,
    pixel_range: tuple[float, float] | None = None,
    label_counts=None,
    progress: bool = False,
) -> PseudoData:
    """Pseudo-data for DMM: `cfg.n_images` images with labels and their source model.

    `label_counts` (teachers x classes) are the teachers' training samples per class, which
    `teacher_labels="histogram"` draws each teacher's targets from."""
    jobs = plan(cfg, merged, teachers, label_counts)
    g = torch.Generator().manual_seed(seed)
    images, labels, sources, infos = [], [], [], []
    t0 = time.perf_counter()
    compiled: dict[int, nn.Module] = {}
    total_batches = sum(math.ceil(n / cfg.batch_size) for _, _, n in jobs)
    bar = tqdm(total=total_batches, desc="inversion", disable=not progress)
    for source, model, n in jobs:
        for start in range(0, n, cfg.batch_size):
            b = min(cfg.batch_size, n - start)
            y, use_ce = batch_targets(cfg, source, b, num_classes, label_counts, g)
            x, info = call_compiled(invert_batch, model, compiled, cfg.compile,
                                    y if use_ce else None, (b, *input_shape), cfg,
                                    generator=g, pixel_range=pixel_range)
            if not use_ce:
                y = argmax_labels(model, (x,), cfg.bf16)
            images.append(x)
            labels.append(y)
            sources.append(torch.full((b,), source, dtype=torch.long))
            infos.append({"source": source, **info})
            bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    out = PseudoData(torch.cat(images), torch.cat(labels), torch.cat(sources))
    out.info = {
        "seconds": seconds,
        "images_per_second": len(out.images) / seconds,
        "image_iterations_per_second": len(out.images) * cfg.iterations / seconds,
        "batches": infos,
        "config": cfg.to_dict(),
    }
    log.info("synthesized %d images in %.1f s", len(out.images), seconds)
    return out
