"""Builds small real run folders (the lead's hand-off contract) for the deployment tests."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import torch
from fedshield.tasks import evaluate, get_task
from safetensors.torch import save_file

from fedshield import configio
from tests.config_support import neutral_config


@cache
def trained_state(task_name: str, epochs: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Centrally trained weights (a few seconds) standing in for the federated global model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small MLPs: faster, and fair to parallel test runs on 2 cores
    try:
        return _train(task_name, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train(task_name: str, epochs: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    task = get_task(task_name)
    train, _ = task.load()
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(256):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_run_dir(root: Path, task_name: str, *, epsilon_max: float = 3.0, privacy: bool = True,
                 rounds: int = 3, robustness: dict | None = None, epochs: int = 4,
                 status: str | None = "completed", reproducible_noise: bool | None = None,
                 noise_used: list[float] | None = None, attack: dict | str | None = None) -> Path:
    """A run folder as the ServerApp writes it; weights saved with Opacus' ``_module.`` prefix.

    ``status``/``reproducible_noise``/``noise_used``/``attack`` follow the summary contract of
    the server and privacy engineers (None: the key is absent, as in older runs)."""
    task = get_task(task_name)
    state = trained_state(task_name, epochs)
    model = task.build_model()
    model.load_state_dict(state)
    final = evaluate(model, task.load()[1])
    run = root / f"{task_name}-run"
    run.mkdir(parents=True, exist_ok=True)
    cfg = neutral_config({"name": f"test-{task_name}", "task": {"name": task_name},
                             "federation": {"rounds": rounds, "num_clients": 4}})
    (run / "config.toml").write_text(configio.to_toml(cfg))
    with open(run / "metrics.jsonl", "w") as fh:
        for r in range(1, rounds + 1):
            acc = final["accuracy"] * (0.8 + 0.2 * r / rounds)
            fh.write(json.dumps({"round": r, "accuracy": acc,
                                 "loss": final["loss"] + (rounds - r) * 0.1,
                                 "seconds": 1.5, "epsilon_max": epsilon_max * r / rounds,
                                 "epsilon_mean": 0.8 * epsilon_max * r / rounds,
                                 "rejected": {}, "quarantined": []}) + "\n")
    summary = {
        "name": cfg.name, "task": task_name, "rounds": rounds, "num_clients": 4,
        "strategy": "fedavg", "seed": 0,
        "attack": attack if attack is not None else {"name": "none"},
        "final": final, "best": {"round": rounds, "accuracy": final["accuracy"]},
        "privacy": {"enabled": privacy, "accountant": "prv", "delta": 1e-5,
                    "noise_multiplier": 1.1 if privacy else 0.0, "max_grad_norm": 1.0,
                    "epsilon_max": epsilon_max if privacy else None,
                    "epsilon_mean": 0.8 * epsilon_max if privacy else None, "central_dp": None},
        "robustness": robustness or {"aggregation": "fedavg", "screening": True},
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
        "wall_seconds": 4.5,
    }
    if status is not None:
        summary["status"] = status
    if reproducible_noise is not None:
        summary["privacy"]["reproducible_noise"] = reproducible_noise
    if noise_used is not None:
        summary["privacy"]["noise_multipliers_used"] = noise_used
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    prefixed = {f"_module.{k}": v for k, v in state.items()}
    save_file(prefixed, str(run / "model.safetensors"))
    save_file(state, str(run / "best.safetensors"))
    return run
