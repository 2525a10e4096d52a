"""Central (user-level) DP at the server: DP-FedAvg with a fixed denominator (McMahan et al. 2018).

Each client's update is clipped to L2 norm ``C``; Gaussian noise of std ``sigma * C`` is added to
their SUM (one client changes the sum by at most ``C``), and the sum is divided by the EXPECTED
number of sampled clients, not the actual one (dividing by the actual count would make the
sensitivity depend on who was sampled). The guarantee is per client (all of its examples
together: user-level, add/remove one client).

Clients are sampled as the accountant assumes: Poisson, each eligible client independently with
probability ``q = federation.fraction_train`` (a variable cohort; ``min_clients`` never raises the
rate), accounted as the Poisson-subsampled Gaussian at that ``q``. Sampling and noise come from the
OS CSPRNG, so neither the server's seed nor a participant's knowledge of the config regenerates
them; ``central_dp.reproducible_noise`` opts into seeded draws (then the epsilon is not valid
against anyone who knows the seed).
"""

from __future__ import annotations

import secrets
from typing import TypeAlias

import numpy as np
import torch
from fedshield.privacy.accounting import reported_epsilon
from fedshield.privacy.randomness import SecureRandom

from fedshield.errors import ConfigError
from fedshield.schema import CentralDPConfig

UNIT = "user-level, per client, add/remove"

def clip_updates(updates: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, int]:
    """Each row of ``(n, d)`` updates scaled to L2 norm at most ``clip_norm``, in float64; also how
    many were clipped.

    float32 norms are off by up to ~1e-4 relative at d = 1e6, so a float32 clip exceeds C and the
    sensitivity exceeds what the noise assumes. In float64 the norm's rounding is ~1e-15 relative;
    rows above C are scaled to ``C * (1 - 1e-12)``, so their float64 norm is <= C with a margin
    1,000x that rounding."""
    if not clip_norm > 0:
        raise ConfigError(f"clip_norm = {clip_norm!r} must be > 0")
    rows = updates.to(torch.float64)
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    over = norms > clip_norm
    scale = torch.where(over, clip_norm * (1 - 1e-12) / torch.clamp(norms, min=1e-300),
                        torch.ones_like(norms))
    return rows * scale, int(over.sum())


def fixed_denominator_mean(clipped: torch.Tensor, expected_clients: float) -> torch.Tensor:
    """Sum of clipped updates over the expected (not actual) number of sampled clients."""
    if expected_clients <= 0:
        raise ConfigError(f"expected_clients = {expected_clients!r} must be > 0")
    return clipped.sum(dim=0) / expected_clients


def central_noise_std(clip_norm: float, noise_multiplier: float, expected_clients: float) -> float:
    """Std of the noise on the fixed-denominator mean: ``sigma * C`` on the sum, over
    ``expected_clients``."""
    return noise_multiplier * clip_norm / expected_clients


NoiseSource: TypeAlias = torch.Generator | SecureRandom


def add_central_noise(mean_update: torch.Tensor, clip_norm: float, noise_multiplier: float,
                      expected_clients: float,
                      generator: NoiseSource | None = None) -> torch.Tensor:
    """``mean_update`` (from :func:`fixed_denominator_mean`) plus Gaussian noise calibrated to it.

    ``generator``: a :class:`SecureRandom` (secret noise, with Opacus' floating-point fix) or a
    seeded ``torch.Generator`` (the reproducible research opt-in, and tests)."""
    std = central_noise_std(clip_norm, noise_multiplier, expected_clients)
    if isinstance(generator, SecureRandom):
        noise = generator.gaussian(tuple(mean_update.shape), 1.0, dtype=mean_update.dtype)
    else:
        noise = torch.randn(mean_update.shape, generator=generator, dtype=mean_update.dtype)
    return mean_update + std * noise


def noise_generator(cfg: CentralDPConfig, seed: int) -> NoiseSource:
    """The central noise source: a keystream under a secret 256-bit key (privacy/randomness.py;
    nobody can regenerate it), or the run seed only under the explicit
    ``central_dp.reproducible_noise`` opt-in.

    Not a torch generator seeded from the OS: on CPU ``manual_seed`` keeps only 32 bits, so 2**32
    candidate seeds, each testable against a released model, would give the noise away."""
    if cfg.reproducible_noise:
        return torch.Generator().manual_seed(seed)
    return SecureRandom()


def sampling_rng(cfg: CentralDPConfig, seed: int, server_round: int) -> np.random.Generator:
    """Randomness for client sampling claimed for amplification: the OS CSPRNG unless opted out."""
    if cfg.reproducible_noise:
        return np.random.default_rng([seed, server_round])
    return np.random.default_rng(secrets.randbits(128))


def poisson_sample(num_eligible: int, rate: float, rng: np.random.Generator) -> list[int]:
    """Positions of the clients sampled this round: each independently with probability ``rate``.

    The cohort's size varies (it can be empty); nothing tops it up, since any rule that adds
    clients raises the inclusion probability above the ``rate`` the accountant uses."""
    if not 0 < rate <= 1:
        raise ConfigError(f"client sample rate = {rate!r} must be in (0, 1]")
    return [int(i) for i in np.flatnonzero(rng.random(num_eligible) < rate)]


def expected_clients(rate: float, num_clients: int) -> float:
    """The fixed denominator: the expected Poisson cohort over the whole federation."""
    return rate * num_clients


def user_level_epsilon(noise_multiplier: float, client_sample_rate: float, rounds: int,
                       delta: float, accountant: str = "prv") -> float:
    """Per-client (user-level) epsilon after ``rounds`` rounds of Poisson client sampling at
    ``client_sample_rate``: the sampler :func:`poisson_sample` is exactly what is accounted.
    Floored by dp_accounting's PLD, like every stated epsilon."""
    return reported_epsilon([(noise_multiplier, client_sample_rate, rounds)], delta, accountant)
