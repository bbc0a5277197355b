"""`dmm bench`: cache keys, the durable cell store, resume after SIGKILL, the table renderer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import expect_cli_error, run_cli, write_npz
from dmm.bench import BenchSpec, Cell, ResultStore, render_csv, render_markdown
from dmm.bench.report import mean_std, update_readme
from dmm.errors import DMMError

TINY = ["--dataset", "npz", "--alphas", "0.5", "--seeds", "0", "--set", "arch=\"resnet8\"",
        "--set", "clients=3", "--set", "local_iters=2", "--set", "batch_size=16", "--rounds", "1",
        "--set", "inversion_images=8", "--set", "inversion_iters=2", "--set", "distill_steps=2",
        "--set", "compile=false", "--set", "dense_budget_scale=0.01"]


# ---- cache keys -------------------------------------------------------------------------------

def test_cell_key_changes_with_every_setting_that_affects_the_cell():
    spec = BenchSpec()
    dmm_cell = Cell(0.1, 10, 0, "fedavg+dmm")
    base = spec.cell_key(dmm_cell)
    changes = {"dataset": "cifar10", "n_train": 1000, "n_test": 500, "arch": "resnet8",
               "width": 0.5, "rounds": 11, "local_iters": 3, "batch_size": 64, "lr": 0.1,
               "min_size": 5, "inversion_images": 128, "inversion_iters": 10,
               "distill_steps": 7, "compile": False}
    for name, value in changes.items():
        assert replace(spec, **{name: value}).cell_key(dmm_cell) != base, name
    for other in (Cell(0.5, 10, 0, "fedavg+dmm"), Cell(0.1, 5, 0, "fedavg+dmm"),
                  Cell(0.1, 10, 1, "fedavg+dmm"), Cell(0.1, 10, 0, "fedavg+buffer")):
        assert spec.cell_key(other) != base, other
    # FedProx's mu reaches FedProx cells only; DENSE's budget reaches DENSE only
    prox = Cell(0.1, 10, 0, "fedprox")
    assert replace(spec, mu=0.1).cell_key(prox) != spec.cell_key(prox)
    assert replace(spec, mu=0.1).cell_key(dmm_cell) == base
    dense = Cell(0.1, 10, 0, "dense")
    assert replace(spec, dense_budget_scale=2.0).cell_key(dense) != spec.cell_key(dense)
    assert replace(spec, dense_budget_scale=2.0).cell_key(dmm_cell) == base


def test_oracle_cells_differ_per_split_but_share_the_model():
    spec = BenchSpec()
    keys = {spec.cell_key(Cell(a, 10, 0, "central")) for a in (0.5, 0.1, 0.01)}
    assert len(keys) == 3   # rare classes come from the split, so the records differ
    # data root and device enter the keys only when set (default cells keep theirs)
    cell = Cell(0.1, 10, 0, "fedavg")
    assert replace(spec, data_root="/data/a.npz").cell_key(cell) != spec.cell_key(cell)
    assert replace(spec, device="cuda").cell_key(cell) != spec.cell_key(cell)
    assert len(BenchSpec(alphas=[0.1, 0.1], seeds=[0, 0], rows=["fedavg"]).cells()) == 1


def test_the_oracle_budget_is_part_of_its_cache_key():
    """The converged oracle is keyed by its epochs, not by FedAvg's rounds; the reference at
    FedAvg's compute the other way round; neither depends on the split."""
    spec = BenchSpec()
    oracle, central = Cell(0.1, 10, 0, "oracle"), Cell(0.1, 10, 0, "central")
    more = replace(spec, oracle_epochs=spec.oracle_epochs + 1)
    assert more.cell_key(oracle) != spec.cell_key(oracle)
    assert more.cell_key(central) == spec.cell_key(central)
    assert more.cell_key(Cell(0.1, 10, 0, "fedavg")) == spec.cell_key(Cell(0.1, 10, 0, "fedavg"))
    longer = replace(spec, rounds=spec.rounds + 1)
    assert longer.cell_key(oracle) == spec.cell_key(oracle)
    assert longer.cell_key(central) != spec.cell_key(central)
    settings = spec.train_settings("oracle", 0.1, 10, 0)
    assert settings["epochs"] == spec.oracle_epochs and "rounds" not in settings
    assert settings == spec.train_settings("oracle", 0.5, 5, 0)
    with pytest.raises(DMMError, match="oracle_epochs must be >= 1"):
        BenchSpec(oracle_epochs=0).validate()


