import numpy as np
import pytest

from dmm.data import dirichlet_partition
from dmm.errors import DMMError

LABELS = np.repeat(np.arange(10), 500)


def test_partition_covers_every_index_once_and_honours_minimum():
    p = dirichlet_partition(LABELS, 10, 0.1, seed=3, min_size=20)
    allidx = np.concatenate(p.indices)
    assert len(allidx) == len(LABELS)
    assert np.array_equal(np.sort(allidx), np.arange(len(LABELS)))
    assert min(p.sizes) >= 20
    assert p.counts.sum() == len(LABELS)
    for k, idx in enumerate(p.indices):
        assert np.array_equal(np.bincount(LABELS[idx], minlength=10), p.counts[k])


def test_partition_is_seeded():
    a = dirichlet_partition(LABELS, 8, 0.5, seed=1)
    b = dirichlet_partition(LABELS, 8, 0.5, seed=1)
    c = dirichlet_partition(LABELS, 8, 0.5, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.indices, c.indices, strict=True))


def test_large_alpha_is_near_uniform_and_tiny_alpha_near_single_class():
    iid = dirichlet_partition(LABELS, 5, 1000.0, seed=0)
    share = iid.counts / iid.counts.sum(1, keepdims=True)
    assert np.abs(share - 0.1).max() < 0.03
    skew = dirichlet_partition(LABELS, 10, 0.01, seed=0)
    top_share = skew.counts.max(1) / skew.counts.sum(1)
    assert np.median(top_share) > 0.9


@pytest.mark.parametrize("kwargs, msg", [
    ({"num_clients": 10, "alpha": 0.0}, "alpha"),
    ({"num_clients": 10, "alpha": -1.0}, "alpha"),
    ({"num_clients": 0, "alpha": 0.5}, "clients"),
    ({"num_clients": 1000, "alpha": 0.5}, "samples"),
])
def test_partition_rejects_bad_arguments(kwargs, msg):
    with pytest.raises(DMMError, match=msg):
        dirichlet_partition(LABELS, seed=0, **kwargs)


# ---- PartitionConfig: the one owner of alpha, clients, min_size ------------------------------

@pytest.mark.parametrize("kw, needle", [
    ({"alpha": 0, "clients": 3}, "alpha must be > 0"),
    ({"alpha": float("inf"), "clients": 3}, "alpha must be a finite number"),
    ({"alpha": 0.5, "clients": 0}, "clients must be >= 1"),
    ({"alpha": 0.5, "clients": 3, "min_size": 0}, "min_size must be >= 1"),
    ({"alpha": 0.5, "clients": "3"}, "clients must be an integer"),
])
def test_partition_config_rejects_a_bad_setting_when_made(kw, needle):
    from dmm.data import PartitionConfig

    with pytest.raises(DMMError, match=needle):
        PartitionConfig(**kw)


def test_partition_config_split_is_the_seeded_dirichlet_partition(tiny_data):
    from dmm.data import PartitionConfig, dirichlet_partition

    # Prepare
    cfg = PartitionConfig(alpha=0.3, clients=4, min_size=5, seed=7)
    # Execute
    part = cfg.split(tiny_data)
    ref = dirichlet_partition(tiny_data.y_train.numpy(), 4, 0.3, seed=7, min_size=5,
                              num_classes=tiny_data.num_classes)
    # Assert
    assert all((a == b).all() for a, b in zip(part.indices, ref.indices, strict=True))
    assert PartitionConfig(**cfg.to_dict()) == cfg


def test_the_public_slice_is_withheld_from_every_client_and_fixed_across_seeds(tiny_data):
    """The server's public slice (the bench's pretrained start W_0 trains on it): no client
    holds a sample of it, the clients split all the rest, and it is one slice for every split
    seed and alpha."""
    from dmm.data import PartitionConfig

    # Prepare
    n = len(tiny_data.y_train)
    labels = tiny_data.y_train.numpy()
    # Execute
    parts = [PartitionConfig(alpha=a, clients=3, min_size=5, seed=s, public=20).split(tiny_data)
             for a, s in ((0.5, 0), (0.5, 1), (0.01, 2))]
    # Assert
    for part in parts:
        public = set(part.public.tolist())
        held = [set(i.tolist()) for i in part.indices]
        assert len(public) == 20 and all(not (public & h) for h in held)
        assert set().union(public, *held) == set(range(n))
        assert sum(len(h) for h in held) == n - 20   # every other sample exactly once
        for i, c in zip(part.indices, part.counts, strict=True):
            assert (np.bincount(labels[i], minlength=tiny_data.num_classes) == c).all()
        assert part.to_dict()["public"] == 20
    assert all((p.public == parts[0].public).all() for p in parts)
    assert not all(np.array_equal(a, b)
                   for a, b in zip(parts[0].indices, parts[1].indices, strict=True))
    # no slice: the split is what it always was, and a slice that leaves nothing is one error
    assert PartitionConfig(alpha=0.5, clients=3, min_size=5).split(tiny_data).public is None
    with pytest.raises(DMMError, match="public slice of"):
        PartitionConfig(alpha=0.5, clients=3, public=n).split(tiny_data)
    with pytest.raises(DMMError, match="public .* must be >= 0"):
        PartitionConfig(alpha=0.5, clients=3, public=-1)
