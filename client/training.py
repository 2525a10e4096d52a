"""Local (non-private) training. DP-SGD lives in client/dp.py and keeps the same shape."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedshield.config import TrainConfig
from tasks import Split, resolve_device


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def train_local(model: nn.Module, data: Split, cfg: TrainConfig, seed: int) -> dict[str, float]:
    """Shuffled minibatch SGD for ``cfg.local_epochs`` epochs (or ``cfg.max_steps`` steps)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    device = resolve_device(cfg.device)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    x, y = torch.from_numpy(data.x).to(device), torch.from_numpy(data.y).to(device)
    model.train()
    steps, loss_sum, seen = 0, 0.0, 0
    for _ in range(cfg.local_epochs):
        order = torch.from_numpy(rng.permutation(len(data)))
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
            steps += 1
            if cfg.max_steps and steps >= cfg.max_steps:
                break
        if cfg.max_steps and steps >= cfg.max_steps:
            break
    model.to("cpu")  # weights travel as CPU arrays
    return {"train-loss": loss_sum / max(seen, 1), "steps": float(steps)}
