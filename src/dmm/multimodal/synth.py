"""Pseudo image + text pairs from BatchNorm statistics (DMM's inversion for ImageTextNet).

The variables are an image batch x and a text-feature batch t. The loss is the paper's Eq. 5 over
every BN layer: the image encoder's BatchNorm2d layers see f(x) only, and the fusion
BatchNorm1d sees concat(f_img(x), t), so its running mean and variance (pooled over the
clients by buffer aggregation) are the target for the *text features* too; plus CE of the
model's logits on the pair against a target class (which ties x and t to that class), total
variation on x, and jitter and flip on x. After each step x is clamped to the pixel range and
t is projected back onto the unit sphere (the encoder's sentence features are L2-normalized).

What it can recover: per-dimension first and second moments of the text features (exactly
what the fusion BN stores) and, through the linear head, the directions that separate the
classes. What it cannot: sentences or tokens, and any correlation between text dimensions
beyond what the head encodes (BN stores no covariance).
"""

from __future__ import annotations

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
    balanced_labels,
    frozen_eval,
    jitter_flip,
    total_variation,
)


def invert_pairs(model: nn.Module, labels: torch.Tensor, shape: tuple[int, ...],
                 cfg: InversionConfig, *, generator: torch.Generator,
                 pixel_range: tuple[float, float] | None = None, text_lr: float | None = None,
                 unit_text: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    dev = model_device(model)
    b = len(labels)
    labels = labels.to(dev)
    x = torch.randn((b, *shape), generator=generator).to(dev).requires_grad_(True)
    t0 = torch.randn((b, model.text_dim), generator=generator)
    t = F.normalize(t0, dim=1).to(dev).requires_grad_(True)
    # pixels are O(1) per entry, unit-norm text features O(1/sqrt(d)): scale the step alike
    lr_t = text_lr if text_lr is not None else cfg.lr / math.sqrt(model.text_dim)
    opt = torch.optim.Adam([{"params": [x], "lr": cfg.lr}, {"params": [t], "lr": lr_t}],
                           betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iterations, eta_min=0.0)
    info: dict = {}
    with frozen_eval(model), BNStatLoss(model, running_stats(model)) as bn:
        for it in range(cfg.iterations):
            xj = jitter_flip(x, cfg, generator)
            with autocast(cfg.bf16, dev.type):
                logits = model(xj, t)
            bn_loss = bn.total(cfg.first_bn_multiplier)
            ce = F.cross_entropy(logits.float(), labels)
            loss = (cfg.bn_weight * bn_loss + cfg.tv_weight * total_variation(x)
                    + cfg.ce_weight * ce)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                if pixel_range is not None:
                    x.clamp_(*pixel_range)
                if unit_text:
                    t.copy_(F.normalize(t, dim=1))
            if it == 0:
                info["bn_initial"] = float(bn_loss.detach())
        info["bn_final"] = float(bn_loss.detach())
        info["ce_final"] = float(ce.detach())
    return x.detach().cpu(), t.detach().cpu(), info


def synthesize_pairs(merged: nn.Module, teachers: list[nn.Module] | None, cfg: InversionConfig,
                     *, num_classes: int, input_shape: tuple[int, int, int], seed: int = 0,
                     pixel_range: tuple[float, float] | None = None,
                     progress: bool = False) -> PseudoData:
    """`cfg.n_images` pseudo-pairs ((images, text features), labels) against `merged`'s BN
    statistics. Same signature as `dmm.synth.synthesize`; only the `merged` mode exists."""
    cfg.validate()
    if cfg.mode != "merged":
        raise DMMError("image + text inversion supports mode='merged' only")
    if not getattr(merged, "text_dim", None):
        raise DMMError("synthesize_pairs needs an image + text model (ImageTextNet)")
    g = torch.Generator().manual_seed(seed)
    xs, ts, ys, infos = [], [], [], []
    t0 = time.perf_counter()
    starts = list(range(0, cfg.n_images, cfg.batch_size))
    for start in tqdm(starts, desc="pair inversion", disable=not progress):
        b = min(cfg.batch_size, cfg.n_images - start)
        y = balanced_labels(b, num_classes, g)
        x, t, info = invert_pairs(merged, y, input_shape, cfg, generator=g,
                                  pixel_range=pixel_range)
        xs.append(x)
        ts.append(t)
        ys.append(y)
        infos.append({"source": -1, **info})
    seconds = time.perf_counter() - t0
    labels = torch.cat(ys)
    out = PseudoData((torch.cat(xs), torch.cat(ts)), labels,
                     torch.full((len(labels),), -1, dtype=torch.long))
    out.info = {"seconds": seconds, "images_per_second": len(labels) / seconds,
                "image_iterations_per_second": len(labels) * cfg.iterations / seconds,
                "batches": infos, "config": cfg.to_dict()}
    return out
