"""Bring your own models: plain safetensors, .pt state dicts and transformers folders of a
user's class through `dmm merge`, `dmm convert`, `dmm evaluate`, `dmm inspect` and
`dmm.jobs.merge_files`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import expect_cli_error, make_dataset, run_cli, write_npz
from dmm.errors import DMMError
from dmm.sources import ModelSpec, read_models
from user_nets import TinyResNet

ARCH = "user_nets:TinyResNet"
KW = {"num_classes": 4, "in_channels": 1, "channels": 8}
SOURCE = ["--arch", ARCH, "--arch-kwargs", json.dumps(KW), "--input-shape", "1,16,16",
          "--mean", "0.3", "--std", "0.3"]
FAST = {"inversion": {"n_images": 16, "batch_size": 8, "iterations": 3, "bf16": False,
                      "compile": False},
        "distillation": {"steps": 2, "batch_size": 8, "bf16": False}}


def _train(seed: int) -> TinyResNet:
    """A user's client: a few SGD steps on two of the four classes of the tiny data."""
    torch.manual_seed(seed)
    m = TinyResNet(**KW)
    d = make_dataset(n_train=120, n_test=10, seed=seed)
    keep = torch.isin(d.y_train, torch.tensor([seed % 4, (seed + 1) % 4]))
    x, y = d.normalize(d.x_train[keep]), d.y_train[keep]
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    m.train()
    for i in range(5):
        b = slice(16 * i, 16 * i + 16)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x[b]), y[b]).backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    """Three clients as plain safetensors and as .pt state dicts, with a fast DMM config."""
    d = tmp_path_factory.mktemp("users")
    for k in range(3):
        state = _train(k).state_dict()
        save_file({n: t.contiguous() for n, t in state.items()}, str(d / f"client_{k}.safetensors"))
        torch.save(state, d / f"client_{k}.pt")
    (d / "fast.json").write_text(json.dumps(FAST))
    return d


def _plain(d, suffix=".safetensors"):
    return [d / f"client_{k}{suffix}" for k in range(3)]


def _loads_into_the_class(path):
    m = TinyResNet(**KW)
    state = load_file(str(path))
    m.load_state_dict(state, strict=True)
    ref = TinyResNet(**KW).state_dict()
    assert {k: v.dtype for k, v in state.items()} == {k: v.dtype for k, v in ref.items()}
    return m


def test_merge_plain_safetensors_of_a_users_class_with_dmm(users, tmp_path):
    out = tmp_path / "merged.safetensors"
    # Execute
    r = run_cli("merge", *_plain(users), *SOURCE, "--n-samples", "30,30,30", "--label-counts",
                "[[15,15,0,0],[0,15,15,0],[0,0,15,15]]", "--refine", "dmm", "--config",
                users / "fast.json", "--out", out, cwd=tmp_path)
    # Assert: the merged file loads into the user's class, strictly, with the same dtypes
    assert r.returncode == 0, r.stderr
    m = _loads_into_the_class(out)
    assert m(torch.zeros(2, 1, 16, 16)).shape == (2, 4)
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["weights"] == [30, 30, 30]
    # the histograms reached DMM: nothing estimated, the teacher check ran on them
    assert "teacher_check" in rep["report"]["distillation"]
    assert "label_counts_estimated" not in rep["report"]["distillation"]
    assert not any("label histograms" in n for n in rep["report"]["notes"])
    assert (tmp_path / "merged_pseudo.png").stat().st_size > 0


