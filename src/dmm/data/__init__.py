"""Datasets, partitioning and batch augmentation.

Every dataset is held in memory as uint8 images (N, C, H, W) plus int64 labels; normalization
happens per batch (`ImageDataset.normalize`) so the stored arrays stay small and exact.
"""

from dmm.data.base import ImageDataset, available_datasets, load_dataset, register_dataset
from dmm.data.partition import Partition, PartitionConfig, dirichlet_partition

# importing registers the built-in image data sets (the image + text ones register from
# dmm.multimodal, which `import dmm` imports)
from dmm.data import cifar, fmnist, npz, party  # noqa: E402, F401  isort: skip

__all__ = [
    "ImageDataset",
    "Partition",
    "PartitionConfig",
    "available_datasets",
    "dirichlet_partition",
    "load_dataset",
    "register_dataset",
]
