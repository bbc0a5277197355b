"""A Flower ClientApp that trains a dmm model on its dmm partition.

Each SuperNode knows its `partition-id` (Flower's node config). The ClientApp carries a small
`ClientTask` (data set name, split, architecture, federated config); each worker process loads
the data set and draws the Dirichlet partition once (the same call as `dmm train`, so the same
seed gives the same split) and caches them. A deployed SuperNode whose node config names a
`data-file` (a party file, `dmm.data.party`) reads only that file instead. Messages carry only
model arrays.

Handlers:
- `query`: replies with the node's partition id (the strategy maps partitions to node ids with it,
  so that it samples clients by partition exactly as the in-process engine does);
- `train`: `dmm.federated.rounds.local_update` from the received model, with the seeded stream of
  (seed, round, partition); FedBN keeps the node's own BatchNorm layers in `context.state`
  between rounds. The reply carries the model, `num-examples`, `partition-id` and the loss.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from dmm.flower import require_flower

require_flower()

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

BN_STATE_KEY = "dmm-own-bn"


@dataclass(frozen=True)
class ClientTask:
    """What every client needs to rebuild its data and model (JSON-serializable)."""

    dataset: str
    arch: str
    arch_kwargs: dict
    federated: dict                    # FederatedConfig.to_dict()
    partition: dict                    # PartitionConfig.to_dict() (its seed: the run's seed)
    data_root: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    threads: int = 0                   # torch threads per client (0: leave torch's default)

    @property
    def clients(self) -> int:
        return int(self.partition["clients"])

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@lru_cache(maxsize=2)
def cached_dataset(name: str, root: str | None, n_train: int | None, n_test: int | None):
    """The data set, loaded once per process (the task parser and every round share it)."""
    from dmm.data.base import load_dataset

    return load_dataset(name, root, n_train=n_train, n_test=n_test)


@lru_cache(maxsize=4)
def _task_data(key: str):
    """(data, partition) for a task, once per worker process."""
    from dmm.data import PartitionConfig

    t = json.loads(key)
    data = cached_dataset(t["dataset"], t["data_root"], t["n_train"], t["n_test"])
    return data, PartitionConfig(**t["partition"]).split(data)


def task_data(task: ClientTask):
    return _task_data(task.key())


@lru_cache(maxsize=2)
def party_data(path: str):
    """(data, partition id, number of partitions) of one party file, once per process."""
    from dmm.data.party import read_party

    return read_party(path)


def node_data(task: ClientTask, node_config) -> tuple:
    """(images, labels, normalize) of this node's partition.

    A node whose config names a `data-file` (a party file, `dmm.data.party`) reads that file
    and nothing else: what a deployed SuperNode holds. Otherwise the node loads the task's
    data set and takes its Dirichlet slice by `partition-id` (the simulation engine)."""
    from dmm import inputs as I
    from dmm.errors import DMMError

    pid = int(node_config["partition-id"])
    if node_config.get("data-file"):
        path = str(node_config["data-file"])
        data, file_pid, n_parts = party_data(path)
        if file_pid not in (-1, pid) or n_parts not in (0, task.clients):
            raise DMMError(f"{path}: party file of partition {file_pid} of {n_parts}, but "
                           f"this node is partition {pid} of {task.clients}")
        return data.x_train, data.y_train, data.normalize
    data, part = task_data(task)
    idx = torch.as_tensor(part.indices[pid])
    return I.take(data.x_train, idx), data.y_train[idx], data.normalize


def handle_query(msg: Message, context: Context) -> Message:
    """Reply with this node's partition id."""
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)


