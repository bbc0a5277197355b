"""`DMMFedAvg`: a Flower strategy (Message API) with BatchNorm statistics pooled correctly and
DMM run on the server.

Flower's own `FedAvg` averages every array, BatchNorm running variances included, as if they
were weights (and, with int64 `num_batches_tracked`, hands back float64 counters). This
strategy aggregates with dmm's own functions instead:

- weights: the sample-weighted average (`dmm.federated.aggregate.fedavg`), integer counters
  rounded back to their dtype;
- BatchNorm running statistics, with `pool_bn=True` (the default): pooled with the paper's
  Eq. 3-4 (`dmm.bn.aggregate_bn_buffers`, weights = the clients' sample counts), i.e. the
  mean and variance of the union of the clients' features;
- `regime="fedbn"`: only non-BN keys are shared; the clients keep their BN layers; the final
  model pools their statistics (`fedbn_global`);
- `regime="oneshot"`: one round in which every client trains its whole budget; there is no
  global model until DMM (or `dmm merge`) makes one.

After the final round (and every `dmm_every` rounds if set) and with a `DMMConfig`, the server
runs `dmm.refine` on the aggregated model, with the latest model of every client that has
trained so far as the domain models (teachers). The refined model is what the next round
starts from and what `start()` returns.

Sampling. Flower's FedAvg samples node ids with Python's global `random`. This strategy asks
every node for its partition id once (a QUERY message), then samples partitions with
`dmm.federated.rounds.sample_clients`, the in-process engine's seeded draw, so the same seed
picks the same clients in both engines: max(1, round(fraction_train x K)) per round (Flower's
own rule is max(min_train_nodes, floor(fraction_train x N))).

Clients whose reply is an error are left out of that round's aggregation, as in Flower; they are
listed in `failures` (`dmm train --engine flower` stops with an error if there is any).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
from torch import nn

from dmm.flower import require_flower

require_flower()

from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from dmm.errors import DMMError  # noqa: E402
from dmm.federated import aggregate  # noqa: E402
from dmm.federated.rounds import REGIMES, aggregate_round, round_sampler, sample_clients  # noqa: E402,E501
from dmm.statedict import StateDict  # noqa: E402

log = logging.getLogger(__name__)


class DMMFedAvg(FedAvg):
    def __init__(
        self,
        template: nn.Module,
        *,
        regime: str = "fedavg",
        pool_bn: bool = True,
        dmm=None,
        dmm_every: int = 0,
        seed: int = 0,
        fraction_train: float = 1.0,
        min_available_nodes: int = 2,
        refine_kwargs: dict | None = None,
        discovery_timeout: float = 600.0,
        loop=None,
        label_counts: dict[int, list[int]] | None = None,
    ) -> None:
        if regime not in REGIMES:
            raise DMMError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
        if not 0 < fraction_train <= 1:
            raise DMMError(f"fraction_train must be in (0, 1], got {fraction_train}")
        if dmm_every < 0:
            raise DMMError(f"dmm_every must be >= 0, got {dmm_every}")
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0,
                         min_train_nodes=1, min_available_nodes=min_available_nodes)
        self.template = template
        self.regime = regime
        self.pool_bn = pool_bn
        self.dmm = dmm
        self.dmm_every = dmm_every
        self.seed = seed
        self.refine_kwargs = refine_kwargs or {}
        self.discovery_timeout = discovery_timeout
        self.loop = loop                  # dmm.inloop.LoopConfig for dmm_every > 0
        self.label_counts = label_counts  # partition id -> label histogram (None: estimated)
        self._loop = None
        self._rng = round_sampler(seed)
        self._nodes: dict[int, int] | None = None   # partition id -> node id
        self._global: StateDict | None = None
        self._refined_at = 0                          # the round whose model DMM refined
        self._round = 0                               # the last round aggregated
        self._t_round = 0.0
        self._chosen: list[int] = []                  # the partitions sent this round
        self.num_rounds = 0
        self.client_states: dict[int, StateDict] = {}
        self.n_samples: dict[int, int] = {}
        self.history: list[dict] = []
        self.failures: list[dict] = []
        self.dmm_reports: list[dict] = []

    # -- the round loop ----------------------------------------------------------------------

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kwargs):
        self.num_rounds = 1 if self.regime == "oneshot" else num_rounds
        self._global = dict(initial_arrays.to_torch_state_dict())
        return super().start(grid, initial_arrays, num_rounds=self.num_rounds, **kwargs)

    def _discover(self, grid: Grid) -> dict[int, int]:
        """partition id -> node id, asked of every node once."""
        t0 = time.monotonic()
        while len(nodes := list(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() - t0 > self.discovery_timeout:
                raise DMMError(f"only {len(nodes)} of {self.min_available_nodes} Flower nodes "
                               f"connected within {self.discovery_timeout:.0f} s")
            time.sleep(0.2)
        out = self._ask_partitions(grid, nodes, {})
        if sorted(out) != list(range(len(out))):
            raise DMMError(f"Flower nodes' partition ids are not 0..{len(out) - 1}: {sorted(out)}")
        return out

    def _ask_partitions(self, grid: Grid, nodes: list[int], known: dict[int, int]
                        ) -> dict[int, int]:
        """`known` (partition id -> node id) updated with what `nodes` say of themselves."""
        msgs = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
                for n in nodes]
        out, fresh = dict(known), set()
        for reply in grid.send_and_receive(msgs, timeout=self.discovery_timeout):
            if reply.has_error():
                raise DMMError(f"Flower node {reply.metadata.src_node_id} did not say its "
                               f"partition: {reply.error.reason}")
            pid = int(reply.content["metrics"]["partition-id"])
            if pid in fresh:
                raise DMMError(f"two Flower nodes claim partition {pid}")
            fresh.add(pid)
            out[pid] = reply.metadata.src_node_id
        return out

    def _refresh(self, grid: Grid) -> None:
        """Nodes that joined since the last round (a SuperNode restarted after a failure gets
        a new node id) are asked their partition; a partition's newest node replaces its old
        one. A partition whose node is still connected cannot be claimed by another."""
        connected = set(grid.get_node_ids())
        new = sorted(connected - set(self._nodes.values()))
        if not new:
            return
        updated = self._ask_partitions(grid, new, self._nodes)
        for pid, node in updated.items():
            old = self._nodes.get(pid)
            if old is not None and old != node and old in connected:
                raise DMMError(f"Flower node {node} claims partition {pid}, which node {old} "
                               "still holds")
            if pid not in range(len(self._nodes)):
                raise DMMError(f"Flower node {node} claims partition {pid}, outside "
                               f"0..{len(self._nodes) - 1}")
            if old is not None and old != node:
                log.warning("partition %d: node %d replaces node %d", pid, node, old)
        self._nodes = updated

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self._nodes is None:
            self._nodes = self._discover(grid)
        else:
            self._refresh(grid)
        self._t_round = time.perf_counter()
        k = len(self._nodes)
        chosen = (list(range(k)) if self.regime == "oneshot"
                  else sample_clients(self._rng, k, self.fraction_train))
        self._chosen = chosen
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, [self._nodes[p] for p in chosen],
                                        MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._round = server_round
        valid, errors = self._check_and_log_replies(replies, is_train=True)
        valid = list(valid)
        # one failure per partition sent and not answered; the reason is the node's own error,
        # or the SuperLink's (it answers for a node it lost: no heartbeat)
        reasons = {m.metadata.src_node_id: m.error.reason for m in errors}
        nodes = self._nodes or {}
        link = [r for n, r in reasons.items() if n not in nodes.values()]
        answered = {int(m.content["metrics"]["partition-id"]) for m in valid}
        missing = [p for p in self._chosen if p not in answered]
        for pid in missing:
            node = nodes.get(pid)
            self.failures.append({"round": server_round, "partition": pid, "node": node,
                                  "reason": reasons.get(node) or (link[0] if link
                                                                  else "no reply")})
        if not valid:
            return None, None
        got = sorted(((int(m.content["metrics"]["partition-id"]), m) for m in valid),
                     key=lambda t: t[0])
        pids, states, ns, losses = [], [], [], []
        for pid, m in got:
            state = dict(m.content[self.arrayrecord_key].to_torch_state_dict())
            n = int(m.content["metrics"][self.weighted_by_key])
            self.client_states[pid], self.n_samples[pid] = state, n
            pids.append(pid)
            states.append(state)
            ns.append(n)
            losses.append(float(m.content["metrics"]["train-loss"]))
        if self.regime != "oneshot":
            g = aggregate_round(self.regime, self._global, states, ns, self.template)
            if self.pool_bn and self.regime != "fedbn":
                from dmm.bn import aggregate_bn_buffers
                g = aggregate_bn_buffers(states, self.template, weights=ns, into=g)
            self._global = g
        row = {"round": server_round, "clients": pids, "failed": missing,
               "train_loss": float(np.mean(losses)),
               "seconds": time.perf_counter() - self._t_round}
        if self.dmm is not None and (server_round == self.num_rounds or
                                     (self.dmm_every and server_round % self.dmm_every == 0)):
            row["dmm"] = self._run_dmm()
        self.history.append(row)
        metrics = MetricRecord({"train-loss": row["train_loss"], "clients": len(pids)})
        return ArrayRecord(self._global), metrics

    # -- the server's model ------------------------------------------------------------------

    def global_state(self) -> StateDict | None:
        """The model a global test set should see: the DMM-refined one if the last round ran
        DMM; else FedBN pools the clients' BN layers, and one-shot has none (None)."""
        if self._refined_at and self._refined_at == self._round:
            return self._global
        if self.regime == "fedbn" and self.client_states:
            pids = sorted(self.client_states)
            return aggregate.fedbn_global([self.client_states[p] for p in pids],
                                          [self.n_samples[p] for p in pids], self.template)
        if self.regime == "oneshot":
            return None
        return self._global

    def _run_dmm(self) -> dict:
        from dmm.pipeline import refine
        from dmm.statedict import state_of, weighted_average

        pids = sorted(self.client_states)
        teachers = [self.client_states[p] for p in pids]
        ns = [self.n_samples[p] for p in pids]
        self._refined_at = 0
        student = self.global_state()
        if student is None:  # one-shot: DMM refines the sample-weighted average
            student = weighted_average(teachers, ns)
        if self.dmm_every and self.regime in ("fedavg", "fedprox"):
            # between rounds: the in-process engine's server step (pool, guard), shared
            from dmm.inloop import LoopConfig, LoopRefiner
            if self._loop is None:
                loop = self.loop or LoopConfig(every=self.dmm_every)
                self._loop = LoopRefiner(self.dmm, loop, self.template, rounds=self.num_rounds,
                                         label_counts=self.label_counts, **self.refine_kwargs)
            self._global = self._loop(self._round, student, dict(self.client_states),
                                      dict(self.n_samples))
            self._refined_at = self._round
            self.dmm_reports.append(self._loop.reports[-1])
            return self._loop.reports[-1]
        model, report = refine(student, teachers, self.dmm, template=self.template,
                               n_samples=ns, **self.refine_kwargs)
        self._global = state_of(model)
        self._refined_at = self._round
        summary = {"teachers": [pids[i] for i in report.teachers],
                   "timings": report.timings}
        self.dmm_reports.append(report.to_dict())
        return summary
