"""dmm.models: the architecture registry, built-in ResNets and user classes by import path."""

import sys

import pytest
import torch
from torch import nn

from dmm.errors import DMMError
from dmm.models import create


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


class UserNet(nn.Module):
    """A user's own architecture, reached as tests.test_models:UserNet."""

    def __init__(self, num_classes=4, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_user_class_by_import_path_trains(tiny_data):
    from dmm.federated import TrainConfig, train_local
    # Prepare
    sys.modules.setdefault("tests.test_models", sys.modules[__name__])
    model = create(f"{__name__}:UserNet", num_classes=4, in_channels=1)
    assert isinstance(model, UserNet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Execute
    stats = train_local(model, tiny_data.x_train, tiny_data.y_train, tiny_data.normalize,
                        TrainConfig(local_iters=3, batch_size=32, bf16=False),
                        generator=torch.Generator().manual_seed(0))
    # Assert
    assert stats["steps"] == 3
    assert not torch.equal(before["conv.weight"], model.state_dict()["conv.weight"])