def test_pt_inputs_convert_and_the_library_call_give_the_same_merge(users, tmp_path):
    from dmm.jobs import merge_files

    # Execute: .pt inputs from the command line; the library call on the safetensors inputs;
    # .pt and plain safetensors through convert, then merged as dmm checkpoints
    a = tmp_path / "a.safetensors"
    r = run_cli("merge", *_plain(users, ".pt"), *SOURCE, "--weights", "uniform", "--refine",
                "none", "--out", a, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    b = merge_files(_plain(users), tmp_path / "b.safetensors", refine="none",
                    weights="uniform", spec=ModelSpec(arch=ARCH, arch_kwargs=KW), progress=False)
    conv = []
    for k, src in enumerate(_plain(users, ".pt")[:2] + _plain(users)[2:]):
        dst = tmp_path / f"c{k}.safetensors"
        r = run_cli("convert", src, "--arch", ARCH, "--arch-kwargs", json.dumps(KW),
                    "--n-samples", "10", "--out", dst, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        conv.append(dst)
    c = tmp_path / "c.safetensors"
    r = run_cli("merge", *conv, "--refine", "none", "--out", c, cwd=tmp_path,
                env={"DMM_TRUST_MODULES": "user_nets"})
    assert r.returncode == 0, r.stderr
    # Assert: one merge, three routes; every output loads into the user's class
    sa, sb, sc = (load_file(str(p)) for p in (a, b.path, c))
    for k in sa:
        assert torch.equal(sa[k], sb[k]) and torch.equal(sa[k], sc[k]), k
    _loads_into_the_class(c)
    assert b.streamed and b.report is None


def test_evaluate_and_inspect_take_plain_files(users, tmp_path):
    npz = write_npz(tmp_path / "tiny.npz")
    r = run_cli("evaluate", *_plain(users), "--dataset", "npz", "--data-root", npz,
                "--arch", ARCH, "--arch-kwargs", json.dumps(KW), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("%") == 3
    r = run_cli("inspect", users, "--arch", ARCH, "--arch-kwargs", json.dumps(KW),
                "--chart", tmp_path / "div.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "div.png").stat().st_size > 0


def test_a_sidecar_gives_what_a_plain_file_lacks(users, tmp_path):
    # Prepare: the plain files, each with a sidecar
    for k, p in enumerate(_plain(users)):
        (tmp_path / p.name).write_bytes(p.read_bytes())
        (tmp_path / f"client_{k}.json").write_text(json.dumps(
            {"arch": ARCH, "arch_kwargs": KW, "n_samples": 10 + k}))
    # Execute
    cks = read_models([tmp_path], ModelSpec())
    # Assert: the sidecar filled the metadata; the caller's spec overrides it
    assert [c.n_samples for c in cks] == [10, 11, 12] and cks[0].arch == ARCH
    assert [c.n_samples for c in read_models([tmp_path], ModelSpec(n_samples=[1, 2, 3]))] == \
        [1, 2, 3]
    (tmp_path / "client_0.json").write_text(json.dumps({"n_sample": 3}))
    with pytest.raises(DMMError, match="unknown sidecar key"):
        read_models([tmp_path])


@pytest.mark.parametrize("extra, needle", [
    (["--arch", "no_such_module:Net"], "cannot import module 'no_such_module'"),
    (["--arch", "user_nets:NOT_A_CLASS"], "is not an nn.Module class"),
    (["--arch", ARCH, "--arch-kwargs", '{"bogus": 1}'], "rejected arguments"),
    (["--arch", ARCH, "--arch-kwargs", '{"num_classes": 7}'], "classifier.weight has shape"),
    (["--arch", ARCH, "--input-shape", "1,16"], "three positive integers"),
    (["--arch", ARCH, "--input-shape", "1,16,16", "--mean", "0.5,0.5", "--std", "0.2,0.2"],
     "has 1 channels"),
    (["--arch", ARCH, "--mean", "0.5", "--std", "0"], "std must be > 0"),
    (["--arch", ARCH, "--mean", "0.5"], "mean and std together"),
    ([], "names no architecture"),
])
def test_bad_input_of_a_users_model_is_one_line_and_no_output(users, tmp_path, extra, needle):
    out = tmp_path / "m.safetensors"
    kw = [] if "--arch-kwargs" in extra or not extra else ["--arch-kwargs", json.dumps(KW)]
    r = run_cli("merge", *_plain(users), *extra, *kw, "--weights", "uniform", "--refine",
                "none", "--out", out, cwd=tmp_path)
    expect_cli_error(r, needle, out)
    assert not out.with_suffix(".json").exists()


def test_a_state_dict_that_does_not_fit_names_missing_and_unexpected_keys(users, tmp_path):
    state = load_file(str(_plain(users)[0]))
    state["extra.weight"] = state.pop("classifier.bias")
    save_file(state, str(tmp_path / "bad.safetensors"))
    out = tmp_path / "m.safetensors"
    r = run_cli("merge", tmp_path / "bad.safetensors", *_plain(users)[1:], "--arch", ARCH,
                "--arch-kwargs", json.dumps(KW), "--weights", "uniform", "--refine", "none",
                "--out", out, cwd=tmp_path)
    expect_cli_error(r, "key classifier.bias is missing", out)
    assert "unexpected key extra.weight" in r.stderr


def test_train_with_a_bad_data_set_leaves_no_folder(tmp_path):
    out = tmp_path / "D"
    expect_cli_error(run_cli("train", "--dataset", "no-such-data", "--out", out, cwd=tmp_path),
                     "no-such-data", out)
    assert not out.exists()


def _hf_folders(root, n=3):
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                       layer_type="basic", num_labels=4)
    out = []
    for k in range(n):
        torch.manual_seed(k)
        m = ResNetForImageClassification(cfg).eval()
        with torch.no_grad():  # distinct BN statistics per client
            m.train()(pixel_values=torch.randn(8, 1, 16, 16) + k)
        m.save_pretrained(str(root / f"hf_{k}"))
        out.append(root / f"hf_{k}")
    return out


def test_transformers_folders_merge_into_a_folder_that_from_pretrained_loads(users, tmp_path):
    from transformers import ResNetForImageClassification

    folders = _hf_folders(tmp_path)
    out = tmp_path / "merged_hf"
    # Execute
    r = run_cli("merge", *folders, "--input-shape", "1,16,16", "--mean", "0.3", "--std", "0.3",
                "--n-samples", "10,20,30", "--refine", "dmm", "--config", users / "fast.json",
                "--out", out, cwd=tmp_path)
    # Assert
    assert r.returncode == 0, r.stderr
    m = ResNetForImageClassification.from_pretrained(str(out), local_files_only=True).eval()
    assert m(pixel_values=torch.zeros(2, 1, 16, 16)).logits.shape == (2, 4)
    assert json.loads((out / "dmm.json").read_text())["merge"]["refine"] == "dmm"
    src = ResNetForImageClassification.from_pretrained(str(folders[0])).state_dict()
    assert set(m.state_dict()) == set(src)
    # a .safetensors --out for transformers inputs is one line, nothing written
    expect_cli_error(run_cli("merge", *folders, "--weights", "uniform", "--refine", "none",
                             "--out", tmp_path / "x.safetensors", cwd=tmp_path),
                     "written back as a folder", tmp_path / "x.safetensors")
