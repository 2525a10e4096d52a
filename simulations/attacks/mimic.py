"""Mimic (Karimireddy, He & Jaggi, ICLR 2022, "Byzantine-robust learning on heterogeneous datasets
via bucketing").

All Byzantine clients copy one honest client's update, over-representing that client's data. The
paper picks the honest client that maximises variance along the top principal direction of the
honest updates (estimated online over warm-up rounds). This is the stateless per-round version: each
round the attackers copy the honest update with the largest |projection| on the top principal
direction of the round's centred honest updates.
"""

from __future__ import annotations

import torch
from fedshield.simulations.attacks.base import broadcast, knowledge

from fedshield.schema import AttackConfig


def mimic_target(ref: torch.Tensor) -> int:
    """Index of the update furthest from the mean along the top principal direction.

    With X the centred updates, the projections X z on the top right-singular vector z equal
    sqrt(lambda) v for the top eigenvector v of the small Gram matrix X X^T, so argmax |v| suffices.
    """
    centred = ref - ref.mean(dim=0)
    _, vectors = torch.linalg.eigh(centred @ centred.T)
    return int(vectors[:, -1].abs().argmax())


def mimic(own: torch.Tensor, honest: torch.Tensor, params: AttackConfig,
          generator: torch.Generator) -> torch.Tensor:
    """All Byzantine clients send a copy of the honest update ``mimic_target`` picks."""
    ref = knowledge(own, honest)
    return broadcast(ref[mimic_target(ref)], own)
