"""The validation layer: every way a checkpoint can misfit is one line naming file and key."""

from __future__ import annotations

import pytest
import torch

from conftest import expect_cli_error, run_cli, tiny_model
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
