"""The `dmm` command line: demo | train | evaluate | merge | inspect.

Only this module prints. Bad input (a `DMMError`, or an argparse error) is one line on stderr
and exit status 2; no output file is left half-written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from dmm.errors import DMMError


def _positive_int(name: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v
    return parse


def _positive_float(name: str):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if not v > 0 or v != v or v == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {s}")
        return v
    return parse


DATASETS = "fmnist | cifar10 | cifar100 | npz | emoji-mm | crisismmd"


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="fmnist", help=DATASETS)
    p.add_argument("--data-root", default=None,
                   help="folder (or .npz file) holding the data set; fmnist defaults to "
                        "the Debian package's folder or $DMM_DATA_DIR")
    p.add_argument("--n-train", type=_positive_int("--n-train"), default=None,
                   help="use only the first N training images (quick runs)")
    p.add_argument("--n-test", type=_positive_int("--n-test"), default=None,
                   help="use only the first N test images")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="resnet18",
                   help="resnet18 | resnet8 | package.module:Class (your own nn.Module)")
    p.add_argument("--width", type=_positive_float("--width"), default=0.25,
                   help="channel width multiplier of the ResNets (1 = 64/128/256/512)")


def _add_source_args(p: argparse.ArgumentParser, *, counts: bool = True) -> None:
    """What model files without dmm metadata lack (dmm.sources.ModelSpec); a given flag
    overrides the files' own metadata."""
    g = p.add_argument_group("models without dmm metadata (plain safetensors, .pt, your class)")
    g.add_argument("--arch", default=None,
                   help="the inputs' architecture: resnet18 | resnet8 | package.module:Class "
                        "(your own nn.Module; importing it is trusted, you typed it)")
    g.add_argument("--arch-kwargs", default=None, metavar="JSON",
                   help='keyword arguments of the class, e.g. \'{"num_classes": 10}\'')
    g.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="the models' input size, e.g. 1,28,28 (the inversion's image size)")
    g.add_argument("--mean", default=None, metavar="M[,M...]",
                   help="per-channel input normalization mean, e.g. 0.1307")
    g.add_argument("--std", default=None, metavar="S[,S...]",
                   help="per-channel input normalization std, e.g. 0.3081")
    if counts:
        g.add_argument("--n-samples", default=None, metavar="N,N,...",
                       help="training samples behind each input, in input order (merge "
                            "weights); or a JSON sidecar beside each file")
        g.add_argument("--label-counts", default=None, metavar="JSON",
                       help="each input's training samples per class, e.g. '[[5,0],[1,4]]'")


def _numbers(flag: str, raw: str | None, kind: type) -> list | None:
    if raw is None:
        return None
    try:
        return [kind(x) for x in raw.split(",")]
    except ValueError:
        raise DMMError(f"{flag} must be comma-separated {'integers' if kind is int else 'numbers'}"
                       f", got {raw!r}") from None


def _json_arg(flag: str, raw: str | None):
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise DMMError(f"{flag} is not JSON ({e})") from e


