import numpy as np
import pytest
from fedshield.tasks import get_task
from fedshield.tasks.partition import partition_indices

from fedshield.errors import ConfigError
from fedshield.schema import PartitionConfig


@pytest.fixture(scope="module")
def labels():
    return get_task("digits").load()[0].y


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_partitions_are_deterministic_and_disjoint(labels, kind):
    cfg = PartitionConfig(kind=kind, alpha=0.5, min_partition_size=5)
    a = partition_indices(labels, 6, cfg, seed=3)
    b = partition_indices(labels, 6, cfg, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    joined = np.concatenate(a)
    assert len(np.unique(joined)) == len(joined)  # no example in two clients
    if kind != "shards":  # shards may drop an incomplete last shard
        assert len(joined) == len(labels)
    c = partition_indices(labels, 6, cfg, seed=4)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def _label_skew(labels, parts):
    """Mean total-variation distance between client label histograms and the global one."""
    glob = np.bincount(labels, minlength=10) / len(labels)
    return np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - glob).sum()
                    for p in parts])


def test_non_iid_partitions_are_skewed(labels):
    iid = partition_indices(labels, 5, PartitionConfig(kind="iid"), 0)
    dirichlet = partition_indices(labels, 5, PartitionConfig(kind="dirichlet", alpha=0.1,
                                                             min_partition_size=5), 0)
    shards = partition_indices(labels, 5, PartitionConfig(kind="shards", shards_per_client=2), 0)
    assert _label_skew(labels, iid) < 0.1
    assert _label_skew(labels, dirichlet) > 0.4
    assert _label_skew(labels, shards) > 0.4


def test_too_many_clients_is_a_config_error(labels):
    with pytest.raises(ConfigError, match="num_clients"):
        partition_indices(labels[:10], 20, PartitionConfig(kind="iid"), 0)
