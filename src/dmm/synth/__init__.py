"""Pseudo-data from normalization statistics: BN hooks, DeepInversion, image grids."""

from dmm.synth.grid import save_grid
from dmm.synth.hooks import BNStatLoss, batch_stats, running_stats
from dmm.synth.inversion import (
    InversionConfig,
    PseudoData,
    bn_matching_loss,
    invert_batch,
    probe_classifier,
    synthesize,
)

__all__ = ["BNStatLoss", "InversionConfig", "PseudoData", "batch_stats", "bn_matching_loss",
           "invert_batch", "probe_classifier", "running_stats", "save_grid", "synthesize"]
