"""How each bench row turns trained models into a predictor, and the configuration it hashes.

Rows consume the models of one regime (spec.ROWS): FedAvg / FedProx / FedBN globals and FedAvg's
last client models; the one-shot clients (one shared seeded init, trained once for the same
budget) for the merging methods, the ensemble and DENSE; a centrally trained model (the oracle).
Choices, stated:
- Git Re-Basin resets BN statistics after merging, as its paper does, on pseudo-data from every
  client's own statistics (no data; `merge --bn-reset`).
- "+ DMM" is the default preset (buffer aggregation + inversion augmentation, head only, no KD);
  "+ full DMM (paper preset)" adds the paper's selective KD (docs/dmm-core.md says why they
  differ). "+ buffer aggregation" only pools the BN statistics.
- The ensemble averages the clients' softmax outputs (each client with its own BN).
- The oracle trains one model on the union of the client data for rounds x local iterations
  steps (1/K of FedAvg's compute).
"""

from __future__ import annotations

from dmm.bench.spec import BenchSpec
from dmm.dense import DenseConfig
from dmm.pipeline import DMMConfig, preset

DMM_ROWS = {"fedavg+buffer": ("fedavg", "buffer"), "fedavg+dmm": ("fedavg", "default"),
            "fedavg+dmm_paper": ("fedavg", "paper"), "cat+buffer": ("cat", "buffer"),
            "cat+dmm": ("cat", "default"), "cat+dmm_paper": ("cat", "paper")}
MERGE_ROWS = {"pleas": ("pleas", {}), "rebasin": ("rebasin", {"bn_reset": True}),
              "cat": ("cat", {"scale": 1.0})}


def dmm_config(variant: str, spec: BenchSpec, seed: int) -> DMMConfig:
    if variant == "buffer":
        cfg = preset("default", inversion_augmentation=False, distill=False)
    else:
        cfg = preset(variant)
    cfg.seed = seed
    cfg.inversion.n_images = spec.inversion_images
    cfg.inversion.iterations = spec.inversion_iters
    cfg.inversion.compile = spec.compile
    cfg.distillation.steps = spec.distill_steps
    return cfg


def dense_config(spec: BenchSpec) -> DenseConfig:
    return DenseConfig(budget_images=spec.inversion_images * spec.inversion_iters,
                       budget_scale=spec.dense_budget_scale)


def row_config(row: str, spec: BenchSpec, seed: int) -> dict:
    """The row's own settings, as they enter the cell's cache key."""
    if row in DMM_ROWS:
        student, variant = DMM_ROWS[row]
        d = {"dmm": dmm_config(variant, spec, seed).to_dict()}
        if student == "cat":
            d["merge"] = row_config("cat", spec, seed)
        return d
    if row in MERGE_ROWS:
        method, params = MERGE_ROWS[row]
        return {"method": method, "params": params, "seed": seed}
    if row == "dense":
        return {"dense": dense_config(spec).to_dict(), "seed": seed}
    return {}

