"""Evaluation: top-1, per-class accuracy, loss, and rare-class accuracy."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmm import inputs as I


@dataclass
class EvalResult:
    accuracy: float            # fraction in [0, 1]
    loss: float                # mean cross-entropy
    per_class: list[float]     # accuracy of each class (nan where the class has no samples)
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def class_mean(self, classes: list[int]) -> float:
        """Mean accuracy over `classes` (e.g. the rare ones)."""
        vals = [self.per_class[c] for c in classes if not np.isnan(self.per_class[c])]
        return float(np.mean(vals)) if vals else float("nan")


def autocast(enabled: bool, device_type: str = "cpu"):
    """bf16 autocast (on the CPU about 2x for these nets, measured) or nothing."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if enabled else nullcontext()


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live. Data stays on the CPU; every forward pass moves its
    batch there (so `--device cuda` only has to move the models)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    x: I.Inputs,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    batch_size: int = 1000,
    bf16: bool = True,
) -> torch.Tensor:
    """Logits (float32) of `model` in eval mode on `x` (uint8 with `normalize`, or float)."""
    was_training = model.training
    model.eval()
    dev = model_device(model)
    out = []
    try:
        for i in range(0, I.count(x), batch_size):
            xb = I.take(x, slice(i, i + batch_size))
            xb = I.to(I.map_image(xb, normalize) if normalize is not None else xb, dev)
            with autocast(bf16, dev.type):
                out.append(model(*I.args(I.channels_last(xb))).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(
    model: nn.Module,
    x: I.Inputs,
    y: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    num_classes: int | None = None,
    batch_size: int = 1000,
    bf16: bool = True,
) -> EvalResult:
    logits = predict_logits(model, x, normalize, batch_size=batch_size, bf16=bf16)
    return eval_from_logits(logits, y, num_classes)


def eval_from_logits(logits: torch.Tensor, y: torch.Tensor, num_classes: int | None = None
                     ) -> EvalResult:
    num_classes = logits.shape[1] if num_classes is None else num_classes
    pred = logits.argmax(1)
    correct = (pred == y).double()
    per_class = []
    for c in range(num_classes):
        m = y == c
        per_class.append(float(correct[m].mean()) if m.any() else float("nan"))
    return EvalResult(
        accuracy=float(correct.mean()),
        loss=float(F.cross_entropy(logits, y)),
        per_class=per_class,
        n=len(y),
    )


def rare_classes(label_counts: np.ndarray, *, share: float = 0.9) -> list[int]:
    """Classes whose training samples sit (>= `share`) with a single client.

    `label_counts` is the (K, C) table of a partition. These are the classes whose knowledge
    plain averaging loses first: only one model ever saw them.
    """
    counts = np.asarray(label_counts, dtype=np.float64)
    totals = counts.sum(0)
    top = counts.max(0)
    return [int(c) for c in range(counts.shape[1]) if totals[c] > 0 and top[c] / totals[c] >= share]