def test_rows_from_w0_fine_tune_one_pretrained_start_end_to_end(tmp_path):
    """W_0 trains on the public slice only; the one-shot and FedAvg clients of the W_0 rows
    start from it (their init checkpoint is W_0, so task vectors are taken against it); the
    report has the W_0 table beside the one from scratch."""
    import torch
    from safetensors.torch import load_file

    # Prepare
    data = write_npz(tmp_path / "tiny.npz")
    out, cache = tmp_path / "res", tmp_path / "cache"
    rows = ["fedavg", "pretrain", "fedavg@w0", "average@w0", "task_arithmetic@w0",
            "fedavg+dmm@w0", "ensemble@w0"]
    # Execute
    r = run_cli("bench", *TINY, "--data-root", data, "--out", out, "--cache-dir", cache,
                "--rows", *rows, "--set", "public_slice=30", "--set", "pretrain_epochs=2",
                cwd=tmp_path)
    # Assert
    assert r.returncode == 0, r.stderr
    entries = {p.name.split("_a")[0]: p for p in (cache / "npz").iterdir()}
    assert sorted(entries) == ["fedavg", "fedavg_w0", "oneshot_w0", "pretrain"]
    meta = json.loads((entries["pretrain"] / "meta.json").read_text())
    assert meta["n_samples"] == [30] and meta["settings"]["epochs"] == 2
    w0 = load_file(entries["pretrain"] / "global.safetensors")
    scratch_init = load_file(entries["fedavg"] / "init.safetensors")
    for regime in ("fedavg_w0", "oneshot_w0"):
        init = load_file(entries[regime] / "init.safetensors")
        assert all(torch.equal(init[k], w0[k]) for k in w0), regime
        # the clients split what the slice leaves (120 - 30 samples)
        assert sum(json.loads((entries[regime] / "meta.json").read_text())["n_samples"]) == 90
    assert not all(torch.equal(scratch_init[k], w0[k]) for k in w0)
    recs = [json.loads(x) for x in (out / "cells.jsonl").read_text().splitlines()]
    assert sorted(x["row"] for x in recs) == sorted(rows)
    table = (out / "table.md").read_text()
    assert "from scratch (one shared random init: disconnected modes)" in table
    assert "**From a pretrained start W_0** (trained centrally on a public slice of 30" in table
    assert "| Task arithmetic (lambda 0.3), from W_0 |" in table
    # without the slice, a W_0 row is one line and no output
    r = run_cli("bench", *TINY, "--data-root", data, "--out", tmp_path / "none",
                "--cache-dir", cache, "--rows", "average@w0", cwd=tmp_path)
    assert r.returncode == 2 and "public_slice" in r.stderr and not (tmp_path / "none").exists()


def test_the_oracle_trains_for_its_epochs_end_to_end(tmp_path):
    # Prepare
    data = write_npz(tmp_path / "tiny.npz")
    out, cache = tmp_path / "res", tmp_path / "cache"
    # Execute
    r = run_cli("bench", *TINY, "--data-root", data, "--out", out, "--cache-dir", cache,
                "--rows", "oracle", "central", "--set", "oracle_epochs=2", cwd=tmp_path)
    # Assert: two models, the oracle's cache entry says its budget, the table labels both
    assert r.returncode == 0, r.stderr
    metas = {p.name.split("_")[0]: json.loads((p / "meta.json").read_text())["settings"]
             for p in (cache / "npz").iterdir()}
    assert sorted(metas) == ["central", "oracle"]
    assert metas["oracle"]["epochs"] == 2 and "epochs" not in metas["central"]
    table = (out / "table.md").read_text()
    assert "| Centralized, all data, converged (oracle) |" in table
    assert "| Centralized at 1/K of FedAvg's compute" in table
    assert "The oracle: 2 epochs over all client data" in table


