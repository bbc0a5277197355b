"""Model inputs: one image batch, or a tuple (image batch, side inputs...) indexed together.

Image classifiers take one tensor. An image + text model takes (images, text features): the
first element is the image batch, which alone is augmented, normalized and laid out
channels-last; the others (e.g. cached text features) are indexed and moved alongside it, and the
model is called as `model(*inputs)`. Training, evaluation and distillation accept both forms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def take(x: Inputs, idx) -> Inputs:
    return tuple(t[idx] for t in x) if isinstance(x, tuple) else x[idx]


def count(x: Inputs) -> int:
    return len(x[0]) if isinstance(x, tuple) else len(x)


def map_image(x: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    return (fn(x[0]), *x[1:]) if isinstance(x, tuple) else fn(x)


def to(x: Inputs, device: torch.device | str) -> Inputs:
    return tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)


def channels_last(x: Inputs) -> Inputs:
    return map_image(x, lambda t: t.contiguous(memory_format=torch.channels_last)
                     if t.dim() == 4 else t)


def args(x: Inputs) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def cat(parts: list[Inputs]) -> Inputs:
    if parts and isinstance(parts[0], tuple):
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
    return torch.cat(parts)
