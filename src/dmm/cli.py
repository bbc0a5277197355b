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

    p = sub.add_parser("evaluate", help="evaluate checkpoints on a data set's test split")
    p.add_argument("checkpoints", nargs="+", help="checkpoint files or folders of client_*")
    _add_data_args(p)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")

    p = sub.add_parser("merge", help="merge client checkpoints, optionally refine with DMM")
    p.add_argument("inputs", nargs="+", help="checkpoint files and/or folders of client_*")
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
    p.add_argument("--out", required=True, help="merged checkpoint (.safetensors)")
    p.add_argument("--report", default=None, help="JSON report (default: beside --out)")
    p.add_argument("--grid", default=None, help="PNG grid of the pseudo-data (default: beside)")

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

    p = sub.add_parser("convert", help="a PyTorch .pt state dict -> a dmm checkpoint (loaded "
                       "with weights_only=True: no code runs; checked against --arch)")
    p.add_argument("input", help="a .pt/.pth file holding a state dict (or {'state_dict': ...})")
    p.add_argument("--arch", required=True, help="resnet18 | resnet8 | package.module:Class")
    p.add_argument("--arch-kwargs", default="{}",
                   help='JSON keyword arguments, e.g. \'{"width": 0.25, "num_classes": 10}\'')
    p.add_argument("--n-samples", type=_positive_int("--n-samples"), default=None,
                   help="the number of training samples behind the model (merge weights)")
    p.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")

    p = sub.add_parser("inspect", help="divergence table of client models against a merge")
    p.add_argument("inputs", nargs="+", help="checkpoint files and/or folders of client_*")
    p.add_argument("--student", default=None, help="merged model to compare against "
                   "(default: the sample-weighted average of the inputs)")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--tau", type=float, default=0.0)
    p.add_argument("--chart", default=None, help="bar chart PNG (default: divergence.png "
                   "in the first input's folder)")
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
    job = TrainJob(_data_config(args), part, fed, arch=args.arch, width=args.width,
                   engine=args.engine, cpus_per_client=args.cpus_per_client,
                   evaluate=not args.no_eval)
    out = train(job, args.out, verbose=args.verbose)
    print(f"{args.regime}: {args.clients} clients, alpha {args.alpha}, "
          f"{out.result.wall_time:.1f} s; wrote {out.out}")
    for r in out.eval:
        print(f"  {r['model']}: accuracy {100 * r['accuracy']:.2f}%  loss {r['loss']:.4f}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dmm.jobs import evaluate

    rows = evaluate(args.checkpoints, _data_config(args), json_path=args.json)
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

def _pixel_range(meta: dict) -> tuple[float, float] | None:
    from dmm.data.base import pixel_range

    if "input_mean" not in meta:
        return None
    return pixel_range(meta["input_mean"], meta["input_std"])


def _method_params(pairs: list[str]) -> dict:
    """--param KEY=VALUE pairs parsed as JSON values where possible, checked by the registry
    (merge_states names the method and its parameters in the error)."""
    from dmm.merging.registry import PROVIDED

    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise DMMError(f"--param must look like KEY=VALUE, got {pair!r}")
        if key in PROVIDED:
            raise DMMError(f"--param {key}: set by dmm merge itself"
                           + (" (use --seed)" if key == "seed" else ""))
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def cmd_merge(args: argparse.Namespace) -> int:
    from dmm import checkpoint
    from dmm.io import provenance, write_json
    from dmm.jobs import load_group
    from dmm.pipeline import merge_and_refine, preset, refine, with_overrides
    from dmm.synth import save_grid

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise DMMError(f"--out must end in .safetensors, got {out}")
    from dmm.merging import get_method, merge_states
    stream = (args.refine == "none" and args.student is None and not args.bn_reset
              and not args.in_memory and get_method(args.method).streams)
    if stream:  # tensors stay in the files until the merge reads them, key by key
        from dmm.validate import validate_group
        ckpts = checkpoint.resolve_inputs(args.inputs, lazy=True)
        validate_group(ckpts)
        modules = []
        template = ckpts[0].new_model()
    else:
        ckpts, modules = load_group(args.inputs)
    if args.refine == "dmm" and len(modules) < 2 and args.student is None:
        raise DMMError("DMM needs at least two models to merge (or --student and a teacher)")
    cfg = preset(args.preset)
    if args.config:
        try:
            overrides = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DMMError(f"{args.config}: cannot read JSON config ({e})") from e
        cfg = with_overrides(cfg, overrides, args.config)
    cfg.seed = args.seed
    n_samples = [ck.meta.get("n_samples") for ck in ckpts]
    if args.weights == "samples" and any(not isinstance(n, int) or n <= 0 for n in n_samples):
        bad = next(ck.path for ck, n in zip(ckpts, n_samples, strict=True)
                   if not isinstance(n, int) or n <= 0)
        raise DMMError(f"{bad}: no positive n_samples in its metadata; use --weights uniform")
    weights = n_samples if args.weights == "samples" else [1] * len(ckpts)
    meta = ckpts[0].meta
    kwargs = dict(n_samples=weights, input_shape=tuple(meta["input_size"])
                  if "input_size" in meta else None, pixel_range=_pixel_range(meta),
                  progress=True)
    counts = [ck.label_counts for ck in ckpts]
    if all(c is not None for c in counts):  # the clients' label histograms (dmm train's)
        kwargs["label_counts"] = counts
    method_params = _method_params(args.param)
    method_params.update(seed=args.seed, input_shape=kwargs["input_shape"])
    if args.bn_reset:
        method_params.update(bn_reset=True, pixel_range=_pixel_range(meta))
    base = None
    if args.base:
        base_ck, base_mod = load_group([args.base], reference=ckpts[0])
        base = base_mod[0].state_dict()
    t0 = time.perf_counter()
    if stream:
        model = merge_states([ck.state for ck in ckpts], args.method, model=template,
                             weights=weights, base=base, **method_params)
        report = None
    elif args.student:
        student_ck, student = load_group([args.student], reference=ckpts[0])
        if args.refine == "dmm":
            model, report = refine(student[0], modules, cfg, **kwargs)
        else:
            model, report = student[0], None
    else:
        model, report = merge_and_refine(modules, cfg, method=args.method, weights=weights,
                                         base=base, method_params=method_params,
                                         refine_model=args.refine == "dmm", **kwargs)
    seconds = time.perf_counter() - t0
    report_path = Path(args.report) if args.report else out.with_suffix(".json")
    pseudo = report.pseudo if report is not None else None
    checkpoint.save(out, model, **{**meta, "client_id": None,
                                   "n_samples": int(sum(weights)),
                                   "merge": {"method": args.method, "refine": args.refine,
                                             "inputs": [str(c.path) for c in ckpts],
                                             "streamed": stream}})
    if pseudo is not None:
        grid = Path(args.grid) if args.grid else out.with_name(out.stem + "_pseudo.png")
        save_grid(pseudo.images, pseudo.labels, grid, mean=tuple(meta.get("input_mean", [0.0])),
                  std=tuple(meta.get("input_std", [1.0])), class_names=meta.get("classes"))
    write_json(report_path, {
        "method": args.method, "refine": args.refine, "preset": args.preset,
        "inputs": [str(c.path) for c in ckpts], "student": args.student,
        "weights": weights, "wall_time_s": seconds,
        "report": report.to_dict() if report else None, "provenance": provenance()})
    print(f"merged {len(ckpts)} models with {args.method}"
          f"{' + DMM' if args.refine == 'dmm' else ''} in {seconds:.1f} s -> {out}")
    if report is not None:
        print(f"  teachers: {report.teachers}; report: {report_path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from dmm.jobs import inspect

    out = inspect(args.inputs, student=args.student, beta=args.beta, tau=args.tau,
                  chart=args.chart)
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