def test_rows_from_w0_are_keyed_by_the_start_and_need_a_public_slice():
    """A row from W_0 carries W_0's training in its key (slice and epochs); a public slice
    enters every cell's key only when set; rows from W_0 without a slice are one error."""
    spec = BenchSpec(public_slice=40)
    cell = Cell(0.1, 10, 0, "average@w0")
    settings = spec.cell_settings(cell)
    assert settings["train"]["regime"] == "oneshot_w0"
    assert settings["train"]["start"] == spec.train_settings("pretrain", 0.1, 10, 0)
    assert settings["train"]["start"]["public_slice"] == 40
    assert settings["row_config"]["bn_reset_after_merge"] is True
    assert replace(spec, pretrain_epochs=9).cell_key(cell) != spec.cell_key(cell)
    assert replace(spec, public_slice=41).cell_key(cell) != spec.cell_key(cell)
    scratch = Cell(0.1, 10, 0, "average")
    assert spec.cell_key(scratch) != BenchSpec().cell_key(scratch)   # the split changed
    assert "public_slice" not in BenchSpec().cell_settings(scratch)["train"]
    assert spec.train_settings("pretrain", 0.1, 10, 0) == spec.train_settings("pretrain", 0.5,
                                                                               5, 1) | {"seed": 0}
    with pytest.raises(DMMError, match="start from the pretrained W_0.*public_slice"):
        BenchSpec(rows=["fedavg", "fedavg@w0"]).validate()


def test_cell_key_ignores_the_rest_of_the_grid():
    spec = BenchSpec()
    cell = Cell(0.1, 10, 0, "cat+dmm")
    other = replace(spec, alphas=[0.1], seeds=[0, 5], rows=["cat+dmm"], k_values=[5, 20])
    assert other.cell_key(cell) == spec.cell_key(cell)
    # the oracle does not depend on the split
    central = Cell(0.1, 10, 0, "central")
    assert spec.cell_key(central) != spec.cell_key(Cell(0.1, 10, 1, "central"))
    assert spec.train_settings("central", 0.1, 10, 0) == spec.train_settings("central", 0.5, 5, 0)


def test_grid_has_the_k_ablation_and_rejects_unknown_rows():
    spec = BenchSpec(alphas=[0.1], seeds=[0], rows=["fedavg"], k_values=[5, 10],
                     k_alphas=[0.01])
    cells = spec.cells()
    assert Cell(0.1, 10, 0, "fedavg") in cells and Cell(0.01, 5, 0, "fedavg+dmm") in cells
    assert not any(c.k == 10 and c.alpha == 0.01 for c in cells)  # K = clients is the main grid
    with pytest.raises(DMMError, match="unknown bench row"):
        BenchSpec(rows=["fedavg", "nope"]).validate()


# ---- the store --------------------------------------------------------------------------------

def test_store_drops_a_torn_last_line_and_appends_cleanly(tmp_path):
    path = tmp_path / "cells.jsonl"
    s = ResultStore(path)
    s.append({"key": "a", "accuracy": 0.5})
    with open(path, "a") as f:
        f.write('{"key": "b", "accur')  # a run killed mid-write
    s2 = ResultStore(path)
    assert s2.dropped == 1 and "a" in s2 and "b" not in s2
    s2.append({"key": "c", "accuracy": 0.25})
    lines = path.read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["a", "c"]


# ---- the renderer -----------------------------------------------------------------------------

def _rec(row, alpha, seed, acc, k=10, rare=None):
    return {"key": f"{row}{alpha}{seed}{k}", "dataset": "fmnist", "row": row, "alpha": alpha,
            "k": k, "seed": seed, "accuracy": acc, "rare_class_accuracy": rare,
            "train_s": 10.0, "row_s": 2.0}


def test_table_mean_and_sample_std_from_known_rows():
    recs = [_rec("fedavg", 0.1, s, a) for s, a in enumerate([0.1, 0.2, 0.3])]
    recs += [_rec("fedavg+dmm", 0.1, s, a, rare=r)
             for s, (a, r) in enumerate([(0.5, 0.25), (0.7, 0.75)])]
    recs += [_rec("fedavg", 0.01, 0, 0.125)]
    md = render_markdown(recs, BenchSpec())
    # alphas descending: 0.1 then 0.01; a cell over fewer seeds than the table says how many
    assert "| FedAvg | 20.00 ± 10.00 | 12.50 (1 of 3 seeds) |" in md
    assert "| FedAvg + DMM | 60.00 ± 14.14 (2 of 3 seeds) | – |" in md
    assert "| FedAvg + DMM | 50.00 ± 35.36 (2 of 3 seeds) | – |" in md   # rare-class table
    assert mean_std([1.0]) == (1.0, 0.0)
    csv = render_csv(recs).splitlines()
    assert csv[0].startswith("dataset,alpha,k,seed,row") and len(csv) == 1 + len(recs)


