"""dmm.statedict: classifying state-dict keys by the module that owns them."""

import torch
from torch import nn

from dmm.statedict import KeyKind, classify_keys


def test_keys_classified_by_module_type():
    # Prepare
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.running_var = nn.Parameter(torch.ones(3))  # a parameter, despite the name

    # Execute
    kinds = classify_keys(Odd())
    # Assert
    assert kinds["running_var"] is KeyKind.PARAM
    assert kinds["bn.running_var"] is KeyKind.BN_VAR
    assert kinds["bn.num_batches_tracked"] is KeyKind.BN_COUNT
    assert kinds["bn.weight"] is KeyKind.NORM_AFFINE
