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
    p.add_argument("--preset", default="default", help="DMM preset: default | paper")
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

def _load_data(args):
    from dmm.data import load_dataset
    return load_dataset(args.dataset, args.data_root, n_train=args.n_train, n_test=args.n_test)


def cmd_train(args: argparse.Namespace) -> int:
    from dmm import checkpoint
    from dmm.data import dirichlet_partition
    from dmm.evaluate import evaluate
    from dmm.federated import FederatedConfig, TrainConfig, run_federated
    from dmm.io import ensure_writable_dir, provenance, write_json
    from dmm.models import create

    if not args.alpha > 0:
        raise DMMError(f"--alpha must be > 0, got {args.alpha}")
    if args.clients < 1:
        raise DMMError(f"--clients must be >= 1, got {args.clients}")
    if args.min_size < 1:
        raise DMMError(f"--min-size must be >= 1 (a client without samples cannot train), "
                       f"got {args.min_size}")
    train_cfg = TrainConfig(
        lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        local_iters=None if args.local_epochs else args.local_iters,
        local_epochs=args.local_epochs or 1,
        prox_mu=args.mu if args.regime == "fedprox" else 0.0, bf16=not args.fp32)
    cfg = FederatedConfig(regime=args.regime, rounds=args.rounds,
                          participation=args.participation, seed=args.seed, train=train_cfg,
                          oneshot_init=args.oneshot_init)
    cfg.validate()
    out = ensure_writable_dir(args.out)
    if args.engine == "flower":  # loaded once: the engine's server side reuses it
        from dmm.flower import require_flower
        require_flower()
        from dmm.flower.client import cached_dataset
        data = cached_dataset(args.dataset, args.data_root, args.n_train, args.n_test)
    else:
        data = _load_data(args)
    arch_kwargs = {"num_classes": data.num_classes, "in_channels": data.in_channels}
    if ":" not in args.arch:
        arch_kwargs["width"] = args.width
    create(args.arch, **arch_kwargs)  # fail fast on a bad architecture, before any training
    part = dirichlet_partition(data.y_train.numpy(), args.clients, args.alpha, seed=args.seed,
                               min_size=args.min_size, num_classes=data.num_classes)
    if args.engine == "flower":
        import torch

        from dmm.flower.client import ClientTask
        from dmm.flower.simulation import run_flower
        task = ClientTask(dataset=args.dataset, arch=args.arch, arch_kwargs=arch_kwargs,
                          federated=cfg.to_dict(), alpha=args.alpha, clients=args.clients,
                          min_size=args.min_size, data_root=args.data_root,
                          n_train=args.n_train, n_test=args.n_test,
                          threads=torch.get_num_threads())
        res, _ = run_flower(task, cpus_per_client=args.cpus_per_client, verbose=args.verbose)
    else:
        res = run_federated(lambda: create(args.arch, **arch_kwargs), data, part, cfg)

    meta = checkpoint.data_meta(args.arch, arch_kwargs, data, args.dataset)
    checkpoint.save(out / "init.safetensors", res.init_state, **meta, n_samples=0)
    for k, state in enumerate(res.client_states):
        checkpoint.save(out / f"client_{k:03d}.safetensors", state, **meta,
                        n_samples=res.n_samples[k], client_id=k)
    rows = []
    if res.global_state is not None:
        checkpoint.save(out / "global.safetensors", res.global_state, **meta,
                        n_samples=int(sum(res.n_samples)), regime=args.regime)
        if not args.no_eval:
            model = create(args.arch, **arch_kwargs)
            model.load_state_dict(res.global_state)
            ev = evaluate(model, data.x_test, data.y_test, data.normalize,
                          num_classes=data.num_classes)
            rows.append({"model": "global", "accuracy": ev.accuracy, "loss": ev.loss,
                         "per_class": ev.per_class})
    write_json(out / "partition.json", part.to_dict())
    write_json(out / "train.json", {
        "config": {**cfg.to_dict(), "engine": args.engine, "dataset": args.dataset,
                   "arch": args.arch,
                   "arch_kwargs": arch_kwargs, "alpha": args.alpha, "clients": args.clients,
                   "min_size": args.min_size},
        "wall_time_s": res.wall_time, "history": res.history, "eval": rows,
        "provenance": provenance()})
    print(f"{args.regime}: {args.clients} clients, alpha {args.alpha}, "
          f"{res.wall_time:.1f} s; wrote {out}")
    for r in rows:
        print(f"  {r['model']}: accuracy {100 * r['accuracy']:.2f}%  loss {r['loss']:.4f}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dmm import checkpoint
    from dmm.evaluate import evaluate
    from dmm.io import write_json

    ckpts = checkpoint.resolve_inputs(args.checkpoints)
    data = _load_data(args)
    rows = []
    from dmm.validate import validate_checkpoint
    for ck in ckpts:  # all checked before the first evaluation
        validate_checkpoint(ck, num_classes=data.num_classes)
    for ck in ckpts:
        ev = evaluate(ck.build(), data.x_test, data.y_test, data.normalize,
                      num_classes=data.num_classes)
        rows.append({"checkpoint": str(ck.path), **ev.to_dict()})
    width = max(len(r["checkpoint"]) for r in rows)
    print(f"{'checkpoint':<{width}}  accuracy     loss")
    for r in rows:
        print(f"{r['checkpoint']:<{width}}  {100 * r['accuracy']:7.2f}%  {r['loss']:7.4f}")
    if args.json:
        write_json(args.json, {"dataset": args.dataset, "results": rows})
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

def _load_group(inputs: list[str], reference=None):
    """Checkpoints of one architecture (that of `reference` if given), validated
    (`dmm.validate`: keys, shapes, dtypes, finite values) before anything is built."""
    from dmm import checkpoint
    from dmm.validate import validate_group

    ckpts = checkpoint.resolve_inputs(inputs)
    validate_group(ckpts, reference=reference)
    return ckpts, [ck.build() for ck in ckpts]


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
        ckpts, modules = _load_group(args.inputs)
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
    method_params = _method_params(args.param)
    method_params.update(seed=args.seed, input_shape=kwargs["input_shape"])
    if args.bn_reset:
        method_params.update(bn_reset=True, pixel_range=_pixel_range(meta))
    base = None
    if args.base:
        base_ck, base_mod = _load_group([args.base], reference=ckpts[0])
        base = base_mod[0].state_dict()
    t0 = time.perf_counter()
    if stream:
        model = merge_states([ck.state for ck in ckpts], args.method, model=template,
                             weights=weights, base=base, **method_params)
        report = None
    elif args.student:
        student_ck, student = _load_group([args.student], reference=ckpts[0])
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
    from dmm.divergence import divergence_scores
    from dmm.io import save_with
    from dmm.merging import merge_states
    from dmm.statedict import state_of

    ckpts, modules = _load_group(args.inputs)
    states = [state_of(m) for m in modules]
    if args.student:
        merged = state_of(_load_group([args.student])[1][0])
    else:
        w = [ck.meta.get("n_samples") or 1 for ck in ckpts]
        merged = merge_states(states, "average", model=modules[0], weights=w)
    rep = divergence_scores(states, merged, modules[0], beta=args.beta, tau=args.tau)
    names = [Path(c.path).stem for c in ckpts]
    print(rep.table(names))
    chart = Path(args.chart) if args.chart else Path(ckpts[0].path).parent / "divergence.png"

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(names) + 2), 3))
    colors = ["tab:red" if i in rep.selected else "tab:gray" for i in range(len(names))]
    ax.bar(range(len(names)), rep.score, color=colors)
    ax.axhline(args.tau, color="k", lw=0.8, ls="--", label=f"tau = {args.tau}")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("divergence score d_k")
    ax.set_title("divergent teachers in red")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_with(chart, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    print(f"chart: {chart}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dmm.bench import BenchSpec, ResultStore, get_preset, run_bench, write_outputs
    from dmm.bench.report import check_readme, render_markdown, update_readme
    from dmm.io import ensure_writable_dir, write_json

    overrides: dict = {}
    for name in ("dataset", "data_root", "alphas", "seeds", "rows", "rounds", "width", "device"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    for pair in args.set:
        key, sep, raw = pair.partition("=")
        if not sep or key not in BenchSpec.__dataclass_fields__:
            raise DMMError(f"--set must be KEY=VALUE with a bench setting as KEY, got {pair!r}")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    spec = get_preset(args.preset, **overrides)
    spec.validate()
    out = Path(args.out or f"benchmarks/results/{spec.dataset}-{args.preset}")
    section = f"{spec.dataset}-{args.preset}"
    if args.readme:  # a bad README path fails now, not after hours of work
        check_readme(Path(args.readme), section)
    if args.render_only:
        store = ResultStore(out / "cells.jsonl")
        if not len(store):
            raise DMMError(f"{out / 'cells.jsonl'}: no results to render")
    else:
        from dmm.bench.runner import load_bench_data, preflight
        data = load_bench_data(spec)  # a missing or malformed data set fails before any output
        preflight(spec, data)         # so does a split that cannot be drawn
        ensure_writable_dir(out)
        ensure_writable_dir(args.cache_dir)
        write_json(out / "spec.json", {"preset": args.preset, "spec": spec.to_dict()})
        t0 = time.perf_counter()
        store = run_bench(spec, out, args.cache_dir, data=data)
        print(f"bench finished in {time.perf_counter() - t0:.0f} s of wall time")
    wanted = {spec.cell_key(c) for c in spec.cells()}
    records = [r for k, r in store.records.items() if k in wanted]
    if not records:
        raise DMMError(f"{out / 'cells.jsonl'} holds no cell of this preset and settings")
    paths = write_outputs(records, spec, out)
    table = render_markdown(records, spec)
    print("\n" + table)
    if args.readme:
        update_readme(Path(args.readme), section, table)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from dmm import checkpoint
    from dmm.validate import validate_checkpoint

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise DMMError(f"--out must end in .safetensors, got {out}")
    try:
        kwargs = json.loads(args.arch_kwargs)
    except json.JSONDecodeError as e:
        raise DMMError(f"--arch-kwargs is not JSON ({e})") from e
    if not isinstance(kwargs, dict):
        raise DMMError("--arch-kwargs must be a JSON object")
    meta = {"arch": args.arch, "arch_kwargs": kwargs}
    if args.n_samples:
        meta["n_samples"] = args.n_samples
    ck = checkpoint.import_pt(args.input, **meta)
    validate_checkpoint(ck)
    checkpoint.save(out, ck.state, **meta, source=str(args.input))
    print(f"{args.input} -> {out} ({len(ck.state)} tensors, {args.arch})")
    return 0


_COMMANDS = {"demo": cmd_demo, "train": cmd_train, "evaluate": cmd_evaluate,
             "merge": cmd_merge, "inspect": cmd_inspect, "bench": cmd_bench,
             "convert": cmd_convert}

if __name__ == "__main__":
    sys.exit(main())
