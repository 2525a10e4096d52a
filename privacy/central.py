"""Central (user-level) DP at the server: DP-FedAvg with a fixed denominator (McMahan et al. 2018).

Each client's update is clipped to L2 norm ``C``; Gaussian noise of std ``sigma * C`` is added to their
SUM (one client changes the sum by at most ``C``), and the sum is divided by the EXPECTED number of
sampled clients, not the actual one (dividing by the actual count would make the sensitivity depend
on who was sampled). The guarantee is per client (all of its examples together: user-level,
add/remove one client).

Clients are sampled as the accountant assumes: Poisson, each eligible client independently with
probability ``q = federation.fraction_train`` (a variable cohort; ``min_clients`` never raises the
rate), accounted as the Poisson-subsampled Gaussian at that ``q``. Sampling and noise come from the
OS CSPRNG, so neither the server's seed nor a participant's knowledge of the config regenerates
them; ``central_dp.reproducible_noise`` opts into seeded draws (then the epsilon is not valid
against anyone who knows the seed).
"""

from __future__ import annotations

import os
import secrets

import numpy as np
import torch
from fedshield.privacy.accounting import reported_epsilon

from fedshield.errors import ConfigError
from fedshield.schema import CentralDPConfig

UNIT = "user-level, per client, add/remove"

# Rules whose output is a mean of clipped updates: one client moves it by at most C / expected.
CENTRAL_DP_RULES = frozenset({"fedavg", "clip"})

_WHY_NOT = {
    "krum": "krum selects one client's update, so one client can change the output by up to 2C",
    "multikrum": "multikrum averages a data-dependent selection, so one client changes which updates "
                 "are averaged and moves the output by more than C / expected",
    "bulyan": "bulyan selects and trims updates by their values, so one client changes the selection",
    "median": "the coordinate-wise median is not a sum, its sensitivity to one client is not C / expected",
    "trimmed_mean": "trimmed_mean drops updates by their values, so one client changes which are kept",
    "geomed": "the geometric median is not a sum of clipped updates; its sensitivity is not C / expected",
    "fltrust": "fltrust weighs updates by their similarity to a server update, so weights are unbounded",
    "flame": "flame clusters and re-clips by data-dependent norms, so one client changes the output by "
             "more than C / expected",
    "cclip": "centered clipping iterates around a data-dependent centre, so its sensitivity is not "
             "C / expected",
}


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
    """Std of the noise on the fixed-denominator mean: ``sigma * C`` on the sum, over ``expected_clients``."""
    return noise_multiplier * clip_norm / expected_clients


def add_central_noise(mean_update: torch.Tensor, clip_norm: float, noise_multiplier: float,
                      expected_clients: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``mean_update`` (from :func:`fixed_denominator_mean`) plus Gaussian noise calibrated to it."""
    std = central_noise_std(clip_norm, noise_multiplier, expected_clients)
    noise = torch.randn(mean_update.shape, generator=generator, dtype=mean_update.dtype)
    return mean_update + std * noise


def noise_generator(cfg: CentralDPConfig, seed: int) -> torch.Generator:
    """The central noise generator: seeded from the OS CSPRNG (nobody can regenerate it), or from
    the run seed only under the explicit ``central_dp.reproducible_noise`` opt-in."""
    if cfg.reproducible_noise:
        return torch.Generator().manual_seed(seed)
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


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


def user_level_epsilon(noise_multiplier: float, client_sample_rate: float, rounds: int, delta: float,
                       accountant: str = "prv") -> float:
    """Per-client (user-level) epsilon after ``rounds`` rounds of Poisson client sampling at
    ``client_sample_rate``: the sampler :func:`poisson_sample` is exactly what is accounted.
    Floored by dp_accounting's PLD, like every stated epsilon."""
    return reported_epsilon([(noise_multiplier, client_sample_rate, rounds)], delta, accountant)


def _rule_name(rule_spec: str) -> tuple[list[str], str]:
    *pre, rule = [part.strip().lower() for part in rule_spec.split("+")]
    return pre, rule


def check_central_dp(rule_spec: str, central_cfg: CentralDPConfig, secagg: bool = False,
                     weighting: str = "uniform", norm_ratio_screening: bool = False) -> None:
    """Refuse aggregation settings under which central DP's stated epsilon would be wrong."""
    if not central_cfg.enabled:
        return
    pre, rule = _rule_name(rule_spec)
    fix = ('Use aggregation.rule = "fedavg" or "clip" with central DP, or turn central DP off.')
    if pre:
        raise ConfigError(
            f"central DP noise is calibrated for the mean of clipped updates; the pre-aggregation "
            f"step {pre[0]!r} in {rule_spec!r} mixes clients' updates before the rule, so one client "
            f"can move the output by more than C / expected and the stated epsilon would be wrong. {fix}")
    if rule not in CENTRAL_DP_RULES:
        why = _WHY_NOT.get(rule, f"{rule} is not a mean of clipped updates")
        raise ConfigError(
            f"central DP noise is calibrated for the mean of clipped updates; {why} and the stated "
            f"epsilon would be wrong. {fix}")
    if rule == "fedavg" and weighting == "examples":
        raise ConfigError(
            "central DP needs uniform client weights: with aggregation.weighting = \"examples\" a "
            "client's weight is its self-reported example count, which is unbounded, so one client "
            "can move the mean by more than C / expected. Set aggregation.weighting = \"uniform\"")
    if norm_ratio_screening:
        raise ConfigError(
            "central DP with screening.max_norm_ratio > 0 is refused: that check compares each "
            "update with the round's median norm, so adding one client can get another rejected "
            "(or un-rejected) and move the output by 2C / expected while the noise is calibrated "
            "for C. Set screening.max_norm_ratio = 0 (shape, finiteness and the absolute "
            "screening.max_norm, which look at one update alone, still apply), or turn central DP "
            "off")
    if secagg:
        check_secagg(rule_spec)


def check_secagg(rule_spec: str) -> None:
    """Refuse rules that need individual updates, which secure aggregation hides from the server."""
    pre, rule = _rule_name(rule_spec)
    if pre or rule not in CENTRAL_DP_RULES:
        raise ConfigError(
            f"secure aggregation only reveals the sum of updates, but {rule_spec!r} needs each "
            "client's individual update (to select, sort, trim, cluster or compare them). Use "
            "aggregation.rule = \"fedavg\" or \"clip\" (clipping then runs on the clients) with secure "
            "aggregation, or turn secure aggregation off")


def central_dp_config_check(cfg) -> str | None:
    """A ``fedshield.validation`` check: the problem with cfg's central DP setup, or None."""
    try:
        check_central_dp(cfg.aggregation.rule, cfg.central_dp, weighting=cfg.aggregation.weighting,
                         norm_ratio_screening=(cfg.screening.enabled
                                               and cfg.screening.max_norm_ratio > 0))
    except ConfigError as exc:
        return str(exc)
    return None
