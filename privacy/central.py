"""Central (user-level) DP at the server: DP-FedAvg with a fixed denominator (McMahan et al. 2018).

Each client's update is clipped to L2 norm ``C``; Gaussian noise of std ``sigma * C`` is added to their
SUM (one client changes the sum by at most ``C``), and the sum is divided by the EXPECTED number of
sampled clients, not the actual one (dividing by the actual count would make the sensitivity depend
on who was sampled). Accounting is the subsampled Gaussian mechanism with the client sampling rate
per round, so the guarantee is per client (all of its examples together).
"""

from __future__ import annotations

import torch

from fedshield.config import CentralDPConfig
from fedshield.errors import ConfigError
from privacy.accounting import epsilon

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
    """Scale each row of ``(n, d)`` updates to L2 norm at most ``clip_norm``; also how many were clipped."""
    if clip_norm <= 0:
        raise ConfigError(f"clip_norm = {clip_norm!r} must be > 0")
    norms = torch.linalg.vector_norm(updates, dim=1, keepdim=True)
    scale = torch.clamp(clip_norm / torch.clamp(norms, min=torch.finfo(updates.dtype).tiny), max=1.0)
    return updates * scale, int((norms.squeeze(1) > clip_norm).sum())


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


def user_level_epsilon(noise_multiplier: float, client_sample_rate: float, rounds: int, delta: float,
                       accountant: str = "prv") -> float:
    """Per-client epsilon after ``rounds`` rounds, each sampling clients with ``client_sample_rate``.

    The accountants assume Poisson client sampling; Flower samples a fixed number of clients, for
    which this is the standard approximation.
    """
    return epsilon([(noise_multiplier, client_sample_rate, rounds)], delta, accountant)


def _rule_name(rule_spec: str) -> tuple[list[str], str]:
    *pre, rule = [part.strip().lower() for part in rule_spec.split("+")]
    return pre, rule


def check_central_dp(rule_spec: str, central_cfg: CentralDPConfig, secagg: bool = False,
                     weighting: str = "uniform") -> None:
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
    """A ``fedshield.config.CROSS_CHECKS`` entry: the problem with cfg's central DP setup, or None."""
    try:
        check_central_dp(cfg.aggregation.rule, cfg.central_dp, weighting=cfg.aggregation.weighting)
    except ConfigError as exc:
        return str(exc)
    return None
