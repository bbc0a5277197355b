"""Run dmm's federated regimes in Flower's simulation engine (Ray backend), in one call.

`run_flower(task)` starts `flwr.simulation.run_simulation` with one SuperNode per client,
`DMMFedAvg` on the ServerApp and `make_client_app(task)` on the nodes, and returns the same
`FederatedResult` as the in-process engine (`dmm.federated.run_federated`), so that
`dmm train --engine flower` writes the same files.

Same seed, same choices: the initial model is built on the server after `torch.manual_seed`
exactly as in-process; each round samples the same partitions; each client trains with the
stream of (seed, round, partition); the server aggregates with the same functions in partition
order. What can differ is floating-point arithmetic in a worker process (thread count), which
`threads` pins.

On one machine Flower brings no speed-up (shared/DATA.md): it is the route to many machines.
`cpus_per_client` sets Ray's `num_cpus` per client (the number of clients that train at once
is the machine's CPUs divided by it); by default one client trains at a time with every core.
`run_simulation` is deprecated since flwr 1.28 in favour of `flwr run`, and logs a warning; it
is the one in-process entry point Flower has (`examples/flower` shows `flwr run`).
"""

from __future__ import annotations

import logging
import os
import time

import torch

from dmm.errors import DMMError
from dmm.flower import require_flower

require_flower()

from flwr.app import ArrayRecord, Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from dmm.federated import FederatedConfig, FederatedResult  # noqa: E402
from dmm.flower.client import ClientTask, make_client_app, task_data  # noqa: E402
from dmm.flower.strategy import DMMFedAvg  # noqa: E402
from dmm.statedict import state_of  # noqa: E402

log = logging.getLogger(__name__)


def run_flower(
    task: ClientTask,
    *,
    pool_bn: bool = False,
    dmm=None,
    dmm_every: int = 0,
    refine_kwargs: dict | None = None,
    cpus_per_client: int | None = None,
    verbose: bool = False,
    loop=None,
    label_counts: dict[int, list[int]] | None = None,
) -> tuple[FederatedResult, DMMFedAvg]:
    """Train `task` in Flower's simulation engine; returns (result, the strategy).

    `pool_bn=False` is FedAvg as the in-process engine does it (every key averaged), so that both
    engines agree; `pool_bn=True` pools BatchNorm statistics (Eq. 3-4). `dmm` (a DMMConfig)
    runs DMM on the server after the last round (and every `dmm_every` rounds; then through
    `dmm.inloop.LoopRefiner` with `loop` and the clients' `label_counts`, as in-process).
    """
    from dmm.models import create

    cfg = FederatedConfig.from_dict(task.federated)
    cfg.validate()
    cpus = os.cpu_count() or 1
    per_client = cpus_per_client or cpus
    if not 1 <= per_client <= cpus:
        raise DMMError(f"cpus per client must be in 1..{cpus} (this machine's CPUs), "
                       f"got {per_client}")
    if cfg.oneshot_init != "shared" and cfg.regime == "oneshot":
        raise DMMError("the Flower engine runs one-shot clients from the shared init only "
                       "(oneshot_init='independent' is in-process only)")
    t0 = time.perf_counter()
    _, part = task_data(task)  # fail here, not in a worker, on a bad data set or split
    torch.manual_seed(cfg.seed)
    template = create(task.arch, **task.arch_kwargs)
    init = state_of(template)
    strategy = DMMFedAvg(template, regime=cfg.regime, pool_bn=pool_bn, dmm=dmm,
                         dmm_every=dmm_every, seed=cfg.seed, fraction_train=cfg.participation,
                         min_available_nodes=task.clients, refine_kwargs=refine_kwargs,
                         loop=loop, label_counts=label_counts)
    holder: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            holder["result"] = strategy.start(grid, ArrayRecord(init), num_rounds=cfg.rounds)
        except BaseException as e:  # the ServerApp runs in a thread: carry the error out
            holder["error"] = e

    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    if not verbose:
        flwr_log.setLevel(logging.WARNING)
    try:
        run_simulation(
            server_app=server_app, client_app=make_client_app(task), num_supernodes=task.clients,
            backend_config={"client_resources": {"num_cpus": per_client, "num_gpus": 0.0},
                            "init_args": {"num_cpus": cpus, "include_dashboard": False,
                                          "logging_level": logging.WARNING}},
            verbose_logging=verbose)
    finally:
        flwr_log.setLevel(level)
    if "error" in holder:
        e = holder["error"]
        raise DMMError(f"Flower server failed: {e}") from e
    if "result" not in holder:
        raise DMMError("the Flower simulation ended without running the server")
    if strategy.failures:
        f = strategy.failures[0]
        raise DMMError(f"{len(strategy.failures)} Flower client replies failed; first, round "
                       f"{f['round']}: {f['reason']}")
    pids = sorted(strategy.client_states)
    if len(pids) != task.clients and cfg.regime == "oneshot":
        raise DMMError(f"only {len(pids)} of {task.clients} one-shot clients replied")
    # clients never sampled keep the initial model, as in-process
    clients = [strategy.client_states.get(k, init) for k in range(task.clients)]
    result = FederatedResult(init, strategy.global_state(), clients, part.sizes,
                             strategy.history, time.perf_counter() - t0)
    return result, strategy
