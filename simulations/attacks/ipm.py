"""Inner Product Manipulation (Xie, Koyejo & Gupta, UAI 2020)."""

from __future__ import annotations

import torch
from fedshield.simulations.attacks.base import broadcast, knowledge

from fedshield.schema import AttackConfig


def ipm(own: torch.Tensor, honest: torch.Tensor, params: AttackConfig,
        generator: torch.Generator) -> torch.Tensor:
    """-epsilon * mean of honest updates, so the aggregate's inner product with the true gradient
    turns negative. The paper uses epsilon = 0.1 (small, passes distance-based rules such as Krum)
    and epsilon = 100 (large, against median / trimmed mean); the default is 0.1."""
    return broadcast(-params.ipm_epsilon * knowledge(own, honest).mean(dim=0), own)
