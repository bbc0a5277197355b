"""Client training: SGD with momentum on one client's data, for local iterations or epochs.

On the CPU, channels_last + bf16 autocast trains these ResNets about 2x faster than fp32
(shared/DATA.md, measured); `bf16=False` switches to fp32. BN statistics and weights stay fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dmm import inputs as I
from dmm.config import check_fields
from dmm.data.augment import random_crop_flip
from dmm.errors import DMMError
from dmm.evaluate import autocast, model_device
from dmm.statedict import StateDict


@dataclass
class TrainConfig:
    """Local training hyperparameters (one place, with units)."""

    lr: float = 0.05               # SGD step size
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128          # samples per step (a client with fewer uses all it has)
    local_iters: int | None = 10   # SGD steps per round; None -> use local_epochs
    local_epochs: int = 1          # passes over the client's data per round (if local_iters None)
    prox_mu: float = 0.0           # FedProx proximal coefficient (0 = FedAvg)
    augment: bool = True           # random crop (pad 4) + horizontal flip
    bf16: bool = True              # bf16 autocast + channels_last
    grad_clip: float | None = None  # max gradient norm, None = off

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        check_fields(self, "training")
        for name in ("momentum", "weight_decay"):
            if getattr(self, name) < 0:
                raise DMMError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise DMMError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.lr <= 0:
            raise DMMError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise DMMError(f"batch size must be >= 1, got {self.batch_size}")
        if self.local_iters is not None and self.local_iters < 1:
            raise DMMError(f"local iterations must be >= 1, got {self.local_iters}")
        if self.local_iters is None and self.local_epochs < 1:
            raise DMMError(f"local epochs must be >= 1, got {self.local_epochs}")
        if self.prox_mu < 0:
            raise DMMError(f"FedProx mu must be >= 0, got {self.prox_mu}")


def batch_schedule(n: int, cfg: TrainConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches for one round: shuffled passes over n samples, cut into batches.

    With local iterations, passes are concatenated until `local_iters` batches exist, so a
    client with 40 samples and batch 128 still takes `local_iters` steps of 40 samples.
    """
    if n < 1:
        raise DMMError("a client with no samples cannot train (use a minimum client size >= 1)")
    bs = min(cfg.batch_size, n)
    if cfg.local_iters is None:
        return [b for _ in range(cfg.local_epochs)
                for b in torch.randperm(n, generator=generator).split(bs)]
    batches: list[torch.Tensor] = []
    while len(batches) < cfg.local_iters:
        perm = torch.randperm(n, generator=generator)
        # drop a short tail so every step has the same batch size
        full = n // bs * bs
        batches.extend(perm[:full].split(bs))
    return batches[: cfg.local_iters]


def train_local(
    model: nn.Module,
    x: I.Inputs,
    y: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    cfg: TrainConfig,
    *,
    generator: torch.Generator,
    global_params: StateDict | None = None,
) -> dict:
    """Train `model` in place on (x uint8, y); returns {'loss': mean loss, 'steps': n}.

    `x` may be a tuple (images, side inputs...): only the images are augmented and normalized.

    `global_params` (name -> tensor) enables the FedProx term mu/2 ||w - w_global||^2.
    """
    model.train()
    if cfg.bf16:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    prox = []
    if cfg.prox_mu > 0 and global_params is not None:
        prox = [(p, global_params[name]) for name, p in model.named_parameters()]
    total, steps = 0.0, 0
    dev = model_device(model)
    for idx in batch_schedule(I.count(x), cfg, generator):
        xb = I.take(x, idx)
        if cfg.augment:
            xb = I.map_image(xb, lambda t: random_crop_flip(t, generator=generator))
        xb = I.to(I.map_image(xb, normalize), dev)
        if cfg.bf16:
            xb = I.channels_last(xb)
        with autocast(cfg.bf16, dev.type):
            loss = F.cross_entropy(model(*I.args(xb)), y[idx].to(dev))
        loss = loss.float()
        if prox:
            loss = loss + 0.5 * cfg.prox_mu * sum(((p - g) ** 2).sum() for p, g in prox)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        total += float(loss.detach())
        steps += 1
    return {"loss": total / max(steps, 1), "steps": steps}
