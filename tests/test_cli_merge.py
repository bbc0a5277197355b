"""`dmm merge` and `dmm inspect` end to end on tiny checkpoints, and their one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import expect_cli_error, run_cli, tiny_model
from dmm import checkpoint

META = {"arch": "resnet8", "arch_kwargs": {"width": 0.25, "num_classes": 4, "in_channels": 1},
        "input_mean": [0.3], "input_std": [0.3], "input_size": [1, 16, 16],
        "classes": ["a", "b", "c", "d"]}
FAST = {"inversion": {"n_images": 16, "batch_size": 8, "iterations": 3, "bf16": False,
                      "compile": False},
        "distillation": {"steps": 2, "batch_size": 8, "bf16": False}, "distill": True,
        "selection": "all"}


def _client(seed):
    m = tiny_model(seed)
    m.train()
    with torch.no_grad():
        m(torch.randn(16, 1, 16, 16) + seed)
    return m


@pytest.fixture
def clients(tmp_path):
    d = tmp_path / "clients"
    for k in range(3):
        checkpoint.save(d / f"client_{k:03d}.safetensors", _client(k), **META, n_samples=10 + k,
                        client_id=k)
    (tmp_path / "fast.json").write_text(json.dumps(FAST))
    return d


def test_merge_refine_and_inspect(tmp_path, clients):
    out = tmp_path / "m" / "merged.safetensors"
    r = run_cli("merge", clients, "--out", out, "--config", tmp_path / "fast.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ck = checkpoint.load(out)
    assert ck.meta["merge"]["method"] == "average" and ck.meta["n_samples"] == 33
    rep = json.loads(out.with_suffix(".json").read_text())
    # the default: every client a teacher if the teacher check finds something to transfer,
    # else the head-only refinement without teachers
    check = rep["report"]["distillation"]["teacher_check"]
    assert rep["report"]["teachers"] == ([0, 1, 2] if check["transfer"] else [])
    assert "commit" in rep["provenance"]
    assert (tmp_path / "m" / "merged_pseudo.png").stat().st_size > 0
    # --student: refine a given model with the inputs as teachers
    out2 = tmp_path / "s.safetensors"
    r = run_cli("merge", clients, "--student", clients / "client_000.safetensors", "--out", out2,
            "--config", tmp_path / "fast.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("inspect", clients, "--chart", tmp_path / "div.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "param-dissim" in r.stdout and (tmp_path / "div.png").stat().st_size > 0


def test_merge_without_refine_equals_weighted_average(tmp_path, clients):
    out = tmp_path / "avg.safetensors"
    assert run_cli("merge", clients, "--refine", "none", "--out", out, cwd=tmp_path).returncode == 0
    st = checkpoint.load(out).state
    ws = [checkpoint.load(clients / f"client_{k:03d}.safetensors").state for k in range(3)]
    expect = sum((10 + k) * ws[k]["conv1.weight"].double() for k in range(3)) / 33
    torch.testing.assert_close(st["conv1.weight"].double(), expect, atol=1e-6, rtol=0)


def test_merge_bad_inputs(tmp_path, clients):
    out = tmp_path / "bad.safetensors"
    other = tmp_path / "other.safetensors"
    checkpoint.save(other, tiny_model(0, classes=5), **{**META, "arch_kwargs": {
        "width": 0.25, "num_classes": 5, "in_channels": 1}}, n_samples=5)
    expect_cli_error(run_cli("merge", clients, other, "--out", out, cwd=tmp_path), "differs", out)

    nan = tmp_path / "nan.safetensors"
    m = _client(0)
    with torch.no_grad():
        m.conv1.weight[0, 0, 0, 0] = float("nan")
    checkpoint.save(nan, m, **META, n_samples=5)
    expect_cli_error(run_cli("merge", clients / "client_000.safetensors", nan, "--out", out,
                      cwd=tmp_path), "NaN", out)

    one = run_cli("merge", clients / "client_000.safetensors", "--out", out, cwd=tmp_path)
    expect_cli_error(one, "at least two", out)

    d = tmp_path / "nobn"
    for k in range(2):
        torch.manual_seed(k)
        from nobn_model import NoBN
        checkpoint.save(d / f"client_{k}.safetensors", NoBN(), arch="nobn_model:NoBN",
                        arch_kwargs={}, n_samples=3)
    # a user architecture named by a file is imported only when trusted
    expect_cli_error(run_cli("merge", d, "--out", out, "--config", tmp_path / "fast.json",
                      cwd=tmp_path), "DMM_TRUST_MODULES=nobn_model", out)
    expect_cli_error(run_cli("merge", d, "--out", out, "--config", tmp_path / "fast.json",
                      cwd=tmp_path, env={"DMM_TRUST_MODULES": "nobn_model"}), "BatchNorm", out)
    expect_cli_error(run_cli("merge", tmp_path / "missing_dir", "--out", out, cwd=tmp_path),
                  "no such", out)


def test_merge_methods_with_base_and_params(tmp_path, clients):
    base = tmp_path / "init.safetensors"
    checkpoint.save(base, tiny_model(42), **META, n_samples=0)
    out = tmp_path / "ties.safetensors"
    r = run_cli("merge", clients, "--method", "ties", "--base", base, "--param", "density=0.5",
            "--refine", "none", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert checkpoint.load(out).meta["merge"]["method"] == "ties"
    expect_cli_error(run_cli("merge", clients, "--method", "ties", "--base", base, "--param",
                      "densty=0.5", "--refine", "none", "--out", tmp_path / "x.safetensors",
                      cwd=tmp_path), "no parameter densty", tmp_path / "x.safetensors")
    expect_cli_error(run_cli("merge", clients, "--method", "task_arithmetic", "--refine", "none",
                      "--out", tmp_path / "y.safetensors", cwd=tmp_path), "--base",
                  tmp_path / "y.safetensors")
    expect_cli_error(run_cli("merge", clients, "--method", "ties", "--base", base, "--param",
                      "density=2", "--refine", "none", "--out", tmp_path / "z.safetensors",
                      cwd=tmp_path), "density", tmp_path / "z.safetensors")


@pytest.mark.parametrize("method", ["average", "ties"])
def test_same_seed_gives_a_bitwise_identical_merged_checkpoint(tmp_path, clients, method):
    """Two processes, same inputs and seed: the merged (and DMM-refined) files are identical."""
    base = ["--base", clients / "client_000.safetensors"] if method == "ties" else []
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run / "merged.safetensors"
        r = run_cli("merge", clients, "--method", method, *base, "--out", out, "--config",
                    tmp_path / "fast.json", "--seed", "7", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    # a different seed changes the refinement
    out = tmp_path / "c" / "merged.safetensors"
    r = run_cli("merge", clients, "--method", method, *base, "--out", out, "--config",
                tmp_path / "fast.json", "--seed", "8", cwd=tmp_path)
    assert r.returncode == 0 and out.read_bytes() != outs[0]


def test_merge_with_the_transfer_preset_reads_the_label_histograms_or_estimates_them(
        tmp_path, clients):
    # Prepare: the same clients with and without label histograms
    d = tmp_path / "with_counts"
    for k, ck in enumerate(checkpoint.load_dir(clients)):
        checkpoint.save(d / f"client_{k:03d}.safetensors", ck.state,
                        **{**ck.meta, "label_counts": [4 + k, 0, 3, 3 - k]})
    fast = {**FAST, "distillation": {**FAST["distillation"], "cache_teachers": True,
                                     "augment": False}}
    (tmp_path / "fast_t.json").write_text(json.dumps(fast))
    out = tmp_path / "t.safetensors"
    # Execute
    r = run_cli("merge", d, "--preset", "transfer", "--config", tmp_path / "fast_t.json",
                "--out", out, cwd=tmp_path)
    # Assert: each client's pseudo-images were asked only for the classes it holds
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["preset"] == "transfer" and rep["report"]["teachers"] == [0, 1, 2]
    assert rep["report"]["inversion"]["config"]["teacher_labels"] == "histogram"
    # without histograms each client's targets are its own predictions, the ownership is
    # estimated, and the report says so
    out = tmp_path / "u.safetensors"
    r = run_cli("merge", clients, "--preset", "transfer", "--config", tmp_path / "fast_t.json",
                "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.with_suffix(".json").read_text())["report"]
    assert rep["inversion"]["config"]["teacher_labels"] == "prediction"
    assert any("label histograms" in n for n in rep["notes"])
    assert len(rep["distillation"]["label_counts_estimated"]) == 3