def _model_spec(args: argparse.Namespace):
    from dmm.sources import ModelSpec

    return ModelSpec(arch=args.arch, arch_kwargs=_json_arg("--arch-kwargs", args.arch_kwargs),
                     input_shape=_numbers("--input-shape", args.input_shape, int),
                     mean=_numbers("--mean", args.mean, float),
                     std=_numbers("--std", args.std, float),
                     n_samples=_numbers("--n-samples", getattr(args, "n_samples", None), int),
                     label_counts=_json_arg("--label-counts",
                                            getattr(args, "label_counts", None)))


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration (> 0)")
    p.add_argument("--clients", type=int, default=10, help="number of clients K (>= 1)")
    p.add_argument("--min-size", type=int, default=10, help="minimum samples per client")
    p.add_argument("--regime", default="fedavg", help="fedavg | fedprox | fedbn | oneshot")
    p.add_argument("--rounds", type=_positive_int("--rounds"), default=60)
    p.add_argument("--local-iters", type=_positive_int("--local-iters"), default=10,
                   help="SGD steps per client per round")
    p.add_argument("--local-epochs", type=_positive_int("--local-epochs"), default=None,
                   help="passes over local data per round (overrides --local-iters)")
    p.add_argument("--participation", type=float, default=1.0,
                   help="fraction of clients per round, in (0, 1]")
    p.add_argument("--lr", type=_positive_float("--lr"), default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=128)
    p.add_argument("--mu", type=float, default=0.01, help="FedProx proximal coefficient")
    p.add_argument("--fp32", action="store_true", help="train in fp32 (default: bf16 autocast)")
    p.add_argument("--oneshot-init", default="shared", choices=["shared", "independent"],
                   help="one-shot regime: every client from the same seeded init, or each "
                        "from its own")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmm", description="Data-free merging of divergent models (DMM) and its baselines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the main job on the embedded default data (Fashion-MNIST)")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("train", help="train client models federated or one-shot")
    _add_data_args(p)
    _add_model_args(p)
    _add_train_args(p)
    p.add_argument("--out", required=True, help="output folder for the checkpoints")
    p.add_argument("--no-eval", action="store_true", help="skip evaluating the global model")
    p.add_argument("--engine", default="inprocess", choices=["inprocess", "flower"],
                   help="run the rounds in this process, or in Flower's simulation engine "
                        "(one SuperNode per client; needs dmm[flower])")
    p.add_argument("--cpus-per-client", type=_positive_int("--cpus-per-client"), default=None,
                   help="Flower engine: CPUs per client (default: all, one client at a time)")
    g = p.add_argument_group("DMM between rounds (fedavg, fedprox; dmm.inloop)")
    g.add_argument("--dmm-every", type=_positive_int("--dmm-every"), default=None, metavar="N",
                   help="refine the global model with DMM on the server after every N-th "
                        "round and after the last, the clients' latest models as teachers")
    g.add_argument("--dmm-preset", default="default", help="its DMM preset")
    g.add_argument("--dmm-config", default=None, help="JSON file of DMMConfig overrides")
    g.add_argument("--dmm-pool", type=_positive_int("--dmm-pool"), default=2560,
                   help="pseudo-samples kept across refinements")
    g.add_argument("--dmm-refresh", type=_positive_int("--dmm-refresh"), default=256,
                   help="fresh pseudo-samples per refinement (the guard's, then the pool's)")
    g.add_argument("--dmm-steps", type=_positive_int("--dmm-steps"), default=200,
                   help="distillation steps of each refinement after the first")
    g.add_argument("--no-dmm-guard", action="store_true",
                   help="keep every refinement (by default one that lowers the agreement with "
                        "the class-routed teachers on fresh pseudo-data is dropped)")

    p = sub.add_parser("evaluate", help="evaluate checkpoints on a data set's test split")
    p.add_argument("checkpoints", nargs="+", help="model files (.safetensors, .pt) or folders "
                   "(of client_*, of model files, or saved by transformers)")
    _add_data_args(p)
    _add_source_args(p, counts=False)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")

    p = sub.add_parser(
        "merge", help="merge client checkpoints, optionally refine with DMM",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="your own models (plain safetensors or .pt state dicts of your class):\n"
               "  dmm merge client_*.safetensors --arch mypkg.nets:ResNet \\\n"
               "      --arch-kwargs '{\"num_classes\": 10}' --input-shape 1,28,28 \\\n"
               "      --mean 0.1307 --std 0.3081 --weights uniform --out merged.safetensors\n"
               "transformers folders (save_pretrained) merge into a folder:\n"
               "  dmm merge run/client_0 run/client_1 run/client_2 --out merged_folder")
    p.add_argument("inputs", nargs="+", help="model files (.safetensors, .pt) or folders "
                   "(of client_*, of model files, or saved by transformers)")
    p.add_argument("--method", default="average",
                   help="average | task_arithmetic | ties | rebasin | pleas | cat")
    p.add_argument("--base", default=None, help="base checkpoint (the common initialization, "
                   "e.g. init.safetensors) for task arithmetic, TIES and CAT")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a method parameter, e.g. --param density=0.2 (repeatable)")
    p.add_argument("--student", default=None,
                   help="use this checkpoint as the merged model instead of merging "
                        "(e.g. the FedAvg global model); the inputs are the teachers")
    p.add_argument("--refine", default="dmm", choices=["dmm", "none"])
    p.add_argument("--bn-reset", action="store_true",
                   help="recompute the merged model's BN statistics on pseudo-data from every "
                        "input model's own statistics (data-free)")
    p.add_argument("--preset", default="default",
                   help="DMM preset: default | head | paper | transfer")
    p.add_argument("--config", default=None, help="JSON file of DMMConfig overrides")
    p.add_argument("--weights", default="samples", choices=["samples", "uniform"],
                   help="merge weights: by each model's n_samples, or uniform")
    p.add_argument("--in-memory", action="store_true",
                   help="load every input whole (by default, with --refine none, averaging, "
                        "task arithmetic and TIES read the inputs tensor by tensor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="merged checkpoint (.safetensors; a folder for "
                   "transformers inputs)")
    p.add_argument("--report", default=None, help="JSON report (default: beside --out)")
    p.add_argument("--grid", default=None, help="PNG grid of the pseudo-data (default: beside)")
    _add_source_args(p)

    p = sub.add_parser("bench", help="the paper's Table 1, references and ablations as a "
                       "resumable grid (dataset x alpha x method x seed)")
    p.add_argument("--preset", default="quick", help="quick (<= 15 min on 2 cores) | paper")
    p.add_argument("--dataset", default=None, help=DATASETS)
    p.add_argument("--data-root", default=None, help="folder of the data set's files")
    p.add_argument("--alphas", type=float, nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--rows", nargs="+", default=None, help="subset of rows (default: all)")
    p.add_argument("--rounds", type=_positive_int("--rounds"), default=None)
    p.add_argument("--width", type=_positive_float("--width"), default=None)
    p.add_argument("--device", default=None, help="cpu (default) | cuda | cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other bench setting (see dmm.bench.BenchSpec), JSON value")
    p.add_argument("--out", default=None,
                   help="results folder (default: benchmarks/results/<dataset>-<preset>)")
    p.add_argument("--cache-dir", default="runs/bench-cache",
                   help="trained client models, reused across rows and runs")
    p.add_argument("--render-only", action="store_true",
                   help="only regenerate tables, CSV and plots from the results folder")
    p.add_argument("--readme", default=None,
                   help="also write the table into this file's <!-- dmm-bench:NAME --> section")

    p = sub.add_parser("convert", help="a PyTorch .pt state dict or a plain safetensors file -> "
                       "a dmm checkpoint (.pt loaded with weights_only=True: no code runs; "
                       "checked against --arch)")
    p.add_argument("input", help="a .pt/.pth file holding a state dict (or {'state_dict': ...}), "
                   "or a .safetensors file")
    p.add_argument("--arch", required=True, help="resnet18 | resnet8 | package.module:Class")
    p.add_argument("--arch-kwargs", default="{}",
                   help='JSON keyword arguments, e.g. \'{"width": 0.25, "num_classes": 10}\'')
    p.add_argument("--n-samples", type=_positive_int("--n-samples"), default=None,
                   help="the number of training samples behind the model (merge weights)")
    p.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")

    p = sub.add_parser("inspect", help="divergence table of client models against a merge")
    p.add_argument("inputs", nargs="+", help="model files (.safetensors, .pt) or folders "
                   "(of client_*, of model files, or saved by transformers)")
    p.add_argument("--student", default=None, help="merged model to compare against "
                   "(default: the sample-weighted average of the inputs)")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--tau", type=float, default=0.0)
    p.add_argument("--chart", default=None, help="bar chart PNG (default: divergence.png "
                   "in the first input's folder)")
    _add_source_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except DMMError as e:
        print(f"dmm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dmm: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
# train / evaluate
# ---------------------------------------------------------------------------------------------

def _data_config(args):
    from dmm.jobs import DataConfig
    return DataConfig(args.dataset, args.data_root, args.n_train, args.n_test)


def cmd_train(args: argparse.Namespace) -> int:
    from dmm.data import PartitionConfig
    from dmm.federated import FederatedConfig, TrainConfig
    from dmm.jobs import TrainJob, train

    fed = FederatedConfig(
        regime=args.regime, rounds=args.rounds, participation=args.participation, seed=args.seed,
        oneshot_init=args.oneshot_init, train=TrainConfig(
            lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
            batch_size=args.batch_size, local_iters=None if args.local_epochs else args.local_iters,
            local_epochs=args.local_epochs or 1, bf16=not args.fp32,
            prox_mu=args.mu if args.regime == "fedprox" else 0.0))
    part = PartitionConfig(alpha=args.alpha, clients=args.clients, min_size=args.min_size,
                           seed=args.seed)
    loop_kw = {}
    if args.dmm_every:
        from dmm.inloop import LoopConfig
        from dmm.jobs import dmm_config
        loop_kw = dict(dmm_every=args.dmm_every,
                       dmm=dmm_config(args.dmm_preset, args.dmm_config, args.seed),
                       loop=LoopConfig(every=args.dmm_every, pool=args.dmm_pool,
                                       refresh=args.dmm_refresh, steps=args.dmm_steps,
                                       guard=not args.no_dmm_guard))
    job = TrainJob(_data_config(args), part, fed, arch=args.arch, width=args.width,
                   engine=args.engine, cpus_per_client=args.cpus_per_client,
                   evaluate=not args.no_eval, **loop_kw)
    out = train(job, args.out, verbose=args.verbose)
    print(f"{args.regime}: {args.clients} clients, alpha {args.alpha}, "
          f"{out.result.wall_time:.1f} s; wrote {out.out}")
    for r in out.eval:
        print(f"  {r['model']}: accuracy {100 * r['accuracy']:.2f}%  loss {r['loss']:.4f}")
    if out.dmm_reports:
        kept = sum(bool(r.get("kept", True)) for r in out.dmm_reports)
        print(f"  DMM between rounds: {len(out.dmm_reports)} refinements, {kept} kept "
              f"(the guard dropped {len(out.dmm_reports) - kept})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dmm.jobs import evaluate

    rows = evaluate(args.checkpoints, _data_config(args), json_path=args.json,
                    spec=_model_spec(args))
    width = max(len(r["checkpoint"]) for r in rows)
    print(f"{'checkpoint':<{width}}  accuracy     loss")
    for r in rows:
        print(f"{r['checkpoint']:<{width}}  {100 * r['accuracy']:7.2f}%  {r['loss']:7.4f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dmm.demo import run_demo
    t0 = time.perf_counter()
    results = run_demo(Path(args.out), seed=args.seed)
    print(json.dumps({"results": str(Path(args.out) / "results.json"),
                      "wall_time_s": round(time.perf_counter() - t0, 1)}))
    return 0 if results else 1


# ---------------------------------------------------------------------------------------------
# merge / inspect
# ---------------------------------------------------------------------------------------------

def _method_params(pairs: list[str]) -> dict:
    """--param KEY=VALUE pairs parsed as JSON values where possible (merge_files and the
    registry check the names)."""
    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise DMMError(f"--param must look like KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def cmd_merge(args: argparse.Namespace) -> int:
    from dmm.jobs import merge_files

    out = merge_files(args.inputs, args.out, method=args.method, refine=args.refine,
                      preset=args.preset, config=args.config, student=args.student,
                      base=args.base, weights=args.weights, params=_method_params(args.param),
                      seed=args.seed, bn_reset=args.bn_reset, in_memory=args.in_memory,
                      spec=_model_spec(args), report=args.report, grid=args.grid)
    print(f"merged {len(out.inputs)} models with {out.method}"
          f"{' + DMM' if out.refine == 'dmm' else ''} in {out.seconds:.1f} s -> {out.path}")
    if out.report is not None:
        print(f"  teachers: {out.report.teachers}; report: {out.report_path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from dmm.jobs import inspect

    out = inspect(args.inputs, student=args.student, beta=args.beta, tau=args.tau,
                  chart=args.chart, spec=_model_spec(args))
    print(out.table())
    print(f"chart: {out.chart}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dmm.bench.program import bench

    overrides = {name: getattr(args, name) for name in ("dataset", "data_root", "alphas",
                 "seeds", "rows", "rounds", "width", "device") if getattr(args, name) is not None}
    for pair in args.set:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise DMMError(f"--set must be KEY=VALUE with a bench setting as KEY, got {pair!r}")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    out = bench(args.preset, overrides=overrides, out=args.out, cache_dir=args.cache_dir,
                render_only=args.render_only, readme=args.readme, report=print)
    if out.seconds is not None:
        print(f"bench finished in {out.seconds:.0f} s of wall time")
    print("\n" + out.table)
    print("wrote " + ", ".join(str(p) for p in out.paths.values()))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from dmm.jobs import convert

    try:
        kwargs = json.loads(args.arch_kwargs)
    except json.JSONDecodeError as e:
        raise DMMError(f"--arch-kwargs is not JSON ({e})") from e
    ck = convert(args.input, args.out, arch=args.arch, arch_kwargs=kwargs,
                 n_samples=args.n_samples)
    print(f"{args.input} -> {args.out} ({len(ck.state)} tensors, {args.arch})")
    return 0


_COMMANDS = {"demo": cmd_demo, "train": cmd_train, "evaluate": cmd_evaluate,
             "merge": cmd_merge, "inspect": cmd_inspect, "bench": cmd_bench,
             "convert": cmd_convert}

if __name__ == "__main__":
    sys.exit(main())
