"""Tables (markdown, mean +- sample std over seeds), CSV and plots from bench records.

Everything here reads only the records of `cells.jsonl`, so README tables are regenerated from
committed result files (`dmm bench --render-only`), never typed in.
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from dmm.bench.registry import ROWS, ablation_rows, rows_in
from dmm.bench.spec import BenchSpec
from dmm.errors import DMMError
from dmm.io import save_with, write_text


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else 0.0)


def fmt_pct(values: list[float], of: int | None = None) -> str:
    """Mean ± sample std in %; `of` the seeds the table covers: a cell with fewer says so."""
    if not values:
        return "–"
    m, s = mean_std(values)
    text = f"{100 * m:.2f} ± {100 * s:.2f}" if len(values) > 1 else f"{100 * m:.2f}"
    return text + (f" ({len(values)} of {of} seeds)" if of and len(values) < of else "")


def collect(records: list[dict], field: str = "accuracy") -> dict[tuple, list[float]]:
    """(row, alpha, k) -> values of `field` over seeds, in seed order."""
    out: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        v = r.get(field)
        if v is not None:
            out[(r["row"], r["alpha"], r["k"])].append((r["seed"], float(v)))
    return {key: [v for _, v in sorted(vals)] for key, vals in out.items()}


def _table(records: list[dict], rows: list[str], alphas: list[float], k: int,
           field: str = "accuracy", n: int | None = None) -> list[str]:
    """One markdown table; `n` the seeds it covers (cells over fewer say so)."""
    acc = collect(records, field)
    present = [r for r in rows if any((r, a, k) in acc for a in alphas)]
    lines = ["| method | " + " | ".join(f"α = {a}" for a in alphas) + " |",
             "|---|" + "---|" * len(alphas)]
    for r in present:
        lines.append(f"| {ROWS[r].pretty_name} | " + " | ".join(fmt_pct(acc.get((r, a, k), []), n)
                                                       for a in alphas) + " |")
    return lines if present else []


def seeds_of(records: list[dict]) -> list[int]:
    return sorted({r["seed"] for r in records})


def render_markdown(records: list[dict], spec: BenchSpec) -> str:
    if not records:
        raise DMMError("no bench results to render")
    alphas = sorted({r["alpha"] for r in records if r["k"] == spec.clients}, reverse=True)
    seeds = seeds_of(records)
    out = [f"Test accuracy (%) on {spec.dataset}, {spec.arch} width {spec.width}, "
           f"K = {spec.clients} clients, Dirichlet α, mean ± sample std over seeds {seeds}; "
           f"{spec.rounds} rounds x {spec.local_iters} local iterations, batch "
           f"{spec.batch_size}." + (f" The oracle: {spec.oracle_epochs} epochs over all "
                                    f"client data, batch {spec.batch_size}."
                                    if any(r["row"] == "oracle" for r in records) else ""), ""]
    main = rows_in("table1", "reference")
    w0 = _table(records, rows_in("w0"), alphas, spec.clients, n=len(seeds))
    out += ["**Table 1 rows and references" + (", from scratch (one shared random init: "
                                               "disconnected modes)**" if w0 else "**"), ""]
    out += _table(records, main, alphas, spec.clients, n=len(seeds))
    if w0:
        out += ["", f"**From a pretrained start W_0** (trained centrally on a public slice of "
                    f"{spec.public_slice} training samples that no client holds, "
                    f"{spec.pretrain_epochs} epochs; the clients fine-tune W_0; task vectors "
                    f"against W_0; BN statistics reset data-free after every merge)", ""] + w0
    abl = _table(records, ablation_rows(), alphas, spec.clients, n=len(seeds))
    if any(ROWS[r["row"]].section == "ablation" for r in records):
        out += ["", "**Ablations** (+ DMM = the default preset: the clients' own-statistics "
                    "inversion, then routed KD into the whole network where the teacher check "
                    "finds shared knowledge, else the head-only refinement (image + text: no "
                    "check, `check_pairs`); head only = preset "
                    "`head`, the default before issue 13; full DMM = the paper preset, with "
                    "selective KD)", ""] + abl
    rare = _table(records, main + rows_in("w0"), alphas, spec.clients, "rare_class_accuracy",
                  len(seeds))
    if rare:
        out += ["", "**Rare-class accuracy** (classes with >= 90% of their samples on one "
                    "client; – where no class is rare)", ""] + rare
    ks = sorted({r["k"] for r in records})
    if len(ks) > 1:
        acc = collect(records)
        kalphas = sorted({r["alpha"] for r in records if r["k"] != spec.clients}, reverse=True)
        for a in kalphas:
            out += ["", f"**Number of clients K** (α = {a})", "",
                    "| method | " + " | ".join(f"K = {k}" for k in ks) + " |",
                    "|---|" + "---|" * len(ks)]
            for r in spec.k_rows:
                out.append(f"| {ROWS[r].pretty_name} | " + " | ".join(
                    fmt_pct(acc.get((r, a, k), []), len(seeds)) for k in ks) + " |")
    out += ["", "**Wall time** (s, mean over cells; training is shared by the rows that "
                "consume the same models)", "",
            "| method | training it consumes | own work (merge / refine / distill) |",
            "|---|---|---|"]
    by_row: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_row[r["row"]].append(r)
    for name in ROWS:
        if name in by_row:
            rs = by_row[name]
            out.append(f"| {ROWS[name].pretty_name} | "
                       f"{np.mean([x['train_s'] for x in rs]):.0f} | "
                       f"{np.mean([own_seconds(x) for x in rs]):.1f} |")
    return "\n".join(out) + "\n"


def own_seconds(r: dict) -> float:
    """A row's own work as if it ran alone. DMM rows: the merge they refine plus the refinement
    with its synthesis (records from before this was recorded as row_s are read the same way)."""
    if "refine_s" in r:
        return float(r.get("merge_s", 0.0)) + float(r["refine_s"])
    return float(r["row_s"])


def render_csv(records: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "alpha", "k", "seed", "row", "method", "accuracy",
                "rare_class_accuracy", "train_s", "own_s", "commit", "key"])
    for r in sorted(records, key=lambda r: (-r["alpha"], r["k"], r["row"], r["seed"])):
        w.writerow([r["dataset"], r["alpha"], r["k"], r["seed"], r["row"],
                    ROWS[r["row"]].pretty_name,
                    f"{r['accuracy']:.6f}",
                    "" if r.get("rare_class_accuracy") is None
                    else f"{r['rare_class_accuracy']:.6f}",
                    f"{r['train_s']:.2f}", f"{own_seconds(r):.2f}",
                    r.get("provenance", {}).get("commit"), r["key"]])
    return buf.getvalue()


def plot_accuracy_vs_alpha(records: list[dict], spec: BenchSpec, path: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = collect(records)
    alphas = sorted({r["alpha"] for r in records if r["k"] == spec.clients})
    if len(alphas) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows_in("table1", "reference"):
        pts = [(a, mean_std(acc[(r, a, spec.clients)])) for a in alphas
               if (r, a, spec.clients) in acc]
        if len(pts) < 2:
            continue
        xs = [p[0] for p in pts]
        ms = np.array([100 * p[1][0] for p in pts])
        ss = np.array([100 * p[1][1] for p in pts])
        style = "--" if ROWS[r].section == "reference" else "-"
        ax.errorbar(xs, ms, yerr=ss, label=ROWS[r].pretty_name, linestyle=style, marker="o",
                    capsize=3, linewidth=2.2 if "dmm" in r else 1.2)
    ax.set_xscale("log")
    ax.set_xlabel("Dirichlet α (smaller = more divergent clients)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{spec.dataset}: accuracy against α (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def plot_divergence(records: list[dict], spec: BenchSpec, path: Path) -> Path | None:
    """Combined divergence score of every FedAvg client per alpha (first seed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = sorted((r for r in records if r["row"] == "fedavg+dmm" and r["k"] == spec.clients
                   and r.get("divergence") and r["seed"] == min(seeds_of(records))),
                  key=lambda r: -r["alpha"])
    if not recs:
        return None
    fig, axes = plt.subplots(1, len(recs), figsize=(3.2 * len(recs), 3), squeeze=False)
    for ax, r in zip(axes[0], recs, strict=True):
        d = r["divergence"]
        ax.bar(range(len(d["score"])), d["score"],
               color=["tab:red" if i in d["selected"] else "tab:gray"
                      for i in range(len(d["score"]))])
        ax.set_title(f"α = {r['alpha']}", fontsize=9)
        ax.set_xlabel("client")
    axes[0][0].set_ylabel("divergence score (z)")
    fig.suptitle("FedAvg clients' divergence from the merged model (red: selected teachers)",
                 fontsize=9)
    fig.tight_layout()
    save_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def write_outputs(records: list[dict], spec: BenchSpec, out_dir: Path) -> dict[str, Path]:
    out = {"table": out_dir / "table.md", "csv": out_dir / "results.csv"}
    write_text(out["table"], render_markdown(records, spec))
    write_text(out["csv"], render_csv(records))
    for name, fn in (("accuracy_plot", plot_accuracy_vs_alpha),
                     ("divergence_plot", plot_divergence)):
        p = fn(records, spec, out_dir / f"{name.replace('_plot', '')}.png")
        if p is not None:
            out[name] = p
    return out


def _section(readme: Path, name: str) -> tuple[str, re.Pattern, str, str]:
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DMMError(f"cannot read {readme}: {e}") from e
    start, end = f"<!-- dmm-bench:{name} -->", f"<!-- /dmm-bench:{name} -->"
    pat = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pat.search(text):
        raise DMMError(f"{readme}: no section {start} ... {end} to fill")
    return text, pat, start, end


def check_readme(readme: Path, name: str) -> None:
    """Raise DMMError unless `readme` is readable and has the section `name`."""
    _section(readme, name)


def update_readme(readme: Path, name: str, body: str) -> None:
    """Replace the text between `<!-- dmm-bench:NAME -->` and `<!-- /dmm-bench:NAME -->`."""
    text, pat, start, end = _section(readme, name)
    write_text(readme, pat.sub(lambda _: f"{start}\n{body.rstrip()}\n{end}", text))
