"""Federated rounds (FedAvg, FedProx, FedBN) and the one-shot regime, in one process.

Each round, a seeded sample of clients starts from the global model, trains `local_iters` SGD
steps (or `local_epochs` passes) on its own partition, and the server aggregates. The DMM
authors' harness counts local *iterations*; local epochs collapse FedAvg when clients hold one
class (shared/DESIGN.md, measured pitfalls), so iterations are the default.

One-shot: every client trains once from the same seeded initialization for the same total
budget (rounds x local steps); a merging method combines them afterwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dmm import inputs as I
from dmm.config import check_fields
from dmm.data.base import ImageDataset
from dmm.data.partition import Partition
from dmm.errors import DMMError
from dmm.federated import aggregate
from dmm.federated.client import TrainConfig, train_local
from dmm.statedict import StateDict, state_of

log = logging.getLogger(__name__)
REGIMES = ("fedavg", "fedprox", "fedbn", "oneshot")


@dataclass
class FederatedConfig:
    regime: str = "fedavg"
    rounds: int = 60
    participation: float = 1.0     # fraction of clients sampled per round
    seed: int = 0
    oneshot_init: str = "shared"   # one-shot: shared seeded init | independent init per client
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FederatedConfig:
        try:
            return cls(**{**d, "train": TrainConfig(**d["train"])})
        except TypeError as e:  # an unknown or missing field
            raise DMMError(f"federated config: {e}") from e

    def validate(self) -> None:
        check_fields(self, "federated")
        if not isinstance(self.train, TrainConfig):
            raise DMMError("federated train must be a TrainConfig")
        if self.regime not in REGIMES:
            raise DMMError(f"unknown regime {self.regime!r}; choose one of {', '.join(REGIMES)}")
        if self.oneshot_init not in ("shared", "independent"):
            raise DMMError(f"oneshot_init must be shared or independent, got {self.oneshot_init!r}")
        if self.rounds < 1:
            raise DMMError(f"rounds must be >= 1, got {self.rounds}")
        if not 0 < self.participation <= 1:
            raise DMMError(f"participation must be in (0, 1], got {self.participation}")
        if self.regime == "fedprox" and self.train.prox_mu <= 0:
            raise DMMError("fedprox needs a proximal coefficient mu > 0 (--mu)")
        self.train.validate()


@dataclass
class FederatedResult:
    init_state: StateDict
    global_state: StateDict | None       # None for the one-shot regime
    client_states: list[StateDict]       # each client's last local model
    n_samples: list[int]
    history: list[dict]
    wall_time: float


def _generator(seed: int, *parts: int) -> torch.Generator:
    # One independent, reproducible stream per (seed, round, client).
    state = np.random.SeedSequence([seed, *parts]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


# The steps of one round, shared by this in-process engine and the Flower engine (dmm.flower),
# so that both make the same choices from the same seed.

def round_sampler(seed: int) -> np.random.Generator:
    """The stream that picks each round's clients."""
    return np.random.default_rng([seed, 7])


def sample_clients(rng: np.random.Generator, k_clients: int, participation: float) -> list[int]:
    """max(1, round(participation * K)) distinct clients, sorted."""
    m = max(1, int(round(participation * k_clients)))
    return sorted(rng.choice(k_clients, size=m, replace=False).tolist())


def client_start(global_state: StateDict, own: StateDict | None, fedbn_local: set[str]
                 ) -> StateDict:
    """The model a client starts a round from: the global one, with its own BN under FedBN."""
    start = dict(global_state)
    if fedbn_local and own is not None:
        start.update({key: own[key] for key in fedbn_local})
    return start


def local_train_config(cfg: FederatedConfig) -> TrainConfig:
    """One-shot clients train once for the whole budget (rounds x local steps)."""
    tc = cfg.train
    if cfg.regime != "oneshot":
        return tc
    if tc.local_iters is not None:
        return TrainConfig(**{**tc.to_dict(), "local_iters": tc.local_iters * cfg.rounds})
    return TrainConfig(**{**tc.to_dict(), "local_epochs": tc.local_epochs * cfg.rounds})


def local_update(model: nn.Module, start: StateDict, x: I.Inputs, y: torch.Tensor,
                 normalize: Callable[[torch.Tensor], torch.Tensor], cfg: FederatedConfig,
                 round_: int, k: int) -> tuple[StateDict, dict]:
    """Client k's training in round `round_` (0 for one-shot) from `start`, in `model`."""
    model.load_state_dict(start)
    tc = local_train_config(cfg)
    gp = ({n: p.detach().clone() for n, p in model.named_parameters()}
          if tc.prox_mu > 0 else None)
    stats = train_local(model, x, y, normalize, tc, generator=_generator(cfg.seed, round_, k),
                        global_params=gp)
    return state_of(model), stats


