"""Non-omniscient update attacks: sign flipping, Gaussian noise, scaling."""

from __future__ import annotations

import torch

from fedshield.schema import AttackConfig


def sign_flip(own: torch.Tensor, honest: torch.Tensor, params: AttackConfig,
              generator: torch.Generator) -> torch.Tensor:
    """-scale * own update; scale 1 is the sign-flipping attack of e.g. Allen-Zhu et al. 2021."""
    return -params.sign_flip_scale * own


def gaussian(own: torch.Tensor, honest: torch.Tensor, params: AttackConfig,
             generator: torch.Generator) -> torch.Tensor:
    """Each Byzantine client sends an independent N(0, noise_std^2 I) vector (Blanchard et al.
    2017)."""
    noise = torch.randn(own.shape, generator=generator, dtype=torch.float64)
    return (params.noise_std * noise).to(own.dtype)


def scaling(own: torch.Tensor, honest: torch.Tensor, params: AttackConfig,
            generator: torch.Generator) -> torch.Tensor:
    """Own update times ``scale``: a boosted update that dominates an unweighted mean."""
    return params.scale * own
