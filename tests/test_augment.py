"""dmm.data.augment: the random crop-and-flip augmentation."""

import torch

from dmm.data.augment import random_crop_flip


def test_random_crop_flip_keeps_shape_and_content():
    # Prepare
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8) + 1
    # Execute
    y = random_crop_flip(x, padding=2, generator=g)
    # Assert
    assert y.shape == x.shape
    # every non-zero value of a crop comes from its own image
    for i in range(2):
        vals = set(y[i][y[i] > 0].tolist())
        assert vals <= set(x[i].flatten().tolist())
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