def handle_train(task: ClientTask, msg: Message, context: Context) -> Message:
    """One round of local training on this node's partition of `task`."""
    from dmm import inputs as I
    from dmm.checkpoint import check_fits, check_memory, state_bytes
    from dmm.federated import FederatedConfig
    from dmm.federated.aggregate import bn_owned_keys
    from dmm.federated.rounds import client_start, local_update
    from dmm.models import create

    if task.threads:
        torch.set_num_threads(task.threads)
    cfg = FederatedConfig.from_dict(task.federated)
    pid = int(context.node_config["partition-id"])
    n_parts = int(context.node_config.get("num-partitions", task.clients))
    if n_parts != task.clients:
        raise ValueError(f"the federation has {n_parts} nodes but the task {task.clients} "
                         "clients")
    x, y, normalize = node_data(task, context.node_config)
    server_round = int(msg.content["config"]["server-round"])
    received = dict(msg.content["arrays"].to_torch_state_dict())
    with torch.device("meta"):  # compared before anything is allocated for the model
        shapes = create(task.arch, **task.arch_kwargs).state_dict()
    check_fits(shapes, received, f"round {server_round}: the server's model", task.arch)
    check_memory(state_bytes(shapes), f"round {server_round}: the server's model")
    model = create(task.arch, **task.arch_kwargs)
    own_keys = bn_owned_keys(model) if cfg.regime == "fedbn" else set()
    own = (dict(context.state[BN_STATE_KEY].to_torch_state_dict())
           if own_keys and BN_STATE_KEY in context.state else None)
    start = client_start(received, own, own_keys)
    round_ = 0 if cfg.regime == "oneshot" else server_round
    state, stats = local_update(model, start, x, y, normalize, cfg, round_, pid)
    if own_keys:
        context.state[BN_STATE_KEY] = ArrayRecord({k: state[k] for k in own_keys})
    metrics = MetricRecord({"num-examples": I.count(x), "partition-id": pid,
                            "train-loss": float(stats["loss"])})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


def make_client_app(task: ClientTask | None = None) -> ClientApp:
    """The ClientApp for `task` (Message API: query and train handlers); without a task, each
    message's task comes from the run config (`flwr run --run-config ...`)."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        t = task if task is not None else task_from_run_config(context.run_config)
        return handle_train(t, msg, context)

    return app


# Run config keys (`[tool.flwr.app.config]`, kebab-case) -> ClientTask / FederatedConfig fields.
RUN_CONFIG_DEFAULTS = {
    "dataset": "fmnist", "data-root": "", "n-train": 0, "n-test": 0, "arch": "resnet18",
    "width": 0.25, "alpha": 0.1, "clients": 10, "min-size": 10, "regime": "fedavg",
    "rounds": 10, "local-iters": 10, "lr": 0.05, "batch-size": 128, "mu": 0.01,
    "participation": 1.0, "seed": 0, "threads": 0,
}

# read by the ServerApp only (dmm.flower.server)
SERVER_KEYS = ("dmm-preset", "dmm-config", "dmm-every", "pool-bn", "out")


def task_from_run_config(run_config: dict) -> ClientTask:
    """A ClientTask from a Flower run config (`flwr run --run-config "alpha=0.5 ..."`)."""
    return _task_from_json(json.dumps(dict(run_config), sort_keys=True))


@lru_cache(maxsize=4)
def _task_from_json(key: str) -> ClientTask:
    run_config = json.loads(key)
    from dmm.data import PartitionConfig
    from dmm.errors import DMMError
    from dmm.federated import FederatedConfig, TrainConfig
    from dmm.models import arch_kwargs

    unknown = sorted(set(run_config) - set(RUN_CONFIG_DEFAULTS) - set(SERVER_KEYS))
    if unknown:
        raise DMMError(f"unknown run config keys: {', '.join(unknown)}; known: "
                       f"{', '.join([*RUN_CONFIG_DEFAULTS, *SERVER_KEYS])}")
    c = {**RUN_CONFIG_DEFAULTS, **run_config}
    data = cached_dataset(c["dataset"], c["data-root"] or None, int(c["n-train"]) or None,
                          int(c["n-test"]) or None)
    train = TrainConfig(lr=float(c["lr"]), batch_size=int(c["batch-size"]),
                        local_iters=int(c["local-iters"]),
                        prox_mu=float(c["mu"]) if c["regime"] == "fedprox" else 0.0)
    fed = FederatedConfig(regime=c["regime"], rounds=int(c["rounds"]),
                          participation=float(c["participation"]), seed=int(c["seed"]),
                          train=train)
    fed.validate()
    part = PartitionConfig(alpha=float(c["alpha"]), clients=int(c["clients"]),
                           min_size=int(c["min-size"]), seed=fed.seed)
    kw = arch_kwargs(c["arch"], num_classes=data.num_classes, in_channels=data.in_channels,
                     width=float(c["width"]))
    return ClientTask(dataset=c["dataset"], arch=c["arch"], arch_kwargs=kw,
                      federated=fed.to_dict(), partition=part.to_dict(),
                      data_root=c["data-root"] or None, n_train=int(c["n-train"]) or None,
                      n_test=int(c["n-test"]) or None, threads=int(c["threads"]))
