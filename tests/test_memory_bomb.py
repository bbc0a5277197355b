"""A checkpoint whose metadata names a model far larger than its tensors (issue "memory
bomb"): every command compares the file with the architecture built on the meta device, so
the answer is one line and exit 2, without allocating what the metadata names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_npz
from dmm import checkpoint
from dmm.errors import DMMError

META = {"arch": "resnet18", "arch_kwargs": {"width": 0.25, "num_classes": 4, "in_channels": 1},
        "input_mean": [0.3], "input_std": [0.3], "input_size": [1, 16, 16], "n_samples": 10}
PEAK_LIMIT_KB = 1024 * 1024  # 1 GiB
# The child's own high-water mark: VmHWM belongs to the address space the exec created. Not
# ru_maxrss, which Linux carries across exec from the forking parent, so that inside a long
# pytest run it reported pytest's peak (1,046 MiB) rather than the command's (288 MiB).
RUNNER = ("import os, sys\nfrom dmm.cli import main\ntry:\n    rc = main(sys.argv[1:])\n"
          "finally:\n    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
          "    open(os.environ['PEAK_FILE'], 'w').write(hwm[0].split()[1])\nsys.exit(rc)")


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A width-0.25 ResNet-18's tensors under metadata that says width 400 (23.6 GB)."""
    d = tmp_path_factory.mktemp("bomb")
    torch.manual_seed(0)
    from dmm.models import create
    model = create("resnet18", **META["arch_kwargs"])
    liar = {**META, "arch_kwargs": {**META["arch_kwargs"], "width": 400.0}}
    checkpoint.save(d / "bomb.safetensors", model, **liar)
    checkpoint.save(d / "good.safetensors", model, **META)
    torch.save(model.state_dict(), d / "state.pt")
    write_npz(d / "tiny.npz")
    return d


def _run(args, cwd):
    peak = Path(cwd) / "peak.txt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PEAK_FILE": str(peak)}
    r = subprocess.run([sys.executable, "-c", RUNNER, *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    return r, int(peak.read_text())


@pytest.mark.parametrize("command", ["evaluate", "inspect", "merge-none", "merge-dmm",
                                     "merge-stream", "convert"])
def test_a_lying_checkpoint_is_one_line_through_every_command_without_allocating(
        bomb, tmp_path, command):
    f, good, out = bomb / "bomb.safetensors", bomb / "good.safetensors", tmp_path / "o.safetensors"
    args = {"evaluate": ["evaluate", f, "--dataset", "npz", "--data-root", bomb / "tiny.npz"],
            "inspect": ["inspect", f, good, "--chart", tmp_path / "c.png"],
            "merge-none": ["merge", f, good, "--refine", "none", "--in-memory", "--out", out],
            "merge-dmm": ["merge", f, good, "--refine", "dmm", "--out", out],
            "merge-stream": ["merge", f, good, "--refine", "none", "--out", out],
            "convert": ["convert", bomb / "state.pt", "--arch", "resnet18", "--arch-kwargs",
                        json.dumps({**META["arch_kwargs"], "width": 400.0}), "--out", out],
            }[command]
    # Execute
    r, peak_kb = _run(args, tmp_path)
    # Assert: one line naming the file's first misfit, exit 2, nothing written, < 1 GiB peak
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "shape" in lines[0] or "do not fit" in lines[0] or "differs" in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / "c.png").exists()
    assert peak_kb < PEAK_LIMIT_KB, f"peak memory {peak_kb / 1024:.0f} MiB"


def test_build_compares_on_meta_before_it_allocates_and_a_fitting_file_loads_bit_exact(bomb):
    # Execute / Assert: the lying file fails in build() itself; the honest one round-trips
    with pytest.raises(DMMError, match="do not fit resnet18"):
        checkpoint.load(bomb / "bomb.safetensors").build()
    ck = checkpoint.load(bomb / "good.safetensors")
    m = ck.build()
    for k, v in m.state_dict().items():
        assert torch.equal(v, ck.state[k]), k
    lazy = checkpoint.open_lazy(bomb / "good.safetensors")
    assert all(torch.equal(v, ck.state[k]) for k, v in lazy.build().state_dict().items())


def test_a_model_larger_than_free_memory_is_one_line(monkeypatch):
    from dmm.checkpoint import check_memory

    monkeypatch.setattr(checkpoint, "available_memory", lambda: 2**30)
    with pytest.raises(DMMError, match=r"needs 2\.0 GiB, only 1\.0 GiB"):
        check_memory(2 * 2**30, "x.safetensors")
    check_memory(2**20, "x.safetensors")  # fits: no error