def test_readme_section_is_replaced_only_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- dmm-bench:x -->\nold\n<!-- /dmm-bench:x -->\nbottom\n")
    update_readme(readme, "x", "| new |\n")
    assert readme.read_text() == "top\n<!-- dmm-bench:x -->\n| new |\n<!-- /dmm-bench:x -->" \
                                 "\nbottom\n"
    with pytest.raises(DMMError, match="no section"):
        update_readme(readme, "y", "z")


# ---- end to end: a run killed mid-grid resumes --------------------------------------------------

def test_bench_killed_mid_grid_resumes_without_recomputing(tmp_path):
    data = write_npz(tmp_path / "tiny.npz")
    out, cache = tmp_path / "res", tmp_path / "cache"
    args = ["bench", *TINY, "--data-root", data, "--out", out, "--cache-dir", cache,
            "--rows", "fedavg", "fedavg+buffer", "fedavg+dmm", "ensemble", "central", "dense",
            "rebasin"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "dmm.cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cells = out / "cells.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if cells.exists() and len(cells.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [json.loads(x) for x in cells.read_text().splitlines() if x.endswith("}")]
    assert 2 <= len(before) < 7
    assert not list(out.glob("table.md"))  # outputs appear only at the end

    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{len(before)} already done" in r.stdout
    after = [json.loads(x) for x in cells.read_text().splitlines()]
    assert len(after) == 7 and len({x["key"] for x in after}) == 7
    for old in before:  # finished cells kept as they were, not recomputed
        new = next(x for x in after if x["key"] == old["key"])
        assert new["run_id"] == old["run_id"] and new["accuracy"] == old["accuracy"]
    assert len({x["run_id"] for x in after}) == 2
    # the trained client models were cached once per regime and reused
    assert sorted(p.name.split("_")[0] for p in (cache / "npz").iterdir()) == \
        ["central", "fedavg", "oneshot"]
    assert "| FedAvg + DMM |" in (out / "table.md").read_text()
    assert (out / "results.csv").read_text().count("\n") == 8

    r = run_cli(*args, cwd=tmp_path)  # a third run has nothing to do
    assert r.returncode == 0 and "0 to run" in r.stdout
    r = run_cli("bench", *TINY, "--data-root", data, "--out", out, "--render-only",
                "--rows", "fedavg", "fedavg+dmm", cwd=tmp_path)
    assert r.returncode == 0 and "| FedAvg |" in r.stdout


def test_bench_bad_input_is_one_line_and_no_output(tmp_path):
    out = tmp_path / "res"
    expect_cli_error(run_cli("bench", "--rows", "fedavg", "bogus", "--out", out, cwd=tmp_path),
                     "unknown bench row", out)
    expect_cli_error(run_cli("bench", "--preset", "huge", "--out", out, cwd=tmp_path),
                     "unknown bench preset", out)
    expect_cli_error(run_cli("bench", "--dataset", "cifar10", "--data-root", tmp_path / "none",
                             "--out", out, "--cache-dir", tmp_path / "c", cwd=tmp_path),
                     "does not exist", out)
    assert not (tmp_path / "c").exists()
    expect_cli_error(run_cli("bench", "--set", "nonsense=1", "--out", out, cwd=tmp_path),
                     "--set", out)
    expect_cli_error(run_cli("bench", "--render-only", "--out", out, cwd=tmp_path),
                     "no results", out)
    for bad, needle in ((["--set", "alphas=0.5"], "alphas must be a list"),
                        (["--set", "clients=2.5"], "clients must be integer"),
                        (["--set", "device=null"], "device must be string"),
                        (["--rows"], "expected at least one"),
                        (["--readme", tmp_path / "nope.md"], "cannot read")):
        r = run_cli("bench", *bad, "--out", out, "--cache-dir", tmp_path / "c", cwd=tmp_path)
        if needle == "expected at least one":  # argparse's own usage error
            assert r.returncode == 2 and needle in r.stderr
            continue
        expect_cli_error(r, needle, out)
    data = write_npz(tmp_path / "tiny.npz")   # 120 samples cannot give 3 x 50
    expect_cli_error(run_cli("bench", *TINY, "--data-root", data, "--set", "min_size=50",
                             "--out", out, "--cache-dir", tmp_path / "c", cwd=tmp_path),
                     "need 150 samples", out)
    assert not (tmp_path / "c").exists()


def test_damaged_cache_entry_is_one_line_naming_the_file_and_key(tmp_path):
    """Cached client models go through the validation layer like any input checkpoint."""
    import torch

    from dmm import checkpoint

    data = write_npz(tmp_path / "tiny.npz")
    out, cache = tmp_path / "res", tmp_path / "cache"
    base = ["bench", *TINY, "--data-root", data, "--out", out, "--cache-dir", cache]
    r = run_cli(*base, "--rows", "fedavg", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    entry = next((cache / "npz").glob("fedavg_*"))
    victim = entry / "client_001.safetensors"
    ck = checkpoint.load(victim)
    key = next(k for k, v in ck.state.items() if v.is_floating_point())
    ck.state[key] = torch.full_like(ck.state[key], float("nan"))
    checkpoint.save(victim, ck.state, **ck.meta)
    r = run_cli(*base, "--rows", "fedavg+buffer", cwd=tmp_path)
    # after the progress bar started: the error is one line of its own beside the bar
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"dmm bench: error: {victim}: key {key} has NaN or Inf values" in \
        r.stderr.splitlines(), r.stderr


# ---- the row registry ----------------------------------------------------------------------

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


# emoji-mm-paper is not here: its DMM cells measured the first pair inversion (free text
# features, the default resolved to the head-only refinement), which the current code no longer
# computes, so they keep their old keys and run again (benchmarks/rekey_cells.py)
@pytest.mark.parametrize("folder", ["fmnist-paper", "fmnist-quick", "fmnist-transfer",
                                    "emoji-mm-transfer"])
def test_committed_records_keep_their_cache_keys(folder):
    """A refactor of rows or configs must not silently orphan committed results: every record
    of a preset's grid is found under the key the current code computes for its cell."""
    from dmm.bench.spec import BenchSpec

    # Prepare
    d = RESULTS / folder
    spec = BenchSpec.from_dict(json.loads((d / "spec.json").read_text())["spec"])
    store = ResultStore(d / "cells.jsonl")
    # Execute
    keys = {c: spec.cell_key(c) for c in spec.cells()}
    found = [c for c, k in keys.items() if k in store]
    # Assert: every committed record of the grid is addressed by its cell's key and settings
    recorded = {(r["alpha"], r["k"], r["seed"], r["row"]) for r in store.records.values()}
    grid = {(c.alpha, c.k, c.seed, c.row) for c in keys}
    assert {(c.alpha, c.k, c.seed, c.row) for c in found} == recorded & grid
    for c in found:
        assert store.records[keys[c]]["settings"] == json.loads(
            json.dumps(spec.cell_settings(c), default=str))


def test_supersede_moves_one_group_whole_and_keeps_the_rest(tmp_path):
    """benchmarks/supersede_cells.py: every record of the (alpha, seed) group leaves cells.jsonl
    for superseded.jsonl with its reason, the other groups stay as they were, and bad input is
    one line with status 2 that writes nothing."""
    # Prepare
    script = RESULTS.parent / "supersede_cells.py"
    recs = [{"alpha": a, "seed": s, "k": 10, "row": r, "key": f"{a}-{s}-{r}"}
            for a in (0.1, 0.01) for s in (0, 1) for r in ("fedavg", "fedavg+dmm")]
    cells = tmp_path / "cells.jsonl"
    cells.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
    (tmp_path / "superseded.jsonl").write_text(json.dumps({"row": "old"}) + "\n")
    before = cells.read_text()
    env = {**os.environ, "PYTHONPATH": str(RESULTS.parents[1] / "src")}

    def run(*args):
        return subprocess.run([sys.executable, str(script), str(tmp_path), *args],
                              capture_output=True, text=True, env=env)

    # Execute: bad input first
    bad = run("--alpha", "0.01", "--seed", "0", "--reason", " ")
    # Assert
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "--reason" in bad.stderr and cells.read_text() == before
    # Execute
    r = run("--alpha", "0.01", "--seed", "0", "--reason", "retrained elsewhere")
    # Assert
    assert r.returncode == 0, r.stderr
    kept = [json.loads(x) for x in cells.read_text().splitlines()]
    gone = [json.loads(x) for x in (tmp_path / "superseded.jsonl").read_text().splitlines()]
    assert kept == [x for x in recs if (x["alpha"], x["seed"]) != (0.01, 0)]
    assert gone[0] == {"row": "old"}
    assert [{k: v for k, v in g.items() if k != "superseded"} for g in gone[1:]] == \
        [x for x in recs if (x["alpha"], x["seed"]) == (0.01, 0)]
    assert {g["superseded"] for g in gone[1:]} == {"retrained elsewhere"}
    # a second run finds nothing to move and changes nothing
    after = cells.read_text()
    assert run("--alpha", "0.01", "--seed", "0", "--reason", "x").returncode == 0
    assert cells.read_text() == after


def test_every_row_is_one_registry_entry_and_a_new_row_is_one_call(tmp_path):
    from dmm.bench import ROWS, Row, get_row, register_row
    from dmm.bench.registry import ablation_rows, rows_in
    from dmm.bench.spec import (
        ABLATIONS,
        FEDERATED_TRANSFER,
        FROM_W0,
        ONESHOT_TRANSFER,
        PAIR_ROWS,
        REFERENCES,
        TABLE1,
    )

    # Assert: the presets' names are registered, the sections partition them
    presets = set(TABLE1 + REFERENCES + ABLATIONS + FEDERATED_TRANSFER + ONESHOT_TRANSFER
                  + FROM_W0 + [r for rows in PAIR_ROWS.values() for r in rows])
    assert presets == set(ROWS)
    assert rows_in("reference")[:len(REFERENCES)] == REFERENCES
    assert set(ABLATIONS) <= set(rows_in("ablation"))
    assert set(rows_in("table1")) == set(TABLE1)
    assert ablation_rows()[:4] == ["fedavg", "fedavg+buffer", "fedavg+dmm", "fedavg+dmm_paper"]
    # Execute: one call adds a row that the spec validates and keys
    row = register_row(Row("test-row", "Test row", "fedavg",
                           build=lambda group: (None, {}),
                           config=lambda spec, seed: {"x": seed}))
    try:
        spec = BenchSpec(rows=["fedavg", "test-row"], alphas=[0.1], seeds=[3])
        spec.validate()
        assert get_row("test-row") is row
        assert spec.cell_settings(Cell(0.1, 10, 3, "test-row"))["row_config"] == {"x": 3}
        with pytest.raises(DMMError, match="registered already"):
            register_row(row)
    finally:
        ROWS.pop("test-row")
    with pytest.raises(DMMError, match="unknown regime"):
        register_row(Row("bad", "Bad", "nope", build=lambda g: (None, {})))
    with pytest.raises(DMMError, match="unknown bench row"):
        BenchSpec(rows=["test-row"]).validate()


def test_transfer_grid_runs_federated_rows_at_two_alphas_and_one_shot_rows_at_all():
    from dmm.bench.spec import FEDERATED_TRANSFER, ONESHOT_TRANSFER, get_preset

    # Execute
    spec = get_preset("transfer")
    spec.validate()
    cells = spec.cells()
    # Assert: the grid exactly, each DMM preset at its own budget
    fed = {(c.alpha, c.row) for c in cells if c.row in FEDERATED_TRANSFER}
    assert {a for a, _ in fed} == {0.1, 0.01}
    assert {c.alpha for c in cells if c.row in ONESHOT_TRANSFER} == {0.5, 0.1, 0.01}
    assert len(cells) == 3 * (2 * len(FEDERATED_TRANSFER) + 3 * len(ONESHOT_TRANSFER))
    dmm = spec.cell_settings(Cell(0.01, 10, 0, "average+dmm"))["row_config"]["dmm"]
    assert dmm["teacher_check"] and dmm["inversion"]["teacher_labels"] == "histogram"
    head = spec.cell_settings(Cell(0.01, 10, 0, "fedavg+dmm_head"))["row_config"]["dmm"]
    assert head["distillation"]["trainable"] == "head" and not head["distill"]
    est = spec.cell_settings(Cell(0.5, 10, 0, "average+dmm_estimated"))["row_config"]
    assert est["label_counts"] == "estimated"
    assert "label_counts" not in spec.cell_settings(Cell(0.5, 10, 0, "average+dmm"))[
        "row_config"]
    with pytest.raises(DMMError, match="row_alphas names"):
        replace(spec, row_alphas={"cat": [0.1]}).validate()
    # a subset of rows (--rows) keeps the preset's alphas for the rows it names
    sub = get_preset("transfer", rows=["fedavg", "average"], alphas=[0.01])
    sub.validate()
    assert sub.row_alphas == {"fedavg": [0.1, 0.01]}
    assert {c.row for c in sub.cells()} == {"fedavg", "average"}


def test_transfer_rows_run_end_to_end_on_tiny_data(tmp_path):
    from dmm.bench import run_bench
    from dmm.bench.spec import BenchSpec

    # Prepare: the one-shot transfer rows on a tiny grid
    spec = BenchSpec(dataset="npz", data_root=str(write_npz(tmp_path / "tiny.npz")),
                     alphas=[0.5], seeds=[0], arch="resnet8", clients=3, local_iters=2,
                     batch_size=16, rounds=1, inversion_images=8, inversion_iters=2,
                     distill_steps=2, compile=False,
                     rows=["ensemble", "ensemble_routed", "average", "average+dmm",
                           "average+dmm_estimated"])
    # Execute
    store = run_bench(spec, tmp_path / "res", tmp_path / "cache", progress=False,
                      report=lambda s: None)
    # Assert: every row has a number; the DMM rows report the teacher check, the estimated
    # row its estimate and the note that the histograms were withheld
    recs = {r["row"]: r for r in store.records.values()}
    assert set(recs) == set(spec.rows)
    assert all(0 <= r["accuracy"] <= 1 for r in recs.values())
    assert "transfer" in recs["average+dmm"]["distillation"]["teacher_check"]
    est = recs["average+dmm_estimated"]
    assert len(est["distillation"]["label_counts_estimated"]) == 3
    assert any("label histograms" in n for n in est["notes"])
    assert not any("label histograms" in n for n in recs["average+dmm"]["notes"])


def test_a_fallback_to_the_head_refinement_shares_no_pseudo_data_with_a_transfer_row(
        tmp_path, monkeypatch):
    import dmm.pipeline as P
    from dmm.bench import run_bench
    from dmm.bench.spec import BenchSpec

    # Prepare: the teacher check always finds nothing to transfer
    monkeypatch.setattr(P, "teacher_check", lambda *a, **k: {"transfer": False})
    spec = BenchSpec(dataset="npz", data_root=str(write_npz(tmp_path / "tiny.npz")),
                     alphas=[0.5], seeds=[0], arch="resnet8", clients=3, local_iters=2,
                     batch_size=16, rounds=1, inversion_images=8, inversion_iters=2,
                     distill_steps=2, compile=False,
                     rows=["fedavg+dmm", "fedavg+dmm_transfer"])
    # Execute
    store = run_bench(spec, tmp_path / "res", tmp_path / "cache", progress=False,
                      report=lambda s: None)
    # Assert: the default ran the head-only refinement on merged-model inversions, the transfer
    # row its own domain inversion
    recs = {r["row"]: r for r in store.records.values()}
    assert recs["fedavg+dmm"]["inversion"]["config"]["mode"] == "merged"
    assert recs["fedavg+dmm_transfer"]["inversion"]["config"]["mode"] == "ensemble"


def test_the_in_loop_row_trains_its_own_models_and_reports_every_refinement(tmp_path):
    from dmm.bench import ROWS, register_row, run_bench
    from dmm.bench.rows import loop_row
    from dmm.bench.spec import get_preset

    # Prepare: the preset's row is keyed by its loop settings; a test row refines every round
    spec = get_preset("transfer")
    key = spec.cell_settings(Cell(0.01, 10, 0, "fedavg+dmm_round"))
    assert key["row_config"]["loop"]["every"] == 20 and key["train"]["rounds"] == 60
    assert spec.cell_key(Cell(0.01, 10, 0, "fedavg+dmm_round")) != spec.cell_key(
        Cell(0.01, 10, 0, "fedavg+dmm"))
    register_row(loop_row("test-loop", "Test loop", 1, loop={"refresh": 4, "steps": 2,
                                                              "pool": 10}))
    try:
        tiny = BenchSpec(dataset="npz", data_root=str(write_npz(tmp_path / "tiny.npz")),
                         alphas=[0.5], seeds=[0], arch="resnet8", clients=3, local_iters=2,
                         batch_size=16, rounds=2, inversion_images=8, inversion_iters=2,
                         distill_steps=2, compile=False, rows=["test-loop", "fedavg+dmm_round"])
        # Execute
        store = run_bench(tiny, tmp_path / "res", tmp_path / "cache", progress=False,
                          report=lambda s: None)
    finally:
        ROWS.pop("test-loop")
    # Assert: a refinement after each round (every 1) or only after the last (every 20 > 2
    # rounds); the seconds add up; no cache entry (the row trains its own models)
    recs = {r["row"]: r for r in store.records.values()}
    every1, every20 = recs["test-loop"], recs["fedavg+dmm_round"]
    assert [r["round"] for r in every1["loop"]["reports"]] == [1, 2]
    assert [r["round"] for r in every20["loop"]["reports"]] == [2]
    for r in (every1, every20):
        assert r["refine_s"] == pytest.approx(sum(x["seconds"] for x in r["loop"]["reports"]))
        assert r["train_s"] > 0 and 0 <= r["accuracy"] <= 1
        assert r["loop"]["guard_fired"] == sum(not x["kept"] for x in r["loop"]["reports"])
    assert every1["loop"]["reports"][1]["pool"] <= 10
    assert not any((tmp_path / "cache").rglob("meta.json"))


def test_the_in_loop_targets_are_judged_per_seed_from_the_records():
    import importlib.util

    # Prepare: records of two seeds at alpha 0.01, one over the targets, one under
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "transfer_targets.py"
    spec = importlib.util.spec_from_file_location("transfer_targets", path)
    tt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tt)

    def loop(acc, train_s, refine_s, kept):
        reps = [{"round": 20 * (i + 1), "kept": k, "teacher_check": {"transfer": True}}
                for i, k in enumerate(kept)]
        return {"accuracy": acc, "train_s": train_s, "refine_s": refine_s,
                "loop": {"reports": reps, "refinements": len(reps),
                         "guard_fired": sum(not k for k in kept)}}

    recs = {("fedavg", 0.01, 0): {"accuracy": 0.30, "train_s": 100.0},
            ("fedavg+dmm", 0.01, 0): {"accuracy": 0.33},
            ("fedavg+dmm_round", 0.01, 0): loop(0.50, 100.0, 40.0, [True, True, True]),
            ("fedavg", 0.01, 1): {"accuracy": 0.30, "train_s": 100.0},
            ("fedavg+dmm", 0.01, 1): {"accuracy": 0.35},
            ("fedavg+dmm_round", 0.01, 1): loop(0.34, 110.0, 50.0, [True, False, True])}
    # Execute
    text = "\n".join(tt.in_loop(recs, [0, 1]))
    # Assert: gains +20 and +4 (missed), above post-hoc on 1 of 2, 1.40x and 1.45x of the
    # records' own FedAvg share (met)
    assert "| 0.01 | 0 | 30.00 | 33.00 | 50.00 | +20.00 | +17.00 | 1.40x | 1.40x |" in text
    again = tt.in_loop(recs, [0, 1], {("fedavg", 0.01, 0): {"accuracy": 0.4, "train_s": 70.0}})
    assert "| +10.00 (2.00x) |" in "\n".join(again)
    assert "| 0.01 | 1 |" in text and "| 1/3 |" in text
    assert "gain +20.00, +4.00; target >= +15 on every seed: missed" in text
    assert "above post-hoc on 1/2 seed(s)" in text and "share 1.40, 1.45 (cap 1.5: met" in text
    assert tt.in_loop({("fedavg", 0.1, 0): {"accuracy": 0.5, "train_s": 1.0}}, [0]) == []
    # a run whose guard rejected every refinement is FedAvg of its session
    rejected = {("fedavg+dmm_round_head", 0.01, 1): loop(0.39, 90.0, 30.0, [False] * 3)}
    assert tt.same_session({**recs, **rejected}, {}) == {
        ("fedavg", 0.01, 1): {"accuracy": 0.39, "train_s": 90.0}}
