"""Forward hooks that measure the batch statistics entering every BatchNorm layer.

DeepInversion (Yin et al., CVPR 2020) matches, at each BN layer, the mean and variance of the
layer's *input* over the batch and spatial positions with stored statistics. The hook owns its
cleanup: use it as a context manager and the hooks are gone when the block ends, even on error.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from dmm.statedict import bn_layers

Stats = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, population variance) per channel over every dimension but 1, in float32.

    `torch.var_mean` over (0, 2, 3) is 1.5-2.5x faster than a permute/contiguous form here.
    """
    dims = (0,) + tuple(range(2, x.dim()))
    var, mean = torch.var_mean(x.float(), dim=dims, unbiased=False)
    return mean, var


def running_stats(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The stored (running_mean, running_var) of every BN layer of `model`, detached."""
    return {n: (m.running_mean.detach().clone(), m.running_var.detach().clone())
            for n, m in bn_layers(model).items()}


class BNStatLoss:
    """Attach to every BN layer of `model`; after a forward pass, `losses` holds per layer

        ||mean_l(x) - mu_l||_2 + ||var_l(x) - s2_l||_2        (paper Eq. 5, DeepInversion)

    against `targets` (name -> (mu, s2)); by default each layer's own running statistics.
    """

    def __init__(self, model: nn.Module, targets: Stats | None = None) -> None:
        self.layers = bn_layers(model)
        if not self.layers:
            from dmm.errors import DMMError
            raise DMMError("inversion needs BatchNorm layers with running statistics; "
                           "the model has none")
        self.targets = dict(targets) if targets is not None else running_stats(model)
        missing = set(self.layers) - set(self.targets)
        if missing:
            raise ValueError(f"no target statistics for BN layers {sorted(missing)[:3]}")
        self.losses: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        mu_t, var_t = self.targets[name]

        def fn(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            mean, var = batch_stats(inputs[0])
            self.losses[name] = torch.linalg.vector_norm(mean - mu_t) + \
                torch.linalg.vector_norm(var - var_t)

        return fn

    def __enter__(self) -> BNStatLoss:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def total(self, first_multiplier: float = 1.0) -> torch.Tensor:
        """Sum over layers, the first BN layer weighted by `first_multiplier`."""
        vals = [self.losses[n] for n in self.layers if n in self.losses]
        if not vals:
            raise RuntimeError("no BN statistics recorded: run a forward pass inside the block")
        return first_multiplier * vals[0] + sum(vals[1:], torch.zeros((), device=vals[0].device))
