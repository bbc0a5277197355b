"""Seeded Dirichlet label partitioning (the non-IID split used by the paper and most FL work).

Per class c, proportions p_c ~ Dir(alpha * 1_K) split that class's samples over K clients; the
whole draw is repeated until every client holds at least `min_size` samples (Hsu et al., 2019,
arXiv:1909.06335; the same recipe as the DMM authors' harness).

A public slice (`public` > 0) is withheld first: a fixed draw of that many training samples
(seeded by `PUBLIC_SEED`, the same for every split seed), which no client holds; the server may
train on it (the bench's pretrained start W_0). The clients split the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dmm.config import check_fields
from dmm.errors import DMMError

PUBLIC_SEED = 20_260  # the public slice's draw: one fixed slice for every split seed


@dataclass(frozen=True)
class PartitionConfig:
    """How the training data are split over the clients: Dirichlet `alpha` over classes,
    `clients` parts of at least `min_size` samples, drawn from `seed`. Checked when made; the
    one owner of these settings for `dmm train`, the bench and the Flower clients."""

    alpha: float
    clients: int
    min_size: int = 10
    seed: int = 0
    public: int = 0      # training samples withheld from the split (the server's public slice)

    def __post_init__(self) -> None:
        check_fields(self, "partition")
        if not self.alpha > 0:
            raise DMMError(f"alpha must be > 0, got {self.alpha}")
        if self.clients < 1:
            raise DMMError(f"clients must be >= 1, got {self.clients}")
        if self.min_size < 1:
            raise DMMError(f"min_size must be >= 1 (a client without samples cannot train), "
                           f"got {self.min_size}")
        if self.public < 0:
            raise DMMError(f"public (samples withheld from the split) must be >= 0, "
                           f"got {self.public}")

    def to_dict(self) -> dict:
        return asdict(self)

    def split(self, data) -> Partition:
        """The partition of `data`'s training labels (an ImageDataset or any object with
        `y_train` and `num_classes`)."""
        labels = np.asarray(data.y_train)
        if not self.public:
            return dirichlet_partition(labels, self.clients, self.alpha, seed=self.seed,
                                       min_size=self.min_size, num_classes=data.num_classes)
        public = public_slice(len(labels), self.public)
        rest = np.setdiff1d(np.arange(len(labels)), public)
        part = dirichlet_partition(labels[rest], self.clients, self.alpha, seed=self.seed,
                                   min_size=self.min_size, num_classes=data.num_classes)
        part.indices = [rest[i] for i in part.indices]  # back to indices of the training set
        part.public = public
        return part


def public_slice(n: int, size: int) -> np.ndarray:
    """The sorted indices of the public slice: `size` of `n` training samples, drawn uniformly
    with `PUBLIC_SEED` (a function of n and size only, never of a split's seed)."""
    if not 0 < size < n:
        raise DMMError(f"a public slice of {size} samples needs a training set larger than "
                       f"that, this one has {n}")
    return np.sort(np.random.default_rng(PUBLIC_SEED).permutation(n)[:size])


@dataclass
class Partition:
    """Client index lists and the (K, C) label-count table."""

    indices: list[np.ndarray]
    counts: np.ndarray
    alpha: float
    seed: int
    public: np.ndarray | None = None   # the withheld public slice (training-set indices)

    @property
    def sizes(self) -> list[int]:
        return [len(i) for i in self.indices]

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "seed": self.seed,
            "sizes": self.sizes,
            "label_counts": self.counts.tolist(),
            **({"public": len(self.public)} if self.public is not None else {}),
        }


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    *,
    seed: int,
    min_size: int = 10,
    num_classes: int | None = None,
    max_draws: int = 10_000,
) -> Partition:
    """Split sample indices over clients with class proportions drawn from Dir(alpha).

    Returns a Partition whose index lists cover every sample exactly once.
    """
    labels = np.asarray(labels).astype(np.int64)
    n = len(labels)
    if not alpha > 0:
        raise DMMError(f"alpha must be > 0, got {alpha}")
    if num_clients < 1:
        raise DMMError(f"clients must be >= 1, got {num_clients}")
    if num_clients * min_size > n:
        raise DMMError(
            f"{num_clients} clients x at least {min_size} samples need {num_clients * min_size} "
            f"samples, but the data set has {n}"
        )
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    for _ in range(max_draws):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        indices = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(i) for i in indices) >= min_size:
            counts = np.stack([np.bincount(labels[i], minlength=num_classes) for i in indices])
            return Partition(indices, counts, float(alpha), seed)
    raise DMMError(
        f"no Dirichlet draw gave every one of {num_clients} clients {min_size} samples in "
        f"{max_draws} tries (alpha {alpha}); lower the minimum or the number of clients"
    )
