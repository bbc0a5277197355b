"""Flower's deployment engine on this machine's loopback: one SuperLink, one SuperNode per
party (separate processes, 127.0.0.1), the example app run with `flwr run`, FedAvg with
BatchNorm statistics pooled and DMM on the server; then the same with one SuperNode killed
(SIGKILL) during a round and restarted.

    python examples/flower/deploy.py --clients 3 --rounds 3 --kill-node 1 --kill-round 2

Each SuperNode reads its own party file (its Dirichlet partition, written to a temporary
folder); the server reads only the data's description; the final models are evaluated here on
the test split. Every process started is stopped by its process group, also on failure or
Ctrl-C; the temporary files go with it. Prints one row per run and, with --json, writes them
with the configuration and provenance.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dmm-config", default='{"inversion": {"n_images": 256}}',
                   help="JSON overrides of the DMM preset (default: a small inversion budget)")
    p.add_argument("--kill-node", type=int, default=1)
    p.add_argument("--kill-round", type=int, default=2)
    p.add_argument("--rejoin-after", type=float, default=5.0,
                   help="seconds after the kill to restart the SuperNode (negative: never)")
    p.add_argument("--no-baseline", action="store_true", help="only the run with the fault")
    p.add_argument("--no-fault", action="store_true", help="only the run without the fault")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)

    from dmm.data import PartitionConfig
    from dmm.data.base import load_dataset
    from dmm.errors import DMMError
    from dmm.flower.deploy import rehearse
    from dmm.io import provenance, write_json

    try:
        if not 0 <= args.kill_node < args.clients:
            raise DMMError(f"--kill-node must be in 0..{args.clients - 1}, got {args.kill_node}")
        if not 1 <= args.kill_round <= args.rounds:
            raise DMMError(f"--kill-round must be in 1..{args.rounds}, got {args.kill_round}")
        if args.no_baseline and args.no_fault:
            raise DMMError("--no-baseline and --no-fault leave nothing to run")
        data = load_dataset(args.dataset, args.data_root, n_train=args.n_train or None,
                            n_test=args.n_test or None)
        part = PartitionConfig(alpha=args.alpha, clients=args.clients, min_size=10,
                               seed=args.seed).split(data)
        rc = {"arch": args.arch, "width": args.width, "rounds": args.rounds,
              "local-iters": args.local_iters, "alpha": args.alpha, "seed": args.seed,
              "dmm-config": args.dmm_config}
        runs = []
        if not args.no_baseline:
            runs.append(("no fault", {}))
        if not args.no_fault:
            runs.append((f"SuperNode {args.kill_node} killed in round {args.kill_round}",
                         {"kill": (args.kill_node, args.kill_round),
                          "rejoin_after": None if args.rejoin_after < 0 else args.rejoin_after}))
        rows = []
        with tempfile.TemporaryDirectory(prefix="dmm-deploy-out-") as out:
            for i, (name, fault) in enumerate(runs):
                print(f"== {name}", flush=True)
                row = rehearse(data, part, rc, Path(out) / f"run{i}.safetensors",
                               threads=args.threads, report=lambda s: print("  " + s,
                                                                            flush=True),
                               **fault)
                row.pop("checkpoint")
                rows.append({"run": name, **row})
    except DMMError as e:
        print(f"deploy: {e}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"\n{'run':<36} {'accuracy':>8} {'rounds':>6} {'failed':>16} {'seconds':>8}")
    for r in rows:
        failed = ",".join(f"r{k + 1}:{p}" for k, ps in enumerate(r["failed_per_round"])
                          for p in ps) or "-"
        print(f"{r['run']:<36} {100 * r['accuracy']:>7.2f}% {r['rounds']:>6} {failed:>16} "
              f"{r['seconds']:>8.1f}")
    for r in rows:
        for f in r["failures"]:
            print(f"  {r['run']}: round {f['round']}, partition {f['partition']}: {f['reason']}")
        for e in r["events"]:
            print(f"  {r['run']}: {json.dumps(e)}")
    if args.json:
        write_json(args.json, {"config": vars(args), "rows": rows, "provenance": provenance()})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
