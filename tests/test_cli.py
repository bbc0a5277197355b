"""Command line: end to end on tiny data, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest

from conftest import expect_cli_error, run_cli
from dmm import checkpoint
from dmm.cli import main

TINY = ["--arch", "resnet8", "--width", "0.25", "--rounds", "2", "--local-iters", "2",
        "--batch-size", "16", "--clients", "3", "--alpha", "0.5", "--min-size", "5"]


def test_train_then_evaluate(tmp_path, npz_file, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "npz", "--data-root", str(npz_file), *TINY,
                 "--out", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["client_000.safetensors", "client_001.safetensors", "client_002.safetensors",
                     "global.safetensors", "init.safetensors", "partition.json", "train.json"]
    part = json.loads((out / "partition.json").read_text())
    assert sum(part["sizes"]) == 120 and len(part["label_counts"]) == 3
    meta = checkpoint.load(out / "client_001.safetensors").meta
    assert meta["client_id"] == 1 and meta["n_samples"] == part["sizes"][1]
    train = json.loads((out / "train.json").read_text())
    assert train["config"]["regime"] == "fedavg" and "commit" in train["provenance"]
    capsys.readouterr()
    assert main(["evaluate", str(out / "global.safetensors"), "--dataset", "npz",
                 "--data-root", str(npz_file), "--json", str(tmp_path / "ev.json")]) == 0
    assert "accuracy" in capsys.readouterr().out
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert 0 <= ev["results"][0]["accuracy"] <= 1


@pytest.mark.parametrize("args, needle", [
    (["--dataset", "nope"], "unknown dataset"),
    (["--arch", "vgg"], "unknown architecture"),
    (["--alpha", "0"], "alpha"),
    (["--alpha", "-0.5"], "alpha"),
    (["--clients", "0"], "clients"),
    (["--clients", "1000"], "samples"),
    (["--data-root", "/no/such/folder"], "does not exist"),
])
def test_train_bad_input_is_one_line_exit_2_no_output(tmp_path, npz_file, args, needle):
    out = tmp_path / "out"
    base = ["train", "--dataset", "npz", "--data-root", str(npz_file), *TINY, "--out", str(out)]
    for i in range(0, len(args), 2):  # later flags override earlier ones in argparse
        base += args[i:i + 2]
    expect_cli_error(run_cli(*base, cwd=tmp_path), needle, out)


def test_unwritable_output_folder(tmp_path, npz_file):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = run_cli("train", "--dataset", "npz", "--data-root", str(npz_file), *TINY,
                "--out", str(blocker / "sub"), cwd=tmp_path)
    expect_cli_error(r, "cannot be written")
