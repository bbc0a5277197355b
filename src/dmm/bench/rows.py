"""The built-in bench rows: how each turns trained models into a predictor, and what it hashes.

Rows consume the models of one regime: FedAvg / FedProx / FedBN globals and FedAvg's last client
models; the one-shot clients (one shared seeded init, trained once for the same budget) for the
merging methods, the ensemble and DENSE; a centrally trained model (the oracle). Each row is one
`register_row` entry; its variants are arguments of a small builder (`global_row`, `merge_row`,
`dmm_row`). Choices, stated:
- Git Re-Basin resets BN statistics after merging, as its paper does, on pseudo-data from every
  client's own statistics (no data; `merge --bn-reset`).
- "+ DMM" is the default preset (each client inverted against its own statistics, the teacher
  check, then class-routed KD into the whole network or the head-only refinement); "head only"
  is preset `head` (buffer aggregation + inversion augmentation, classifier layer, no KD; the
  default before issue 13); "+ full DMM (paper preset)" is the paper's selective KD
  (docs/dmm-core.md says why they differ). "+ buffer aggregation" only pools the BN statistics.
- DMM rows get the clients' label histograms (the split's counts, as `dmm train` writes them)
  unless a row withholds them (`histograms=False`: ownership estimated).
- The ensemble averages the clients' softmax outputs (each client with its own BN).
- The oracle trains one model on the union of the client data to convergence (`oracle_epochs`
  passes, 5 by default; constant lr, the clients' optimizer); "central" is the same network at
  rounds x local iterations steps (1/K of FedAvg's compute), labelled so.
- From a pretrained start (rows `NAME@w0`, `from_w0`): W_0 is trained centrally on the public
  slice (`public_slice` training samples no client holds, `pretrain_epochs` passes); the
  clients fine-tune it (one-shot: the one-shot budget; federated: FedAvg started from it);
  task arithmetic, TIES and CAT take task vectors against W_0; every merge is followed by the
  data-free BN reset (pseudo-data from every client's own statistics), as PLeaS and ZipIt
  reset BN after merging (on data; ours has none). DENSE's student starts fresh, as in its
  paper. Task arithmetic's coefficient is lambda = 0.3 of Ilharco et al.'s unnormalized sum
  at K = 10 (`scale` 3.0; their recommended range, chosen without validation data); TIES
  keeps its paper's density 0.2 and lambda 1.
The group a builder receives is `dmm.bench.runner.Group` (trained regimes, shared merges and
pseudo-data of one (alpha, K, seed)).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dmm.bench.registry import ROWS, W0, Row, register_row
from dmm.dense import DenseConfig
from dmm.inloop import LoopConfig
from dmm.pipeline import DMMConfig, preset

if TYPE_CHECKING:
    from dmm.bench.spec import BenchSpec


# ---- configurations (what enters the cache key) -------------------------------------------

def dmm_config(variant: str, spec: BenchSpec, seed: int, overrides: dict | None = None
               ) -> DMMConfig:
    """The DMM preset of a row (`buffer` = head without inversion and distillation) with the
    row's `overrides`, at the bench's inversion and distillation budget where the spec sets
    one (a budget of None keeps the preset's own)."""
    base = "head" if variant == "buffer" else variant
    over: dict = {"seed": seed, "inversion": {"compile": spec.compile}, "distillation": {}}
    if spec.inversion_images is not None:
        over["inversion"].update(n_images=spec.inversion_images,
                                 iterations=spec.inversion_iters)
    if spec.distill_steps is not None:
        over["distillation"]["steps"] = spec.distill_steps
    if variant == "buffer":
        over.update(inversion_augmentation=False, distill=False)
    for k, v in (overrides or {}).items():
        over[k] = {**over[k], **v} if isinstance(v, dict) and k in over else v
    return preset(base, **over)


def dense_config(spec: BenchSpec) -> DenseConfig:
    """DENSE gets DMM's synthesis budget (images x iterations): the spec's, or the default
    preset's where the spec keeps each preset's own."""
    if spec.inversion_images is not None:
        budget = spec.inversion_images * spec.inversion_iters
    else:
        inv = preset("default").inversion
        budget = inv.n_images * inv.iterations
    return DenseConfig(budget_images=budget, budget_scale=spec.dense_budget_scale)


# ---- builders -----------------------------------------------------------------------------

def global_row(name: str, pretty_name: str, regime: str, **kw) -> Row:
    """The regime's global model as trained."""
    def build(group):
        t = group.trained(regime)
        t0 = time.perf_counter()
        return group.model(t.global_state), {"train_s": t.wall_time,
                                             "row_s": time.perf_counter() - t0}
    return Row(name, pretty_name, regime, build, **kw)


def _merge_config(method: str, params: dict, seed: int) -> dict:
    return {"method": method, "params": params, "seed": seed}


def merge_row(name: str, pretty_name: str, method: str, params: dict, **kw) -> Row:
    """The one-shot clients merged by a registered merging method (seeded by the cell)."""
    def config(spec, seed):
        return _merge_config(method, params, seed)

    def build(group):
        t = group.trained("oneshot")
        state, seconds = group.merged(method, params)
        return group.model(state), {"train_s": t.wall_time, "row_s": seconds}
    return Row(name, pretty_name, "oneshot", build, config, **kw)


def dmm_row(name: str, pretty_name: str, student: str, variant: str, *,
            overrides: dict | None = None, histograms: bool = True, **kw) -> Row:
    """DMM refinement (`variant`: a DMM preset name, or `buffer`) of a student: the FedAvg
    global model (`student="fedavg"`) or a merge row's result (`student=` that row's name),
    with the regime's client models as teachers. `overrides` change the preset (ablations);
    `histograms=False` withholds the clients' label histograms (ownership estimated)."""
    merge = ROW_MERGES.get(student)

    def config(spec, seed):
        d = {"dmm": dmm_config(variant, spec, seed, overrides).to_dict()}
        if merge is not None:
            d["merge"] = _merge_config(*merge, seed)
        if not histograms:  # only when withheld, so that the other rows' keys stay put
            d["label_counts"] = "estimated"
        return d

    def build(group):
        t = group.trained(regime)
        if merge is not None:
            state, merge_s = group.merged(*merge)
            info = {"merge_s": merge_s}
        else:
            state, merge_s, info = t.global_state, 0.0, {}
        cfg = dmm_config(variant, group.spec, group.seed, overrides)
        out, rep = group.refine(student, state, t, cfg, histograms=histograms)
        info.update(train_s=t.wall_time, refine_s=rep.timings["total_s"],
                    divergence=rep.divergence, teachers=rep.teachers, inversion=rep.inversion,
                    timings=rep.timings, notes=rep.notes,
                    distillation={k: v for k, v in rep.distillation.items()
                                  if k in ("teacher_check", "label_counts_estimated",
                                           "seconds", "steps")})
        # as if the row ran alone: its merge, plus the refinement with its synthesis even
        # when the pseudo-data were shared (refine's total_s counts reused synthesis)
        info["row_s"] = merge_s + info["refine_s"]
        return out, info

    regime = "oneshot" if merge is not None else student
    return Row(name, pretty_name, regime, build, config, **kw)


def loop_row(name: str, pretty_name: str, every: int, *, variant: str = "default",
             loop: dict | None = None, **kw) -> Row:
    """FedAvg trained with DMM on the server after every `every`-th round and the last
    (`dmm.inloop.LoopRefiner`: the DMM preset `variant` at the bench's budget for the first
    refinement, then the pool; `loop` sets the other `LoopConfig` fields). It trains its own
    models (the refinements change every later round), so its `train_s` is its FedAvg share
    and `refine_s` the sum of its refinements: its whole wall time is their sum."""
    def settings(spec, seed):
        return dmm_config(variant, spec, seed), LoopConfig(every=every, **(loop or {}))

    def config(spec, seed):
        cfg, lc = settings(spec, seed)
        return {"dmm": cfg.to_dict(), "loop": lc.to_dict()}

    def build(group):
        cfg, lc = settings(group.spec, group.seed)
        state, wall, reports = group.train_in_loop("fedavg", cfg, lc)
        dmm_s = sum(r["seconds"] for r in reports)
        return group.model(state), {
            "train_s": wall - dmm_s, "refine_s": dmm_s, "row_s": dmm_s,
            "loop": {**lc.to_dict(), "refinements": len(reports),
                     "guard_fired": sum(not r["kept"] for r in reports), "reports": reports}}
    return Row(name, pretty_name, "fedavg", build, config, **kw)


def from_w0(row: Row, pretty_name: str, **kw) -> Row:
    """`row` on the models trained from the pretrained start W_0 (`NAME@w0`): the same build
    on the group as that start sees it (`Group.from_start`); a row that merges says in its
    settings that the merge is followed by the data-free BN reset."""
    def build(group):
        return row.build(group.from_start(W0))

    def config(spec, seed):
        d = dict(row.config(spec, seed))
        if "method" in d or "merge" in d:
            d["bn_reset_after_merge"] = True
        return d
    ablation = kw.pop("ablation", (f"{row.ablation[0]}@w0", row.ablation[1])
                      if row.ablation else None)
    return Row(f"{row.name}@w0", pretty_name, row.regime + W0, build, config,
               section=kw.pop("section", "w0"), ablation=ablation, **kw)


def _ensemble(group):
    from dmm.evaluate import predict_logits

    t = group.trained("oneshot")
    t0 = time.perf_counter()
    logits = [predict_logits(group.model(s), group.data.x_test, group.data.normalize)
              for s in t.clients]
    out = torch.stack([F.softmax(x.float(), 1) for x in logits]).mean(0).log()
    return out, {"train_s": t.wall_time, "row_s": time.perf_counter() - t0}


def _ensemble_routed(group):
    """The label-count routed ensemble (FedFTG's class-level ensemble): class c's probability
    is sum_k w_k^c p_k(c | x), w_k^c = n_k^c / sum_j n_j^c, each client's share of class c."""
    from dmm.evaluate import predict_logits

    t = group.trained("oneshot")
    t0 = time.perf_counter()
    p = torch.stack([F.softmax(predict_logits(group.model(s), group.data.x_test,
                                              group.data.normalize).float(), 1)
                     for s in t.clients])                                    # (K, N, C)
    w = torch.as_tensor(t.label_counts, dtype=torch.float)                  # (K, C)
    routed = (p * (w / w.sum(0).clamp_min(1)).unsqueeze(1)).sum(0)
    return routed.clamp_min(1e-12).log(), {"train_s": t.wall_time,
                                           "row_s": time.perf_counter() - t0}


def _dense(group):
    from dmm.dense import dense_distill

    t = group.trained("oneshot")
    t0 = time.perf_counter()
    torch.manual_seed(group.seed)
    out, rep = dense_distill(group.new_model(), [group.model(s) for s in t.clients],
                             dense_config(group.spec), num_classes=group.data.num_classes,
                             input_shape=group.input_shape, pixel_range=group.data.pixel_range,
                             seed=group.seed)
    return out, {"train_s": t.wall_time, "row_s": time.perf_counter() - t0,
                 "dense": {k: rep[k] for k in ("steps", "seconds")}}


# ---- the rows, in table order -------------------------------------------------------------
# merge rows whose result a DMM row can refine: row name -> (method, params)
ROW_MERGES = {"pleas": ("pleas", {}), "rebasin": ("rebasin", {"bn_reset": True}),
              "cat": ("cat", {"scale": 1.0}), "average": ("average", {})}

register_row(global_row("fedavg", "FedAvg", "fedavg", image_text=True, ablation=("fedavg", 0)))
register_row(global_row("fedprox", "FedProx", "fedprox", image_text=True))
register_row(global_row("fedbn", "FedBN", "fedbn", image_text=True))
register_row(dmm_row("fedavg+dmm", "FedAvg + DMM", "fedavg", "default", image_text=True,
                     ablation=("fedavg", 2)))
register_row(merge_row("pleas", "PLeaS", *ROW_MERGES["pleas"]))
register_row(merge_row("rebasin", "Git Re-Basin", *ROW_MERGES["rebasin"]))
register_row(merge_row("cat", "Cat-Merge", *ROW_MERGES["cat"], ablation=("cat", 0)))
register_row(dmm_row("cat+dmm", "Cat-Merge + DMM", "cat", "default", ablation=("cat", 2)))
register_row(Row("ensemble", "Ensemble of client models (reference)", "oneshot", _ensemble,
                 section="reference", image_text=True))
register_row(global_row("oracle", "Centralized, all data, converged (oracle)", "oracle",
                        section="reference", image_text=True))
register_row(global_row("central", "Centralized at 1/K of FedAvg's compute (rounds x local "
                        "iterations steps)", "central", section="reference", image_text=True))
register_row(Row("dense", "DENSE (one-shot distillation)", "oneshot", _dense,
                 lambda spec, seed: {"dense": dense_config(spec).to_dict(), "seed": seed},
                 section="reference"))
register_row(dmm_row("fedavg+buffer", "FedAvg + buffer aggregation", "fedavg", "buffer",
                     section="ablation", image_text=True, ablation=("fedavg", 1)))
register_row(dmm_row("fedavg+dmm_paper", "FedAvg + full DMM (paper preset, with KD)", "fedavg",
                     "paper", section="ablation", image_text=True, ablation=("fedavg", 3)))
register_row(dmm_row("cat+buffer", "Cat-Merge + buffer aggregation", "cat", "buffer",
                     section="ablation", ablation=("cat", 1)))
register_row(dmm_row("cat+dmm_paper", "Cat-Merge + full DMM (paper preset, with KD)", "cat",
                     "paper", section="ablation", ablation=("cat", 3)))
register_row(dmm_row("fedavg+dmm_head", "FedAvg + DMM, head only (preset head)", "fedavg",
                     "head", section="ablation", image_text=True, ablation=("fedavg", 4)))
register_row(dmm_row("cat+dmm_head", "Cat-Merge + DMM, head only (preset head)", "cat", "head",
                     section="ablation", ablation=("cat", 4)))
# the transfer grid (issue 13): the plain average of the one-shot clients, refined
register_row(Row("ensemble_routed", "Ensemble, label-count routed (reference)", "oneshot",
                 _ensemble_routed, section="reference", image_text=True))
register_row(merge_row("average", "Average (weights by samples)", *ROW_MERGES["average"],
                       section="reference", image_text=True, ablation=("average", 0)))
register_row(dmm_row("average+dmm", "Average + DMM", "average", "default", section="reference",
                     image_text=True, ablation=("average", 1)))
register_row(dmm_row("average+dmm_merged", "Average + DMM, merged-only inversion", "average",
                     "default", overrides={"inversion": {"mode": "merged"}},
                     section="ablation", image_text=True, ablation=("average", 2)))
register_row(dmm_row("average+dmm_plain", "Average + DMM, plain softmax teachers", "average",
                     "default", overrides={"distillation": {"teacher_signal": "softmax"}},
                     section="ablation", image_text=True, ablation=("average", 3)))
register_row(dmm_row("average+dmm_estimated", "Average + DMM, ownership estimated", "average",
                     "default", histograms=False, section="ablation", image_text=True,
                     ablation=("average", 4)))
register_row(dmm_row("fedavg+dmm_transfer", "FedAvg + DMM without the teacher check "
                     "(preset transfer)", "fedavg", "transfer", section="ablation",
                     image_text=True, ablation=("fedavg", 5)))
# image + text only (issue 16): the text features of the pseudo-pairs optimized freely on the
# unit sphere (the first pair inversion) instead of drawn from the fused statistics
register_row(dmm_row("fedavg+dmm_free", "FedAvg + DMM, free text features", "fedavg", "default",
                     overrides={"inversion": {"text": "free"}}, section="ablation",
                     image_text=True, ablation=("fedavg", 8)))
register_row(dmm_row("fedavg+dmm_head_free", "FedAvg + DMM, head only, free text features (the "
                     "first pair inversion)", "fedavg", "head",
                     overrides={"inversion": {"text": "free"}}, section="ablation",
                     image_text=True, ablation=("fedavg", 9)))
register_row(dmm_row("fedavg+dmm_checked", "FedAvg + DMM with the teacher check on pairs "
                     "(check_pairs)", "fedavg", "default", overrides={"check_pairs": True},
                     section="ablation", image_text=True, ablation=("fedavg", 10)))
# DMM inside the loop (issue 14): N = 20 of 60 rounds, sized by the cost cap (docs/dmm-core.md,
# "DMM between rounds")
register_row(loop_row("fedavg+dmm_round", "FedAvg + DMM every 20 rounds (in the loop)", 20,
                      section="ablation", ablation=("fedavg", 6)))
register_row(loop_row("fedavg+dmm_round_head", "FedAvg + DMM every 20 rounds, head only "
                      "(preset head)", 20, variant="head", section="ablation",
                      ablation=("fedavg", 7)))

# From a pretrained start W_0 (issue "benchmark protocol"): Table 1, the references and the
# ablations again, on clients fine-tuned from one W_0 trained on the public slice
register_row(global_row("pretrain", "Pretrained start W_0 (public slice only)", "pretrain",
                        section="w0"))
for _name, _pretty in (("fedavg", "FedAvg"), ("fedavg+dmm", "FedAvg + DMM"), ("pleas", "PLeaS"),
                       ("rebasin", "Git Re-Basin"), ("cat", "Cat-Merge"),
                       ("cat+dmm", "Cat-Merge + DMM"), ("average", "Average"),
                       ("average+dmm", "Average + DMM"),
                       ("ensemble", "Ensemble of client models (reference)"),
                       ("ensemble_routed", "Ensemble, label-count routed (reference)"),
                       ("dense", "DENSE (one-shot distillation)")):
    register_row(from_w0(ROWS[_name], f"{_pretty}, from W_0"))
register_row(from_w0(merge_row("task_arithmetic", "Task arithmetic", "task_arithmetic",
                               {"scale": 3.0}), "Task arithmetic (lambda 0.3), from W_0"))
register_row(from_w0(merge_row("ties", "TIES-Merging", "ties", {"density": 0.2, "scale": 1.0}),
                     "TIES-Merging (density 0.2), from W_0"))
for _name in ("fedavg+buffer", "fedavg+dmm_paper", "fedavg+dmm_head", "cat+buffer",
              "cat+dmm_paper", "cat+dmm_head"):
    register_row(from_w0(ROWS[_name], f"{ROWS[_name].pretty_name}, from W_0",
                         section="ablation"))
