"""DENSE: one-shot federated learning by data-free distillation of the client ensemble.

Zhang et al., "DENSE: Data-Free One-Shot Federated Learning", NeurIPS 2022
(https://arxiv.org/abs/2112.12371). The server holds the K client models. It alternates

1. *data generation*: a generator G maps noise z and a class y to an image. G is trained so that
   the ensemble (mean of the client logits) classifies G(z, y) as y (CE), every client's
   BatchNorm statistics match on G's batch (the DeepInversion term, summed over clients), and the
   student disagrees with the ensemble on it (the adversarial term, -KL(ensemble || student));
2. *model distillation*: the global student learns the ensemble's softened outputs (KL at
   temperature T) on all images generated so far.

Deviations from the paper and its reference code (zj-jayzhang/DENSE, read, not copied), stated:
- **Budget.** The bench gives DENSE the same synthesis compute as DMM's inversion: DMM runs
  `n_images x iterations` image passes through one network; a DENSE generator step on a batch of B
  images runs K + 1 networks (K clients and the student), so DENSE gets
  `n_images x iterations / (B x (K + 1))` generator steps. `budget_scale` multiplies it. The
  reference runs 10-200 epochs of 20-30 generator steps on batches of 256.
- **One persistent, class-conditional generator** (z times a class embedding) trained
  throughout, instead of the reference's generator re-initialized every round with unconditional
  z and random target labels; its DCGAN-like body is the reference's (Linear, BN, 2x (upsample,
  conv 3x3, BN, LeakyReLU 0.2), conv 3x3, sigmoid) with nz 100, ngf 64, and the sigmoid output
  is mapped onto the data set's normalized pixel range.
- **Adversarial term** -KL(ensemble || student) on every generated image at the distillation
  temperature; the reference masks it to the images where the student's argmax differs from the
  ensemble's and uses T = 1.
- **BN term** averaged over the clients' BatchNorm layers (DeepInversion hooks on every client).
  In the reference the hooks do not reach the teachers (kept in a plain list) and its CIFAR CNN
  has no BN, so the term is effectively off there; the DENSE paper describes it.
- **Student steps**: one SGD step (lr 0.01, momentum 0.9; the reference's default lr) per
  generator step, on twice the generator batch drawn from a bank of the last `bank_size`
  generated images with their ensemble logits stored; the reference runs one pass over its whole
  growing image pool per round, with crop and flip. KD at T = 4 (reference default 1, its README
  example 20). The ensemble is the mean of the client logits, as in the reference.
- The student is trained from scratch, as in the reference.
- Loss weights CE 1, BN 1, adversarial 1 (the reference README's example; its defaults are 0).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dmm.errors import DMMError
from dmm.evaluate import autocast, model_device
from dmm.synth.hooks import BNStatLoss


@dataclass
class DenseConfig:
    steps: int | None = None      # generator steps; None: from `budget_images` (see module doc)
    budget_images: int = 384 * 150  # DMM's image passes (n_images x iterations)
    budget_scale: float = 1.0
    batch_size: int = 64
    z_dim: int = 100
    lr_generator: float = 1e-3
    lr_student: float = 1e-2      # SGD with momentum 0.9
    temperature: float = 4.0
    bn_weight: float = 1.0
    adv_weight: float = 1.0
    bank_size: int = 4096         # generated images kept for the student
    bf16: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def n_steps(self, k: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, int(self.budget_scale * self.budget_images
                          / (self.batch_size * (k + 1))))


class Generator(nn.Module):
    """z (and a class embedding) -> image in [lo, hi] (the normalized pixel range)."""

    def __init__(self, z_dim: int, num_classes: int, shape: tuple[int, int, int],
                 pixel_range: tuple[float, float], ngf: int = 64) -> None:
        super().__init__()
        c, h, w = shape
        if h % 4 or w % 4:
            raise DMMError(f"DENSE generator needs an input size divisible by 4, got {h}x{w}")
        self.h0, self.w0 = h // 4, w // 4
        self.embed = nn.Embedding(num_classes, z_dim)
        self.fc = nn.Linear(z_dim, 2 * ngf * self.h0 * self.w0)
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * ngf), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1, bias=False), nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, padding=1, bias=False), nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2), nn.Conv2d(ngf, c, 3, padding=1))
        self.ngf = ngf
        self.lo, self.hi = pixel_range

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(z * self.embed(y)).view(len(z), 2 * self.ngf, self.h0, self.w0)
        x = torch.sigmoid(self.net(h))
        return self.lo + (self.hi - self.lo) * x


def dense_distill(
    student: nn.Module,
    teachers: Sequence[nn.Module],
    cfg: DenseConfig,
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    pixel_range: tuple[float, float],
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, dict]:
    """Train `student` (a fresh model; copied, not changed) from the ensemble of `teachers`."""
    if not teachers:
        raise DMMError("DENSE needs at least one client model")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    student = copy.deepcopy(student).train()
    teachers = [t.eval() for t in teachers]
    for t in teachers:
        t.requires_grad_(False)
    dev = model_device(student)
    gen = Generator(cfg.z_dim, num_classes, input_shape, pixel_range).to(dev)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_generator, betas=(0.5, 0.999))
    opt_s = torch.optim.SGD(student.parameters(), lr=cfg.lr_student, momentum=0.9)
    steps = cfg.n_steps(len(teachers))
    bank_x: list[torch.Tensor] = []
    bank_t: list[torch.Tensor] = []
    T = cfg.temperature
    history = []
    for step in tqdm(range(steps), desc="DENSE", disable=not progress):
        z = torch.randn(cfg.batch_size, cfg.z_dim, generator=g).to(dev)
        y = torch.randint(num_classes, (cfg.batch_size,), generator=g).to(dev)
        # 1. generator: ensemble CE + every client's BN statistics + disagreement with student
        x = gen(z, y)
        bn_total = x.new_zeros(())
        logits = []
        with autocast(cfg.bf16, dev.type):
            for t in teachers:
                with BNStatLoss(t) as bn:
                    logits.append(t(x).float())
                bn_total = bn_total + bn.total()
            ens = torch.stack(logits).mean(0)
            student.eval()
            s_out = student(x).float()
        adv = F.kl_div(F.log_softmax(s_out / T, 1), F.softmax(ens / T, 1), reduction="batchmean")
        loss_g = (F.cross_entropy(ens, y) + cfg.bn_weight * bn_total / len(teachers)
                  - cfg.adv_weight * adv)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        bank_x.append(x.detach())
        bank_t.append(ens.detach())
        if sum(len(b) for b in bank_x) > cfg.bank_size:
            bank_x.pop(0)
            bank_t.pop(0)
        # 2. student: KL to the ensemble on a batch from the bank
        all_x, all_t = torch.cat(bank_x), torch.cat(bank_t)
        idx = torch.randint(len(all_x), (min(len(all_x), 2 * cfg.batch_size),), generator=g)
        student.train()
        with autocast(cfg.bf16, dev.type):
            s = student(all_x[idx.to(dev)]).float()
        loss_s = F.kl_div(F.log_softmax(s / T, 1), F.softmax(all_t[idx] / T, 1),
                          reduction="batchmean") * T * T
        opt_s.zero_grad(set_to_none=True)
        loss_s.backward()
        opt_s.step()
        if step % 10 == 0 or step == steps - 1:
            history.append({"step": step, "generator_loss": float(loss_g.detach()),
                            "bn_loss": float(bn_total.detach()) / len(teachers),
                            "student_loss": float(loss_s.detach())})
    student.eval()
    return student, {"steps": steps, "seconds": time.perf_counter() - t0,
                     "history": history, "config": cfg.to_dict()}
