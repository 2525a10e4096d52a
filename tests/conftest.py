import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from fedshield import config as fcfg  # noqa: E402


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
        return fcfg.from_dict(data)

    return make
