"""Pseudo image + text pairs from BatchNorm statistics (DMM's inversion for ImageTextNet).

A pair is an image batch x and a text-feature batch t. The fusion BatchNorm1d sees
concat(f_img(x), t), so its running statistics over the text dimensions are the per-dimension
mean and variance of the text features over the data the model was trained on: a client's own
texts for a client model, the pooled texts for the merged model after buffer aggregation.

Text features (`InversionConfig.text`):
- `drawn` (default): t ~ N(mu, diag(var)), the source model's fused statistics over the text
  dimensions, drawn once per pair and held fixed while x is optimized. The draws have exactly
  the moments the clients' texts had, but no class structure of their own (BatchNorm stores no
  covariance and nothing per class), so the pair's class lives in the image and the teacher's
  response to the pair is what the refinement learns from.
- `free` (the first pair inversion): t starts on the unit sphere and is optimized with x, then
  projected back onto the sphere after each step (the encoder's sentence features are
  L2-normalized). Measured on emoji-mm: the CE term pulls t onto the head's class directions,
  so the merged model classifies its own pairs with certainty and refinement has nothing to
  learn (docs/multimodal.md).

The image x is optimized with the paper's Eq. 5 over every BN layer (the image encoder's
BatchNorm2d layers and the fused layer), CE of the model's logits on the pair against the
pair's target, total variation, jitter and flip, and clamped to the pixel range after each step.

Sources follow `dmm.synth.inversion` (`plan`, `batch_targets`): mode `merged` inverts the merged
model against its pooled statistics with class-balanced targets; mode `ensemble` inverts each
client model against its own statistics (its domain: image BN layers and the text draws alike)
with targets from its label histogram (`teacher_labels="histogram"`), balanced targets, or its
own predictions. `compile` compiles each inverted model as for images (eager on failure).

What it can recover: per-dimension first and second moments of each client's text features and,
through the heads, the directions that separate the classes. What it cannot: sentences or
tokens, and any correlation between text dimensions (BN stores no covariance).
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dmm.errors import DMMError
from dmm.evaluate import autocast, model_device
from dmm.synth.hooks import BNStatLoss, running_stats
from dmm.synth.inversion import (
    InversionConfig,
    PseudoData,
    argmax_labels,
    batch_targets,
    call_compiled,
    frozen_eval,
    inversion_loss,
    jitter_flip,
    plan,
)

log = logging.getLogger(__name__)


def fused_text_stats(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The running mean and variance of the fused BatchNorm1d over the text dimensions."""
    bn = model.fusion_bn
    d = model.image_dim
    return bn.running_mean[d:].detach().float().cpu(), bn.running_var[d:].detach().float().cpu()


