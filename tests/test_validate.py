"""The validation layer: every way a checkpoint can misfit is one line naming file and key."""

from __future__ import annotations

import pytest
import torch

from conftest import expect_cli_error, run_cli, tiny_model, write_npz
from dmm import checkpoint
from dmm.errors import DMMError
from dmm.validate import validate_checkpoint, validate_group

META = {"arch": "resnet8", "arch_kwargs": {"width": 0.25, "num_classes": 4, "in_channels": 1}}


def save(path, state, **meta):
    return checkpoint.save(path, state, **{**META, **meta, "n_samples": 10})


@pytest.fixture
def good(tmp_path):
    return save(tmp_path / "good.safetensors", tiny_model().state_dict())


def broken(tmp_path, name, fn):
    state = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    fn(state)
    return save(tmp_path / f"{name}.safetensors", state)


CASES = {
    "missing": (lambda s: s.pop("fc.bias"), "key fc.bias is missing"),
    "extra": (lambda s: s.update(extra=torch.zeros(1)), "unexpected key extra"),
    "shape": (lambda s: s.update({"fc.weight": torch.zeros(5, 32)}), "key fc.weight has shape"),
    "dtype": (lambda s: s.update({"fc.weight": s["fc.weight"].half()}),
              "key fc.weight has dtype float16"),
    "nan": (lambda s: s["conv1.weight"].view(-1).__setitem__(0, float("nan")),
            "key conv1.weight has NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_misfit_names_file_and_key(tmp_path, case):
    fn, needle = CASES[case]
    path = broken(tmp_path, case, fn)
    with pytest.raises(DMMError) as e:
        validate_checkpoint(checkpoint.load(path))
    assert str(path) in str(e.value) and needle in str(e.value)
    assert "\n" not in str(e.value)


def test_group_checks_architecture_and_classes(tmp_path, good):
    other = checkpoint.save(tmp_path / "wide.safetensors",
                            tiny_model().state_dict(), arch="resnet8",
                            arch_kwargs={**META["arch_kwargs"], "width": 0.5}, n_samples=1)
    with pytest.raises(DMMError, match="architecture resnet8 .* differs"):
        validate_group([checkpoint.load(good), checkpoint.load(other)])
    with pytest.raises(DMMError, match="the model has 4 classes, the data set has 10"):
        validate_group([checkpoint.load(good)], num_classes=10)
    validate_group([checkpoint.load(good), checkpoint.load(good)], need_bn=True)


def test_cli_merge_and_evaluate_refuse_misfits_before_output(tmp_path, good):
    bad = broken(tmp_path, "dtype", CASES["dtype"][0])
    out = tmp_path / "m.safetensors"
    expect_cli_error(run_cli("merge", good, bad, "--refine", "none", "--out", out,
                             cwd=tmp_path), "key fc.weight has dtype float16", out)
    student = broken(tmp_path, "shape", CASES["shape"][0])
    expect_cli_error(run_cli("merge", good, good, "--student", student, "--out", out,
                             cwd=tmp_path), "key fc.weight has shape", out)
    expect_cli_error(run_cli("evaluate", bad, good, "--dataset", "fmnist", "--json",
                             tmp_path / "e.json", cwd=tmp_path), "dtype float16",
                     tmp_path / "e.json")
    expect_cli_error(run_cli("evaluate", good, "--dataset", "fmnist", cwd=tmp_path),
                     "the model has 4 classes, the data set has 10")


class _Payload:
    """Unpickling this runs open(marker, 'w'): the file appears if code runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_convert_imports_a_pt_state_dict_and_refuses_a_malicious_one(tmp_path):
    import json

    kwargs = json.dumps(META["arch_kwargs"])
    good_pt = tmp_path / "good.pt"
    torch.save({"state_dict": tiny_model().state_dict()}, good_pt)
    out = tmp_path / "c.safetensors"
    r = run_cli("convert", good_pt, "--arch", "resnet8", "--arch-kwargs", kwargs,
                "--n-samples", "12", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ck = checkpoint.load(out)
    assert ck.n_samples == 12 and all(torch.equal(v, tiny_model().state_dict()[k])
                                      for k, v in ck.state.items())
    # a pickle whose loading would run code: refused, and the payload never runs
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"w": _Payload(marker)}, evil)
    out2 = tmp_path / "e.safetensors"
    r = run_cli("convert", evil, "--arch", "resnet8", "--arch-kwargs", kwargs, "--out", out2,
                cwd=tmp_path)
    expect_cli_error(r, "refused or unreadable .pt file", out2)
    assert not marker.exists()
    # a state dict of the wrong architecture: the validation layer's one line
    torch.save(tiny_model(classes=3).state_dict(), tmp_path / "three.pt")
    r = run_cli("convert", tmp_path / "three.pt", "--arch", "resnet8", "--arch-kwargs", kwargs,
                "--out", out2, cwd=tmp_path)
    expect_cli_error(r, "key fc.weight has shape (3, ", out2)


def test_a_file_cannot_make_dmm_import_or_call_what_it_names(tmp_path):
    """Metadata is untrusted: `os:system` is never called; a module is imported only when the
    user trusts it (DMM_TRUST_MODULES)."""
    marker = tmp_path / "pwned"
    state = tiny_model().state_dict()
    evil = checkpoint.save(tmp_path / "evil.safetensors", state, arch="os:system",
                           arch_kwargs={"command": f"touch {marker}"}, n_samples=1)
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "sideeffect.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nimport torch\nNet = torch.nn.Linear\n")
    sneaky = checkpoint.save(tmp_path / "sneaky.safetensors", state, arch="sideeffect:Net",
                             arch_kwargs={}, n_samples=1)
    env = {"PYTHONPATH": str(tmp_path / "mods")}
    write_npz(tmp_path / "x.npz")
    for path, needle in ((evil, "is not an nn.Module class"),
                         (sneaky, "importing module 'sideeffect' would run its code")):
        for cmd in (("merge", path, path, "--refine", "none", "--out", tmp_path / "m.safetensors"),
                    ("evaluate", path, "--dataset", "npz", "--data-root", tmp_path / "x.npz")):
            r = run_cli(*cmd, cwd=tmp_path, env=env)
            assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
            assert not marker.exists(), cmd
        expect_cli_error(run_cli("merge", path, path, "--refine", "none", "--out",
                                 tmp_path / "m.safetensors", cwd=tmp_path, env=env), needle)
    with pytest.raises(DMMError, match="not an nn.Module class"):
        checkpoint.load(evil).build()
    assert not marker.exists()
