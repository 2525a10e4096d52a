"""Where a client's data comes from: its simulation partition, or a partner's local path."""

from __future__ import annotations

import numpy as np
from fedshield.tasks import Split, Task, task_for
from fedshield.tasks.partition import cached_partitions
from flwr.app import Context

from fedshield.schema import Config

# Share of a client's data held out for client-side evaluation.
LOCAL_VAL_FRACTION = 0.1


def load_client_data(context: Context, cfg: Config) -> tuple[Task, Split, Split]:
    """(task, local train, local validation) for this node."""
    task = task_for(cfg.task)
    node = context.node_config
    if "data-path" in node:  # a partner site's own data
        from fedshield.tasks.local import load_local  # only partner sites need it

        data = load_local(str(node["data-path"]), task)
        key = int(node.get("partition-id", 0))
    else:
        pid, num = int(node["partition-id"]), int(node["num-partitions"])
        if num != cfg.federation.num_clients:
            from fedshield.errors import ConfigError

            raise ConfigError(f"this federation has {num} nodes but federation.num_clients = "
                              f"{cfg.federation.num_clients}; make them equal")
        train, _ = task.load()
        parts = cached_partitions(task.name, num, cfg.partition, cfg.seed)
        data, key = train.subset(parts[pid]), pid
    order = np.random.default_rng([cfg.seed, key]).permutation(len(data))
    n_val = int(len(data) * LOCAL_VAL_FRACTION) if len(data) >= 20 else 0
    return task, data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))
