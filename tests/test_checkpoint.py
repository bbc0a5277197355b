"""dmm.checkpoint: saving and loading .safetensors checkpoints with their metadata."""

import pytest
import torch

from dmm import checkpoint
from dmm.errors import DMMError
from dmm.models import create


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    # Prepare
    torch.manual_seed(0)
    m = create("resnet8", width=0.25, num_classes=4, in_channels=1)
    m.train()
    m(torch.randn(8, 1, 16, 16))  # non-trivial running stats and counter
    # Execute
    path = checkpoint.save(tmp_path / "a.safetensors", m, arch="resnet8",
                           arch_kwargs={"width": 0.25, "num_classes": 4, "in_channels": 1},
                           n_samples=123, client_id=4, classes=list("abcd"))
    ck = checkpoint.load(path)
    # Assert
    assert ck.meta["n_samples"] == 123 and ck.meta["client_id"] == 4
    ref = m.state_dict()
    assert set(ck.state) == set(ref)
    for k, v in ref.items():
        assert v.dtype == ck.state[k].dtype and torch.equal(v, ck.state[k]), k
    assert int(ck.state["bn1.num_batches_tracked"]) == 1
    rebuilt = ck.build()
    x = torch.randn(3, 1, 16, 16)
    m.eval()
    assert torch.equal(rebuilt.eval()(x), m(x))
    assert not list(tmp_path.glob(".*.tmp"))


def test_checkpoint_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(DMMError, match="bad.safetensors"):
        checkpoint.load(bad)
    with pytest.raises(DMMError, match="no such"):
        checkpoint.load(tmp_path / "missing.safetensors")
