"""Local (non-private) training. DP-SGD lives in client/dp.py and keeps the same shape."""

from __future__ import annotations

import functools
from itertools import islice

import numpy as np
import torch
from fedshield.tasks import Split, resolve_device
from torch import nn

from fedshield.schema import TrainConfig


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with the ``[train]`` learning rate, momentum and weight decay."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def random_shift(x: torch.Tensor, max_pixels: float, generator: torch.Generator) -> torch.Tensor:
    """Move each image of an ``(N, C, H, W)`` batch by its own uniform draw in
    [-max_pixels, max_pixels] along x and y (bilinear; edges repeat the border, i.e. background)."""
    if x.dim() != 4:
        raise ValueError(f"train.augment = 'shift' needs image batches (N, C, H, W), got shape "
                         f"{tuple(x.shape)}; set train.augment = \"none\" for this task")
    n, _, height, width = x.shape
    if n == 0:  # Poisson-sampled DP batches can be empty; affine_grid refuses size 0
        return x
    draw = torch.rand(n, 2, generator=generator) * 2 - 1
    # affine_grid works in [-1, 1] coordinates: a shift of p pixels is 2p / size.
    offsets = draw * max_pixels * 2 / torch.tensor([width, height], dtype=torch.float32)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = offsets
    grid = nn.functional.affine_grid(theta.to(x.device, x.dtype), list(x.shape),
                                     align_corners=False)
    return nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False)


def augmenter(cfg: TrainConfig, seed: int):
    """The batch transform ``cfg.augment`` asks for (identity for "none")."""
    if cfg.augment == "none":
        return lambda x: x
    generator = torch.Generator().manual_seed(seed + 1)
    return lambda x: random_shift(x, cfg.augment_pixels, generator)


@functools.cache
def _accelerator() -> bool:
    return torch.accelerator.is_available()


def seed_torch(seed: int) -> None:
    """``torch.manual_seed(seed)``. Without an accelerator only the CPU generator exists, but
    torch.manual_seed still queues a lazy CUDA seeding with a captured traceback (~0.5 ms: more
    than a small client's training step); there the CPU generator alone is seeded (the same
    draws)."""
    if _accelerator():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def train_local(model: nn.Module, data: Split, cfg: TrainConfig, seed: int) -> dict[str, float]:
    """Shuffled minibatch SGD for ``cfg.local_epochs`` epochs (or ``cfg.max_steps`` steps)."""
    rng = np.random.default_rng(seed)
    seed_torch(seed)
    device = resolve_device(cfg.device)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    x, y = torch.from_numpy(data.x).to(device), torch.from_numpy(data.y).to(device)
    augment = augmenter(cfg, seed)
    model.train()
    batches = (torch.from_numpy(order[start:start + cfg.batch_size])
               for _ in range(cfg.local_epochs)
               for order in [rng.permutation(len(data))]
               for start in range(0, len(data), cfg.batch_size))
    steps, loss_sum, seen = 0, 0.0, 0
    for idx in islice(batches, cfg.max_steps or None):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(augment(x[idx])), y[idx])
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(idx)
        seen += len(idx)
        steps += 1
    model.to("cpu")  # weights travel as CPU arrays
    return {"train-loss": loss_sum / max(seen, 1), "steps": float(steps)}
