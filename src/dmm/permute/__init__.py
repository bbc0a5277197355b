"""Permutation symmetry: specs covering every key, weight matching, applying permutations."""

from dmm.permute.matching import align_to, weight_matching
from dmm.permute.spec import (
    PermutationSpec,
    apply_permutation,
    random_permutation,
    resnet_spec,
    spec_for,
)

__all__ = ["PermutationSpec", "align_to", "apply_permutation", "random_permutation",
           "resnet_spec", "spec_for", "weight_matching"]
