"""Tasks from the Hugging Face hub through flwr-datasets (needs internet, or a local dataset dir).

``task.name = "hf:ylecun/mnist"`` loads a dataset with an image (28x28 grayscale) or flat numeric
features and a ``label`` column; the model is picked from the input shape.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from fedshield.tasks.base import Split, Task
from fedshield.tasks.images import MNIST_PREPROCESSING, normalise_mnist
from fedshield.tasks.models import MnistCNN, mlp

from fedshield.errors import ConfigError


def _to_split(ds) -> Split:
    cols = ds.column_names
    label = "label" if "label" in cols else cols[-1]
    feature = "image" if "image" in cols else ("img" if "img" in cols else None)
    y = np.asarray(ds[label], dtype=np.int64)
    if feature is not None:
        pixels = np.stack([np.asarray(im, dtype=np.uint8) for im in ds[feature]])
        if pixels.shape[1:] != (28, 28):
            raise ConfigError(f"hf task: images of shape {pixels.shape[1:]} are not supported; "
                              "only 28x28 grayscale (MNIST-like) images are")
        return Split(normalise_mnist(pixels), y)
    x = np.stack([np.asarray(ds[c], dtype=np.float32) for c in cols if c != label], axis=1)
    return Split(x, y)


@cache
def load_hf(dataset: str) -> tuple[Split, Split]:
    """(train, test) of a hub dataset id or a local dataset folder (e.g. parquet files)."""
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    # One partition: fedshield partitions the train split itself, with the configured partitioner.
    fds = FederatedDataset(dataset=dataset, partitioners={"train": IidPartitioner(1)},
                           shuffle=False)
    train = _to_split(fds.load_partition(0, "train"))
    try:
        test = fds.load_split("test")
    except (KeyError, ValueError):
        raise ConfigError(f"hf:{dataset} has no 'test' split; fedshield evaluates on it") from None
    return train, _to_split(test)


def hf_task(dataset: str) -> Task:
    """A task for a flwr-datasets (Hugging Face) image or tabular dataset."""
    train, test = load_hf(dataset)
    shape = train.x.shape[1:]
    n_cls = int(max(train.y.max(), test.y.max())) + 1
    if len(shape) == 3:
        return Task(f"hf:{dataset}", shape, n_cls, lambda: MnistCNN(n_cls),
                    lambda: load_hf(dataset), MNIST_PREPROCESSING)
    return Task(f"hf:{dataset}", shape, n_cls, lambda: mlp(shape[0], n_cls, (64,)),
                lambda: load_hf(dataset), "raw numeric columns",
                tuple(f"f{i}" for i in range(shape[0])))
