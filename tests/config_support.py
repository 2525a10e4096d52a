"""Configs for tests on a neutral base: DP off, FedAvg, the task's default model, no gates.

``Config()`` is configs/default.toml (DP MNIST with nnm+cclip and a hand-off gate). Most tests
build a small federation from a few keys and mean "everything else off", which is what the schema
defaulted to before its defaults became configs/default.toml's; ``neutral_config`` keeps that
meaning, so those tests assert what they always did.
"""

from __future__ import annotations

from typing import Any

from fedshield import validation
from fedshield.schema import Config

# Where configs/default.toml (Config()) turns a feature on or picks a value for full MNIST.
NEUTRAL: dict[str, dict[str, Any]] = {
    # Full MNIST with its default model, not the ScatterNet features (computed once per machine).
    "task": {"name": "mnist", "model": ""},
    # workers: the clients in the test's process (monkeypatched apps reach them; no spawn cost)
    "federation": {"rounds": 5, "fraction_evaluate": 0.0, "workers": 1},
    "train": {"lr": 0.05, "momentum": 0.9, "batch_size": 32},
    "privacy": {"enabled": False, "target_epsilon": 0.0, "max_epsilon": 0.0},
    "aggregation": {"rule": "fedavg"},
    "deployment": {"min_accuracy": 0.0, "max_epsilon": 0.0, "reference_source": "server"},
    # Tests leave no MLflow run behind (in the cwd's store) unless they test tracking.
    "tracking": {"enabled": False},
}
NEUTRAL_NAME = "run"


def neutral(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` over the neutral base (sections merged key by key; ``data`` wins)."""
    out: dict[str, Any] = {"name": NEUTRAL_NAME, **{k: dict(v) for k, v in NEUTRAL.items()}}
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def neutral_config(data: dict[str, Any]) -> Config:
    """``validation.from_dict`` of ``data`` over the neutral base."""
    return validation.from_dict(neutral(data))
