"""Where a client's data comes from: its simulation partition, or a partner's local path."""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
from fedshield.tasks import Split, Task, task_for
from fedshield.tasks.partition import cached_partitions
from flwr.app import Context

from fedshield.schema import Config

# Share of a client's data held out for client-side evaluation.
LOCAL_VAL_FRACTION = 0.1


def load_client_data(context: Context, cfg: Config) -> tuple[Task, Split, Split]:
    """(task, local train, local validation) for this node.

    With ``cache-dir`` in the node config (the site kit sets it) the splits come from the site's
    data cache when its source is unchanged (client/data_cache.py): Flower starts a new process per
    message, and parsing the data again every round was most of a client's time."""
    task = task_for(cfg.task)
    node = context.node_config
    if "cache-dir" not in node:
        return (task, *_splits(task, node, cfg))
    from fedshield.client import data_cache

    loaded = data_cache.cached_splits(*_recipe(task, node, cfg),
                                      Path(str(node["cache-dir"])).expanduser(),
                                      lambda: _splits(task, node, cfg))
    return task, loaded.train, loaded.val


def _splits(task: Task, node, cfg: Config) -> tuple[Split, Split]:
    """(train, validation) from the node's own data or its simulation partition."""
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
        return _partition_splits(task, pid, num, cfg.partition, cfg.seed)
    return _local_splits(data, key, cfg.seed)


# A simulation partition's splits, per process: a simulation worker serves its clients each
# round (train and evaluate), and copying a client's rows out of the task's arrays again for
# each message was ~0.5 s of every message on the default run. Nothing writes into a Split's
# arrays (data attacks copy before poisoning: simulations/attacks/data_poisoning.py).
# Bounded in bytes, least recently used out first: memory grows with the clients a worker
# serves, not with the clients that exist (a 1000-client federation must not end up holding a
# copy of the whole dataset in every worker; tests/test_memory_scale.py).
PARTITION_SPLITS_BYTES = 1 << 30
_PARTITION_SPLITS: OrderedDict[tuple, tuple[np.ndarray, tuple[Split, Split]]] = OrderedDict()


def _split_bytes(splits: tuple[Split, Split]) -> int:
    return sum(s.x.nbytes + s.y.nbytes for s in splits)


def _partition_splits(task: Task, pid: int, num: int, partition, seed: int,
                      budget: int | None = None) -> tuple[Split, Split]:
    train, _ = task.load()  # the task's own memo for real tasks: the same arrays every call
    key = (task.name, pid, num, partition, seed)
    held = _PARTITION_SPLITS.get(key)
    # Keyed on the very arrays too (kept alive in the entry, so their identity stays unique):
    # a task whose loader returns other data (a test's, a reloaded one) is split afresh.
    if held is not None and held[0] is train.x:
        _PARTITION_SPLITS.move_to_end(key)
        return held[1]
    parts = cached_partitions(task.name, num, partition, seed)
    splits = _local_splits(train.subset(parts[pid]), pid, seed)
    _PARTITION_SPLITS[key] = (train.x, splits)
    _PARTITION_SPLITS.move_to_end(key)
    limit = PARTITION_SPLITS_BYTES if budget is None else budget
    while len(_PARTITION_SPLITS) > 1 and sum(
            _split_bytes(v[1]) for v in _PARTITION_SPLITS.values()) > limit:
        _PARTITION_SPLITS.popitem(last=False)  # the least recently used
    return splits


def _local_splits(data: Split, key: int, seed: int) -> tuple[Split, Split]:
    order = np.random.default_rng([seed, key]).permutation(len(data))
    n_val = int(len(data) * LOCAL_VAL_FRACTION) if len(data) >= 20 else 0
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))


def _recipe(task: Task, node, cfg: Config) -> tuple[str, list[Path], Path | None]:
    """What decides :func:`_splits` besides the source's bytes, the source files and their root
    (no files for a simulation partition: its library dataset is named by the recipe)."""
    import inspect

    from fedshield.client import data_cache
    from fedshield.tasks import local

    loader = inspect.getmodule(task.load)
    parts: dict[str, object] = {
        "task": task.name, "preprocessing": task.preprocessing, "shape": task.input_shape,
        "seed": cfg.seed, "val": LOCAL_VAL_FRACTION,
        "code": data_cache.code_hash(sys.modules[__name__], local, loader)}
    files: list[Path] = []
    root = None
    if "data-path" in node:
        root = Path(str(node["data-path"])).expanduser().resolve()
        files = data_cache.source_files(root)
        parts.update(path=str(root), key=int(node.get("partition-id", 0)))
    else:
        parts.update(partition=repr(cfg.partition), key=int(node["partition-id"]),
                     num=int(node["num-partitions"]), clients=cfg.federation.num_clients)
    return json.dumps(parts, sort_keys=True, default=str), files, root
