import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tests.config_support import neutral_config

# Kernel-independence checks (issue 19): `FEDSHIELD_TEST_TORCH_THREADS=1 make test` runs the suite
# with one intra-op thread (torch picks its CPU count otherwise); OPENBLAS_CORETYPE is set outside.
if os.environ.get("FEDSHIELD_TEST_TORCH_THREADS"):
    import torch

    torch.set_num_threads(int(os.environ["FEDSHIELD_TEST_TORCH_THREADS"]))


@pytest.fixture
def small_cfg(tmp_path):
    """A fast real-data federation: sklearn digits, 5 clients, non-IID."""

    def make(**sections):
        data = {"name": "t", "seed": 0, "output_dir": str(tmp_path / "runs"),
                "task": {"name": "digits"},
                "federation": {"num_clients": 5, "rounds": 3},
                "partition": {"kind": "dirichlet", "alpha": 1.0},
                "train": {"lr": 0.1, "batch_size": 16},
                "privacy": {"ledger_dir": str(tmp_path / "ledgers")},
                "deployment": {"handoff": False}}
        for key, value in sections.items():
            if isinstance(value, dict):
                data.setdefault(key, {}).update(value)
            else:
                data[key] = value
        return neutral_config(data)

    return make


@pytest.fixture
def nan_client(monkeypatch):
    """Client 2 of 5 holds a NaN feature: the runner's ClientApps are patched accordingly."""
    import fedshield.simulations.runner as runner
    import numpy as np
    from fedshield.client.app import make_client_app
    from fedshield.client.data import load_client_data
    from fedshield.tasks import Split

    def broken_loader(context, cfg):
        task, train, val = load_client_data(context, cfg)
        if int(context.node_config["partition-id"]) == 2:
            x = train.x.copy()
            x[0, 0] = np.nan
            train = Split(x, train.y)
        return task, train, val

    apps = {pid: make_client_app(broken_loader if pid == 2 else load_client_data)
            for pid in range(5)}
    monkeypatch.setattr(runner, "make_client_app", lambda: apps.pop(min(apps)))
    return 2
