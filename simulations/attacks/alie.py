"""A Little Is Enough (Baruch, Baruch & Goldberg, NeurIPS 2019)."""

from __future__ import annotations

import math

import torch
from fedshield.simulations.attacks.base import broadcast, coordinate_std, knowledge

from fedshield.schema import AttackConfig


def alie_z_max(num_clients: int, num_byzantine: int) -> float:
    """The paper's z_max: s = floor(n/2 + 1) - f supporters needed, z = Phi^-1((n - s) / n).

    Clamped to z >= 0 (s > n/2 would ask for a negative shift) and to s >= 1 (with a Byzantine
    majority the paper's s is <= 0 and z unbounded; we keep z finite).
    """
    from scipy.stats import norm  # here: scipy.stats costs seconds in every config check's import

    s = max(math.floor(num_clients / 2 + 1) - num_byzantine, 1)
    return float(norm.ppf(max((num_clients - s) / num_clients, 0.5)))


def alie(own: torch.Tensor, honest: torch.Tensor, params: AttackConfig,
         generator: torch.Generator) -> torch.Tensor:
    """mean - z * std of the honest updates, coordinate-wise; the same vector for every attacker."""
    ref = knowledge(own, honest)
    n = own.shape[0] + honest.shape[0]
    z = params.alie_z or alie_z_max(n, own.shape[0])
    return broadcast(ref.mean(dim=0) - z * coordinate_std(ref), own)
