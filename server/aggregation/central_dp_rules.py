"""Which aggregation settings central DP and SecAgg+ accept, from the rule records.

Central DP's noise is calibrated for a mean of clipped updates (one client moves it by at most
C / expected); every other rule, a pre-aggregation step, example weighting or a screen that compares
updates with each other would break the stated epsilon, and SecAgg+ hides the individual updates
those rules need. The facts (``mean_of_clipped``, ``central_dp_refusal``) live on each rule's
record in registry.py; this module only turns them into refusals.
"""

from __future__ import annotations

from fedshield.server.aggregation.registry import CENTRAL_DP_REFUSALS, MEAN_OF_CLIPPED_RULES

from fedshield.errors import ConfigError
from fedshield.schema import CentralDPConfig, Config


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
            f"step {pre[0]!r} in {rule_spec!r} mixes clients' updates before the rule, so one "
            "client can move the output by more than C / expected and the stated epsilon would be "
            f"wrong. {fix}")
    if rule not in MEAN_OF_CLIPPED_RULES:
        why = CENTRAL_DP_REFUSALS.get(rule, f"{rule} is not a mean of clipped updates")
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
    if pre or rule not in MEAN_OF_CLIPPED_RULES:
        raise ConfigError(
            f"secure aggregation only reveals the sum of updates, but {rule_spec!r} needs each "
            "client's individual update (to select, sort, trim, cluster or compare them). Use "
            "aggregation.rule = \"fedavg\" or \"clip\" (clipping then runs on the clients) with "
            "secure aggregation, or turn secure aggregation off")


def central_dp_config_check(cfg: Config) -> str | None:
    """A ``fedshield.validation`` check: the problem with cfg's central DP setup, or None."""
    try:
        check_central_dp(cfg.aggregation.rule, cfg.central_dp, weighting=cfg.aggregation.weighting,
                         norm_ratio_screening=(cfg.screening.enabled
                                               and cfg.screening.max_norm_ratio > 0))
    except ConfigError as exc:
        return str(exc)
    return None
