"""Local (non-private) training. DP-SGD lives in client/dp.py and keeps the same shape."""

from __future__ import annotations

from itertools import islice

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
    batches = (torch.from_numpy(order[start:start + cfg.batch_size])
               for _ in range(cfg.local_epochs)
               for order in [rng.permutation(len(data))]
               for start in range(0, len(data), cfg.batch_size))
    steps, loss_sum, seen = 0, 0.0, 0
    for idx in islice(batches, cfg.max_steps or None):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(idx)
        seen += len(idx)
        steps += 1
    model.to("cpu")  # weights travel as CPU arrays
    return {"train-loss": loss_sum / max(seen, 1), "steps": float(steps)}
