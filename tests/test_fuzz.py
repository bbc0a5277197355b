"""Fuzzing (hypothesis) of what users hand to dmm: checkpoint files and command lines.

Invariants:
- loading any byte string as a checkpoint (whole or lazily), then validating it, either works
  or raises DMMError: no other exception, no crash, nothing executed;
- any command line of `merge`, `evaluate`, `inspect` and `train` over good, corrupt and missing
  files and odd values exits 0 or 2 (argparse's usage errors are 2 too) and, when it fails,
  leaves no output file behind.

`make test` runs a few hundred cases; `python benchmarks/fuzz_campaign.py` runs the same targets
with DMM_FUZZ_EXAMPLES cases each and reports the counts.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import tiny_model, write_npz
from dmm import checkpoint
from dmm.cli import main
from dmm.errors import DMMError
from dmm.validate import validate_checkpoint

EXAMPLES = int(os.environ.get("DMM_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
META = {"arch": "resnet8", "arch_kwargs": {"width": 0.25, "num_classes": 4, "in_channels": 1},
        "input_mean": [0.3], "input_std": [0.3], "input_size": [1, 16, 16],
        "classes": ["a", "b", "c", "d"]}
FAST = {"inversion": {"n_images": 8, "batch_size": 8, "iterations": 1, "bf16": False,
                      "compile": False}, "distillation": {"steps": 1, "batch_size": 8}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    for k in range(2):
        checkpoint.save(d / "clients" / f"client_{k:03d}.safetensors", tiny_model(k), **META,
                        n_samples=10 + k)
    good = (d / "clients" / "client_000.safetensors").read_bytes()
    (d / "corrupt.safetensors").write_bytes(good[: len(good) // 2])
    (d / "text.safetensors").write_text("not a checkpoint")
    (d / "fast.json").write_text(json.dumps(FAST))
    (d / "bad.json").write_text("{\"inversion\": 3}")
    write_npz(d / "tiny.npz", n_train=60, n_test=20)
    torch.save(tiny_model().state_dict(), d / "good.pt")
    torch.save({"w": _Payload(d / "pwned")}, d / "evil.pt")
    return d, good


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling runs open(marker, 'w')
        return (open, (self.marker, "w"))


def _check_load(path: Path) -> None:
    for opener in (checkpoint.load, checkpoint.open_lazy):
        try:
            ck = opener(path)
            validate_checkpoint(ck)
            ck.build()
        except DMMError:
            pass


def _header(good: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", good[:8])[0]
    return json.loads(good[8:8 + n]), good[8 + n:]


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_bytes(files, tmp_path_factory, data):
    """Truncations, byte flips and spliced garbage of a valid checkpoint."""
    _, good = files
    b = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["truncate", "flip", "splice", "length"]))
        if op == "truncate":
            b = b[: data.draw(st.integers(0, len(b)))]
        elif op == "flip" and b:
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] ^= data.draw(st.integers(1, 255))
        elif op == "splice":
            i = data.draw(st.integers(0, len(b)))
            b[i:i] = data.draw(st.binary(max_size=64))
        elif op == "length" and len(b) >= 8:
            b[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    p = tmp_path_factory.mktemp("b") / "x.safetensors"
    p.write_bytes(bytes(b))
    _check_load(p)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4), max_leaves=12)


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_header(files, tmp_path_factory, data):
    """Well-framed files whose JSON header lies: dtypes, shapes, offsets, metadata."""
    _, good = files
    header, body = _header(good)
    keys = [k for k in header if k != "__metadata__"]
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from([*keys, "__metadata__"]))
        if key == "__metadata__":
            meta = data.draw(st.one_of(
                json_values.map(lambda v: {"dmm": json.dumps(v)}),
                st.fixed_dictionaries({"dmm": st.text(max_size=20)}),
                st.just({"dmm": json.dumps({**META, "arch_kwargs": {"width": -1}})}),
                st.just({"dmm": json.dumps({**META, "arch": "os:system"})}),
                st.just({"dmm": json.dumps({**META, "arch_kwargs": {"num_classes": 0}})})))
            header["__metadata__"] = meta
        else:
            field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop"]))
            if field == "drop":
                header.pop(key, None)
            else:
                header.setdefault(key, {})[field] = data.draw(st.one_of(
                    json_values, st.sampled_from(["F32", "I64", "F16", "BF16", "U8", "F64"]),
                    st.lists(st.integers(-3, 2**40), max_size=4)))
    raw = json.dumps(header).encode()
    p = tmp_path_factory.mktemp("h") / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    _check_load(p)


# ---- command lines ------------------------------------------------------------------------------

NUMBERS = ["0", "1", "2", "-1", "0.5", "nan", "inf", "-inf", "1e309", "abc", "", "3.0"]


def _paths(d: Path) -> list[str]:
    return [str(d / "clients"), str(d / "clients" / "client_001.safetensors"),
            str(d / "corrupt.safetensors"), str(d / "text.safetensors"), str(d / "missing"),
            str(d / "tiny.npz"), str(d), "/dev/null", "", str(d / "good.pt"),
            str(d / "evil.pt")]


def _argv(data, d: Path, out: Path) -> list[str]:
    paths = _paths(d)
    cmd = data.draw(st.sampled_from(["merge", "evaluate", "inspect", "train", "convert"]))
    argv = [cmd]
    if cmd == "convert":
        argv.append(data.draw(st.sampled_from(paths)))
    if cmd in ("merge", "evaluate", "inspect"):
        argv += data.draw(st.lists(st.sampled_from(paths), min_size=0, max_size=3))
    opts = {
        "merge": {"--method": ["average", "ties", "task_arithmetic", "cat", "nope"],
                  "--base": paths, "--param": ["density=0.5", "density=2", "x=1", "scale=abc",
                                               "=", "density"],
                  "--student": paths, "--refine": ["none", "dmm", "x"],
                  "--preset": ["default", "paper", "x"], "--weights": ["samples", "uniform"],
                  "--seed": NUMBERS, "--config": [str(d / "fast.json"), str(d / "bad.json")],
                  "--in-memory": None, "--bn-reset": None},
        "evaluate": {"--dataset": ["npz", "fmnist", "nope"], "--data-root": paths,
                     "--n-test": NUMBERS},
        "inspect": {"--beta": NUMBERS, "--tau": NUMBERS, "--student": paths},
        "convert": {"--arch": ["resnet8", "resnet18", "nope", "os:system"],
                    "--arch-kwargs": [json.dumps(META["arch_kwargs"]), "{}", "[1]", "{",
                                      '{"width": -1}', '{"num_classes": "x"}'],
                    "--n-samples": NUMBERS},
        "train": {"--dataset": ["npz", "nope"], "--data-root": paths, "--alpha": NUMBERS,
                  "--clients": NUMBERS, "--rounds": ["1", "0", "-1", "x"],
                  "--local-iters": ["1", "0"], "--regime": ["fedavg", "fedbn", "oneshot", "x"],
                  "--arch": ["resnet8", "nope", "os:system"], "--width": NUMBERS,
                  "--participation": NUMBERS, "--mu": NUMBERS, "--min-size": NUMBERS,
                  "--batch-size": ["8", "0"]},
    }[cmd]
    for opt in data.draw(st.lists(st.sampled_from(sorted(opts)), max_size=5, unique=True)):
        argv.append(opt)
        if opts[opt] is not None:
            argv.append(data.draw(st.sampled_from(opts[opt])))
    if cmd == "merge":
        argv += ["--config", str(d / "fast.json"), "--out", str(out / "m.safetensors")]
        if "--refine" not in argv and data.draw(st.booleans()):
            argv += ["--refine", "none"]
    elif cmd == "train":
        argv += ["--out", str(out / "run"), "--local-iters", "1", "--rounds", "1", "--n-train",
                 "60", "--arch", "resnet8", "--fp32"]
        if "--data-root" not in argv:
            argv += ["--dataset", "npz", "--data-root", str(d / "tiny.npz")]
    elif cmd == "inspect":
        argv += ["--chart", str(out / "c.png")]
    elif cmd == "evaluate":
        argv += ["--json", str(out / "e.json")]
    elif cmd == "convert":
        argv += ["--out", str(out / "c.safetensors")]
    return argv


@settings(FUZZ, max_examples=max(20, EXAMPLES // 3))
@given(data=st.data())
def test_fuzz_command_line(files, tmp_path_factory, data, capsys):
    d, _ = files
    out = tmp_path_factory.mktemp("out")
    argv = _argv(data, d, out)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: usage errors
        rc = e.code
    capsys.readouterr()
    event(f"{argv[0]} exit {rc}")  # the campaign reports these counts
    assert rc in (0, 2), (argv, rc)
    assert not (d / "pwned").exists(), argv  # no pickle ran
    if rc != 0:
        leftovers = [p for p in out.rglob("*") if p.is_file()]
        assert not leftovers, (argv, leftovers)


def _status_mib(field: str) -> float:
    """A field of /proc/self/status in MiB (VmRSS: now; VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak() -> float:
    """Resets this process's RSS high-water mark (Linux clear_refs 5) and returns the RSS now,
    so that a peak below an earlier test's peak still shows (ru_maxrss never goes down)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


@FUZZ
@given(width=st.floats(0.01, 1000.0), classes=st.integers(1, 10**9),
       channels=st.integers(1, 10**6), arch=st.sampled_from(["resnet8", "resnet18"]))
def test_fuzz_architecture_arguments_never_allocate_what_the_file_lacks(
        files, tmp_path_factory, width, classes, channels, arch):
    """Metadata naming an architecture anywhere in its valid range over a small file's tensors
    (width up to 10^3, classes up to 10^9, channels up to 10^6): validation and build either
    work (the arguments are the file's) or raise DMMError, and the process's peak memory stays
    under 512 MiB above where the example began (the named models reach terabytes)."""
    d, _ = files
    base = _reset_peak()
    ck = checkpoint.load(d / "clients" / "client_000.safetensors")
    ck.meta = {**ck.meta, "arch": arch,
               "arch_kwargs": {"width": width, "num_classes": classes, "in_channels": channels}}
    try:
        validate_checkpoint(ck)
        ck.build()
        event("fits")
    except DMMError:
        event("refused")
    peak = _status_mib("VmHWM")
    assert peak - base < 512, f"peak memory grew from {base:.0f} to {peak:.0f} MiB"
