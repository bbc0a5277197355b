"""Layer inputs and outputs of conv / linear layers, recorded with forward hooks, and the
pseudo-data that makes feature-based merging (PLeaS, CAT) data-free."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dmm.errors import DMMError


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d and Linear layers by name, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@contextmanager
def record_io(model: nn.Module, names: list[str]):
    """Record (input, output) of the named layers during the forward passes in the block."""
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    mods = dict(model.named_modules())
    handles = []
    for n in names:
        def hook(mod, inp, out, n=n):
            store[n] = (inp[0].detach(), out.detach())
        handles.append(mods[n].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def as_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as the rows of its linear map: im2col patches for a conv, rows for fc."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if layer.groups != 1:
        raise DMMError("grouped convolutions are not supported by feature-based merging")
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                    stride=layer.stride)  # (N, C_in*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def out_rows(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer's output as rows matching `as_rows` (bias removed: it is fitted separately)."""
    if isinstance(layer, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def pseudo_inputs(model: nn.Module, n: int, *, seed: int, input_shape: tuple[int, ...] | None,
                  iterations: int = 100) -> torch.Tensor:
    """DeepInversion pseudo-data from `model`'s own BN statistics (no data, no labels used)."""
    from dmm.synth import InversionConfig, probe_classifier, synthesize

    input_shape, num_classes = probe_classifier(model, input_shape)
    cfg = InversionConfig(n_images=n, batch_size=min(n, 128), iterations=iterations,
                          ce_weight=0.0, mode="merged")
    return synthesize(model, None, cfg, num_classes=num_classes, input_shape=input_shape,
                      seed=seed).images
