import sys

import pytest
import torch
from torch import nn

from dmm import checkpoint
from dmm.data.augment import random_crop_flip
from dmm.errors import DMMError
from dmm.models import create
from dmm.statedict import KeyKind, classify_keys


def test_resnet18_quarter_width_size_and_shapes():
    m = create("resnet18", width=0.25, in_channels=1, num_classes=10)
    assert sum(p.numel() for p in m.parameters()) == 701_178
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    m3 = create("resnet18", width=0.5, in_channels=3, num_classes=100)
    assert m3(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(DMMError, match="unknown architecture"):
        create("vgg11")
    with pytest.raises(DMMError, match="cannot import"):
        create("no_such_pkg.mod:Net")


def test_keys_classified_by_module_type():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.running_var = nn.Parameter(torch.ones(3))  # a parameter, despite the name

    kinds = classify_keys(Odd())
    assert kinds["running_var"] is KeyKind.PARAM
    assert kinds["bn.running_var"] is KeyKind.BN_VAR
    assert kinds["bn.num_batches_tracked"] is KeyKind.BN_COUNT
    assert kinds["bn.weight"] is KeyKind.NORM_AFFINE


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    m = create("resnet8", width=0.25, num_classes=4, in_channels=1)
    m.train()
    m(torch.randn(8, 1, 16, 16))  # non-trivial running stats and counter
    path = checkpoint.save(tmp_path / "a.safetensors", m, arch="resnet8",
                           arch_kwargs={"width": 0.25, "num_classes": 4, "in_channels": 1},
                           n_samples=123, client_id=4, classes=list("abcd"))
    ck = checkpoint.load(path)
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


def test_random_crop_flip_keeps_shape_and_content():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8) + 1
    y = random_crop_flip(x, padding=2, generator=g)
    assert y.shape == x.shape
    # every non-zero value of a crop comes from its own image
    for i in range(2):
        vals = set(y[i][y[i] > 0].tolist())
        assert vals <= set(x[i].flatten().tolist())
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)


class UserNet(nn.Module):
    """A user's own architecture, reached as tests.test_models_checkpoint:UserNet."""

    def __init__(self, num_classes=4, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_user_class_by_import_path_trains(tiny_data):
    from dmm.federated import TrainConfig, train_local
    sys.modules.setdefault("tests.test_models_checkpoint", sys.modules[__name__])
    model = create(f"{__name__}:UserNet", num_classes=4, in_channels=1)
    assert isinstance(model, UserNet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_local(model, tiny_data.x_train, tiny_data.y_train, tiny_data.normalize,
                        TrainConfig(local_iters=3, batch_size=32, bf16=False),
                        generator=torch.Generator().manual_seed(0))
    assert stats["steps"] == 3
    assert not torch.equal(before["conv.weight"], model.state_dict()["conv.weight"])
