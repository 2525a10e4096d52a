"""The Attack record and helpers shared by the update attacks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedshield.schema import AttackConfig

# (x, y, num_classes, params, rng) -> poisoned (x, y); the inputs are never modified in place
PoisonData = Callable[[np.ndarray, np.ndarray, int, AttackConfig, np.random.Generator],
                      tuple[np.ndarray, np.ndarray]]
# (own (b, d), honest (h, d), params, generator) -> malicious updates (b, d)
Craft = Callable[[torch.Tensor, torch.Tensor, AttackConfig, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Attack:
    """One simulated adversary; ``kind`` says which hooks the runner calls.

    ``poison_data`` runs on a Byzantine client's local data before honest training ("data");
    ``craft`` replaces the Byzantine clients' updates after the round's honest training ("update").
    A backdoor does both.
    """

    name: str
    kind: str  # "data" | "update" | "both"
    description: str
    poison_data: PoisonData | None = None
    craft: Craft | None = None


def knowledge(own: torch.Tensor, honest: torch.Tensor) -> torch.Tensor:
    """The updates an omniscient attacker estimates statistics from, in float64.

    With no honest update in the round the attackers fall back on their own honestly computed
    updates (the "partial knowledge" setting of Fang et al. 2020 / Shejwalkar & Houmansadr 2021).
    """
    ref = honest if honest.shape[0] > 0 else own
    return ref.to(torch.float64)


def coordinate_std(updates: torch.Tensor) -> torch.Tensor:
    """Unbiased per-coordinate std (as ``torch.std`` in the papers' code); zero for one update."""
    if updates.shape[0] < 2:
        return torch.zeros(updates.shape[1], dtype=updates.dtype)
    return updates.std(dim=0)


def broadcast(vector: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """All colluding clients send the same crafted vector, in the dtype of their own updates."""
    return vector.to(own.dtype).unsqueeze(0).expand(own.shape[0], -1).clone()