def draw_text(model: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor:
    """n text features drawn from N(mu, diag(var)) of `model`'s fused text statistics."""
    mean, var = fused_text_stats(model)
    z = torch.randn((n, len(mean)), generator=generator)
    return mean + z * var.clamp_min(0).sqrt()


def invert_pairs(model: nn.Module, labels: torch.Tensor | None, shape: tuple[int, ...],
                 cfg: InversionConfig, *, generator: torch.Generator,
                 pixel_range: tuple[float, float] | None = None,
                 text: torch.Tensor | None = None, text_lr: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Optimize one batch of pairs against `model`'s own BN statistics. `text` given: the
    text features, held fixed (`cfg.text="drawn"`); None: free unit-sphere features optimized
    with the image. `labels=None` drops the CE term. Returns (x, t, info)."""
    dev = model_device(model)
    b = shape[0]
    labels = labels.to(dev) if labels is not None else None
    x = torch.randn(shape, generator=generator).to(dev).requires_grad_(True)
    groups = [{"params": [x], "lr": cfg.lr}]
    free = text is None
    if free:
        t = F.normalize(torch.randn((b, model.text_dim), generator=generator), dim=1)
        t = t.to(dev).requires_grad_(True)
        # pixels are O(1) per entry, unit-norm text features O(1/sqrt(d)): scale the step alike
        groups.append({"params": [t], "lr": text_lr if text_lr is not None
                       else cfg.lr / math.sqrt(model.text_dim)})
    else:
        t = text.to(dev)
    opt = torch.optim.Adam(groups, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iterations, eta_min=0.0)
    info: dict = {}
    with frozen_eval(model), BNStatLoss(model, running_stats(model)) as bn:
        for it in range(cfg.iterations):
            xj = jitter_flip(x, cfg, generator)
            with autocast(cfg.bf16, dev.type):
                logits = model(xj.contiguous(memory_format=torch.channels_last), t)
            bn_loss = bn.total(cfg.first_bn_multiplier)
            loss, ce = inversion_loss(cfg, bn_loss, x, logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                if pixel_range is not None:
                    x.clamp_(*pixel_range)
                if free:
                    t.copy_(F.normalize(t, dim=1))
            if it == 0:
                info["bn_initial"] = float(bn_loss.detach())
        info["bn_final"] = float(bn_loss.detach())
        info["ce_final"] = float(ce.detach())
    return x.detach().cpu(), t.detach().cpu(), info


@torch.no_grad()
def pair_confidence(model: nn.Module, images, labels: torch.Tensor, bf16: bool = True) -> dict:
    """`model`'s CE and accuracy on pseudo-pairs against their labels: near-zero CE means the
    pairs hold nothing the model does not already classify with certainty."""
    was = model.training
    model.eval()
    dev = model_device(model)
    try:
        logits = []
        for i in range(0, len(labels), 512):
            with autocast(bf16, dev.type):
                logits.append(model(images[0][i:i + 512].to(dev),
                                    images[1][i:i + 512].to(dev)).float().cpu())
    finally:
        model.train(was)
    z = torch.cat(logits)
    return {"ce": float(F.cross_entropy(z, labels)),
            "accuracy": float((z.argmax(1) == labels).float().mean())}


def synthesize_pairs(merged: nn.Module, teachers: list[nn.Module] | None, cfg: InversionConfig,
                     *, num_classes: int, input_shape: tuple[int, int, int], seed: int = 0,
                     pixel_range: tuple[float, float] | None = None, label_counts=None,
                     progress: bool = False) -> PseudoData:
    """`cfg.n_images` pseudo-pairs ((images, text features), labels, source), the image + text
    form of `dmm.synth.synthesize` (same arguments and sources). `info["merged_pairs"]` is the
    merged model's CE and accuracy on the pairs before any refinement."""
    if not getattr(merged, "text_dim", None):
        raise DMMError("synthesize_pairs needs an image + text model (ImageTextNet)")
    jobs = plan(cfg, merged, teachers, label_counts)
    g = torch.Generator().manual_seed(seed)
    xs, ts, ys, srcs, infos = [], [], [], [], []
    compiled: dict[int, nn.Module] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=sum(math.ceil(n / cfg.batch_size) for _, _, n in jobs),
               desc="pair inversion", disable=not progress)
    for source, model, n in jobs:
        for start in range(0, n, cfg.batch_size):
            b = min(cfg.batch_size, n - start)
            y, use_ce = batch_targets(cfg, source, b, num_classes, label_counts, g)
            text = draw_text(model, b, g) if cfg.text == "drawn" else None
            x, t, info = call_compiled(invert_pairs, model, compiled, cfg.compile,
                                       y if use_ce else None, (b, *input_shape), cfg,
                                       what="pair inversion", generator=g,
                                       pixel_range=pixel_range, text=text)
            if not use_ce:
                y = argmax_labels(model, (x, t), cfg.bf16)
            xs.append(x)
            ts.append(t)
            ys.append(y)
            srcs.append(torch.full((b,), source, dtype=torch.long))
            infos.append({"source": source, **info})
            bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    labels = torch.cat(ys)
    out = PseudoData((torch.cat(xs), torch.cat(ts)), labels, torch.cat(srcs))
    out.info = {"seconds": seconds, "images_per_second": len(labels) / seconds,
                "image_iterations_per_second": len(labels) * cfg.iterations / seconds,
                "merged_pairs": pair_confidence(merged, out.images, labels, cfg.bf16),
                "batches": infos, "config": cfg.to_dict()}
    return out