def aggregate_round(regime: str, global_state: StateDict, states: list[StateDict],
                    n_samples: list[int], model: nn.Module) -> StateDict:
    """The server's step: FedAvg (also FedProx), or FedBN's shared keys."""
    if regime == "fedbn":
        return {**global_state, **aggregate.fedbn_shared(states, n_samples, model)}
    return aggregate.fedavg(states, n_samples)


def run_federated(
    model_fn: Callable[[], nn.Module],
    data: ImageDataset,
    partition: Partition,
    cfg: FederatedConfig,
    *,
    progress: bool = True,
    on_round: Callable[[int, StateDict], dict | None] | None = None,
    server_step=None,
    init_state: StateDict | None = None,
) -> FederatedResult:
    """Train K clients on `partition` of `data.x_train` under `cfg.regime`.

    `model_fn()` builds a fresh model; it is called after seeding, so the initialization is a
    function of `cfg.seed`. `on_round(r, global_state)` may return metrics for the history.
    `server_step` (FedAvg and FedProx; e.g. `dmm.inloop.LoopRefiner`): after the aggregation
    of every round r where `server_step.due(r)`, the global model becomes
    `server_step(r, global_state, clients, n_samples)` (the latest state and sample count of
    every client that has trained so far, by client id); its `reports[-1]` joins the history.
    `init_state` starts every client (one-shot) and the first global model (federated) from
    given weights, e.g. a pretrained W_0, instead of the seeded initialization.
    """
    cfg.validate()
    if init_state is not None and cfg.regime == "oneshot" and cfg.oneshot_init == "independent":
        raise DMMError("a given start (init_state) is one shared start: one-shot clients with "
                       "independent initializations cannot have it")
    if server_step is not None and cfg.regime not in ("fedavg", "fedprox"):
        raise DMMError(f"a server step between rounds needs a global model: regime fedavg or "
                       f"fedprox, not {cfg.regime}")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = model_fn()
    if init_state is not None:
        model.load_state_dict(init_state)
    init = state_of(model)
    k_clients = len(partition.indices)
    n_samples = partition.sizes
    client_x = [I.take(data.x_train, torch.as_tensor(i)) for i in partition.indices]
    client_y = [data.y_train[torch.as_tensor(i)] for i in partition.indices]
    history: list[dict] = []

    if cfg.regime == "oneshot":
        clients = []
        for k in tqdm(range(k_clients), desc="one-shot clients", disable=not progress):
            if cfg.oneshot_init == "independent":  # different modes: what Git Re-Basin aligns
                torch.manual_seed(cfg.seed * 1_000 + k + 1)
                model.load_state_dict(model_fn().state_dict())
            else:
                model.load_state_dict(init)
            state, stats = local_update(model, state_of(model), client_x[k], client_y[k],
                                        data.normalize, cfg, 0, k)
            clients.append(state)
            history.append({"client": k, **stats})
        return FederatedResult(init, None, clients, n_samples, history, time.perf_counter() - t0)

    rng = round_sampler(cfg.seed)
    global_state = init
    clients: list[StateDict] = [state_of(init) for _ in range(k_clients)]
    fedbn_local = aggregate.bn_owned_keys(model) if cfg.regime == "fedbn" else set()
    trained: set[int] = set()
    bar = tqdm(range(cfg.rounds), desc=f"{cfg.regime} rounds", disable=not progress)
    for r in bar:
        chosen = sample_clients(rng, k_clients, cfg.participation)
        losses = []
        for k in chosen:
            start = client_start(global_state, clients[k], fedbn_local)
            clients[k], stats = local_update(model, start, client_x[k], client_y[k],
                                             data.normalize, cfg, r + 1, k)
            losses.append(stats["loss"])
        global_state = aggregate_round(cfg.regime, global_state, [clients[k] for k in chosen],
                                       [n_samples[k] for k in chosen], model)
        row = {"round": r + 1, "clients": chosen, "train_loss": float(np.mean(losses))}
        trained.update(chosen)
        if server_step is not None and server_step.due(r + 1):
            global_state = server_step(r + 1, global_state, {k: clients[k] for k in trained},
                                       {k: n_samples[k] for k in trained})
            row["server_step"] = server_step.reports[-1]
        if on_round is not None:
            view = (aggregate.fedbn_global(clients, n_samples, model) if fedbn_local
                    else global_state)
            row.update(on_round(r + 1, view) or {})
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}")
    if fedbn_local:
        global_state = aggregate.fedbn_global(clients, n_samples, model)
    return FederatedResult(init, global_state, clients, n_samples, history,
                           time.perf_counter() - t0)
