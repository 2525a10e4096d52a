"""Client partitions from flwr-datasets partitioners (IID, Dirichlet, pathological shards).

The partitioners run on a local ``datasets.Dataset`` of labels, so the same code serves every task
and works offline. The result is a list of index arrays into the task's train split; a fixed seed
gives identical partitions in every process (server, clients, a later resume).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fedshield.errors import ConfigError
from fedshield.schema import PartitionConfig


def partition_indices(labels: np.ndarray, num_partitions: int, cfg: PartitionConfig,
                      seed: int) -> list[np.ndarray]:
    """Index arrays into the train split, one per client, by ``cfg.kind`` (iid, dirichlet,
    shards)."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    datasets.disable_progress_bars()
    if num_partitions > len(labels):
        raise ConfigError(f"federation.num_clients = {num_partitions} exceeds the "
                          f"{len(labels)} training examples; use fewer clients")
    # IidPartitioner shards contiguously, so shuffle first (seeded) to make it IID.
    order = np.random.default_rng(seed).permutation(len(labels)) if cfg.kind == "iid" \
        else np.arange(len(labels))
    ds = datasets.Dataset.from_dict({"label": labels[order].tolist(), "idx": order.tolist()})
    if cfg.kind == "iid":
        partitioner = IidPartitioner(num_partitions)
    elif cfg.kind == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions, "label", cfg.alpha,
                                           min_partition_size=cfg.min_partition_size,
                                           self_balancing=True, seed=seed)
    else:
        partitioner = ShardPartitioner(num_partitions, "label",
                                       num_shards_per_partition=cfg.shards_per_client, seed=seed)
    partitioner.dataset = ds
    try:
        return [np.sort(np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64))
                for i in range(num_partitions)]
    except ValueError as exc:  # e.g. Dirichlet cannot meet min_partition_size
        raise ConfigError(f"partition.{cfg.kind}: {exc} (try a larger partition.alpha, fewer "
                          "clients or a smaller partition.min_partition_size)") from None


@lru_cache(maxsize=8)
def cached_partitions(task_name: str, num_partitions: int, cfg: PartitionConfig,
                      seed: int) -> tuple[np.ndarray, ...]:
    """``partition_indices`` of a task's train labels, computed once per process."""
    from fedshield.tasks import get_task

    train, _ = get_task(task_name).load()
    return tuple(partition_indices(train.y, num_partitions, cfg, seed))
