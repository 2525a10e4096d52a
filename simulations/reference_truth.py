"""The yardstick for a simulation's drift reference: the exact pooled histograms of every
partition's local training data, on the reference's public edges (privacy/reference.py).

Only a simulator knows them; the runner writes them to the run folder (``reference_truth.json``)
before the run, and the hand-off reports how far the clients' noised reference is from them
(deployment/handoff.py). A real federation has no such file: the distance is "unknown" there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from fedshield.client.data import load_client_data
from fedshield.client.fit import DataLoader
from fedshield.privacy.reference import TRUTH_JSON, histograms, monitored_features, public_edges
from fedshield.tasks import task_for
from flwr.app import Context, RecordDict

from fedshield import schema


def pooled_truth(cfg: schema.Config, load_data: DataLoader = load_client_data) -> dict:
    """Exact feature and class counts summed over every simulated client's training data."""
    task = task_for(cfg.task)
    edges = public_edges(task.load()[1].x, task.input_shape, cfg.deployment.reference_bins)
    features = np.zeros((edges.shape[0], edges.shape[1] - 1))
    classes = np.zeros(task.num_classes)
    n = cfg.federation.num_clients
    for pid in range(n):
        context = Context(run_id=0, node_id=0, node_config={"partition-id": pid,
                                                             "num-partitions": n},
                          state=RecordDict(), run_config={})
        _, train, _ = load_data(context, cfg)
        features += histograms(monitored_features(train.x, task.input_shape), edges)
        classes += np.bincount(train.y, minlength=task.num_classes)
    return {"what": "simulation only: exact pooled counts of every partition's local training "
                    "data on the reference's public edges",
            "clients": n, "feature_counts": features.tolist(), "label_counts": classes.tolist()}


def write_pooled_truth(cfg: schema.Config, run_dir: Path,
                       load_data: DataLoader = load_client_data) -> Path | None:
    """Write ``reference_truth.json`` when the run builds its reference from the clients."""
    if cfg.deployment.reference_source != "clients":
        return None
    path = Path(run_dir) / TRUTH_JSON
    path.write_text(json.dumps(pooled_truth(cfg, load_data)))
    return path
