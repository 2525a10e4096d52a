"""Noise planning: the noise multiplier that spends a target epsilon over a federated schedule.

A client runs ``rounds x local_epochs x steps_per_epoch`` DP-SGD steps. Opacus' Poisson loader
samples every example with probability ``q = 1 / ceil(N / B)`` (about ``B / N``) and takes
``int(1 / q)`` steps per epoch; the planner uses exactly those numbers, so planned and recorded
epsilons agree. Each client's epsilon is over its own examples: a client that sits out some rounds
spends less than planned, never more.

Every planned or stated epsilon is :func:`privacy.accounting.reported_epsilon`: the larger of the
accountant's and PLD's, so a plan is never below an independent accountant. gdp is refused: it is
an approximation, not a bound (its planned noise overspent by up to 20%).

A DP client under ``privacy.release_stats = "dp"`` also spends its once-per-run class-histogram
release (privacy/releases.py: the event ``(stats_noise_multiplier, 1, 1)``). ``plan`` takes it as
``stats_noise_multiplier`` and plans and states the epsilon with it, exactly as the client does
(client/dp.py ``resolve_noise(..., extra_events)``); so does its drift-reference release
(``reference_noise_multiplier``, privacy/reference.py). The client plans from its noised count
(``planning_examples``), so give that count to reproduce a client's numbers exactly.

Federated evaluation under DP (``federation.fraction_evaluate`` > 0) spends one held-out count
release and one release per evaluated round, each the event ``(eval_noise_multiplier, 1, 1)``;
the client plans for every round (privacy/releases.py ``evaluation_events``), and so does
``plan`` given ``eval_noise_multiplier``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from fedshield.privacy.accounting import (
    BOUNDS,
    check_bound_accountant,
    integer_rdp_epsilon,
    pld_epsilon,
    reported_epsilon,
)
from fedshield.privacy.reference import reference_event
from fedshield.privacy.releases import evaluation_event, evaluation_events, histogram_event
from scipy.optimize import brentq

from fedshield.errors import ConfigError

# The planner's default table: Opacus' PRV and RDP, and dp_accounting's PLD, side by side.
PLAN_ACCOUNTANTS = BOUNDS

# Noise beyond which a target is called unreachable: the model would learn nothing.
MAX_NOISE = 1e3
# Below this noise the epsilon is in the hundreds: no meaningful guarantee is left.
MIN_NOISE = 0.3
# A planned sigma spends between (1 - PLAN_RTOL) x target and target.
PLAN_RTOL = 2e-3


def check_delta(delta: float, num_examples: int, *, private_count: bool = False) -> None:
    """Refuse a delta that is not below 1/num_examples (ConfigError): with n examples a larger
    delta admits a mechanism that publishes whole records. Give the exact count (client/dp.py).

    ``private_count``: the count is a client's exact one, and the message travels to the server
    (Flower sends a ClientApp's exception text), so the message does not name it."""
    if not 0 < delta < 1:
        raise ConfigError(f"delta = {delta!r} must be in (0, 1)")
    if delta < 1 / num_examples:
        return
    if private_count:
        raise ConfigError(f"privacy.delta = {delta:g} is not below 1/n for this client's exact "
                          "number of training examples n (a larger delta lets a mechanism "
                          "publish whole records; n stays on the client); lower privacy.delta "
                          "below 1/(the largest client's n)")
    raise ConfigError(f"delta must be < 1/num_examples = {1 / num_examples:.3g}, got {delta:g} "
                      f"(with {num_examples} examples a larger delta lets a mechanism publish "
                      "whole records); lower delta")


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Opacus' Poisson sample rate for a loader of ``batch_size`` over ``num_examples``."""
    if num_examples < 1:
        raise ConfigError(f"num_examples = {num_examples} must be >= 1")
    if batch_size < 1:
        raise ConfigError(f"batch_size = {batch_size} must be >= 1")
    if batch_size > num_examples:
        raise ConfigError(f"batch_size = {batch_size} exceeds num_examples = {num_examples}: the "
                          "sample rate would be > 1; lower batch_size")
    return 1 / math.ceil(num_examples / batch_size)


def steps_per_round(num_examples: int, batch_size: int, local_epochs: int,
                    max_steps: int = 0) -> int:
    """DP-SGD steps one client takes per round (``max_steps`` > 0 caps them, as training does)."""
    if local_epochs < 1:
        raise ConfigError(f"local_epochs = {local_epochs} must be >= 1")
    steps = local_epochs * int(1 / sample_rate(num_examples, batch_size))
    return min(steps, max_steps) if max_steps > 0 else steps


def spent(noise: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv",
          extra: tuple[tuple[float, float, int], ...] = ()) -> float:
    """Epsilon stated for ``steps`` steps at ``noise`` and ``sample_rate`` (the planner's inverse),
    together with the fixed events ``extra``: the accountant's, floored by PLD's."""
    return reported_epsilon([(noise, sample_rate, steps), *extra], delta, accountant)


@lru_cache(maxsize=256)
def plan_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
               accountant: str = "prv", extra: tuple[tuple[float, float, int], ...] = ()) -> float:
    """A noise multiplier whose epsilon after ``steps`` steps is at most the target, and close.

    The result spends between ``(1 - PLAN_RTOL)`` x target and the target. ``extra``: fixed events
    the target also pays for (e.g. a client's statistics release, privacy/releases.py). Cached:
    every client with the same data size plans the same sigma.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"target_epsilon = {target_epsilon!r} must be a finite number > 0")
    if accountant not in BOUNDS:
        check_bound_accountant(accountant, "planning noise")
    if steps < 1:
        raise ConfigError(f"steps = {steps} must be >= 1 to plan noise")

    seen: dict[float, float] = {}

    def eps(noise: float) -> float:
        if noise not in seen:
            seen[noise] = reported_epsilon([(noise, sample_rate, steps), *extra], delta, accountant)
        return seen[noise]

    floor = eps(MAX_NOISE)
    if floor > target_epsilon:
        raise ConfigError(
            f"target_epsilon = {target_epsilon:g} is unreachable with the {accountant} accountant: "
            f"even noise_multiplier = {MAX_NOISE:g} spends {floor:.3g} over {steps} steps. Raise "
            "target_epsilon, train fewer rounds/epochs, use a smaller batch"
            + (", or use accountant = \"prv\" (tighter)" if accountant != "prv" else ""))
    ceiling = eps(MIN_NOISE)
    if ceiling <= target_epsilon:
        raise ConfigError(
            f"target_epsilon = {target_epsilon:g} is so large that the noise multiplier would "
            f"fall below {MIN_NOISE} ({MIN_NOISE} already spends only {ceiling:.3g}); such a "
            "guarantee is meaningless. Lower target_epsilon, or set noise_multiplier directly")
    # PRV is at most ~15% tighter than integer-order RDP: step down from its guess by 10%.
    lo, hi = _bracket(eps, target_epsilon,
                      _first_guess(target_epsilon, delta, sample_rate, steps, accountant, extra),
                      down=1.1 if accountant == "prv" else 1.5)
    log_target = math.log(target_epsilon)

    # Root of log(eps) - log(target) in log(noise): smooth, so brentq needs few (costly) calls.
    def gap(log_noise: float) -> float:
        return math.log(min(eps(math.exp(log_noise)), 1e300)) - log_target

    root = math.exp(brentq(gap, math.log(lo), math.log(hi), xtol=PLAN_RTOL / 4))
    # Land on the safe side: never plan a sigma that spends more than the target.
    while eps(root) > target_epsilon:
        root *= 1 + PLAN_RTOL / 10
    return root


def _first_guess(target: float, delta: float, rate: float, steps: int, accountant: str,
                 extra: tuple[tuple[float, float, int], ...] = ()) -> float:
    # PRV costs ~0.3 s per evaluation. Start from the sigma that RDP at integer orders alone
    # needs: a valid bound, so its sigma is at or above PRV's (within ~15%), and it costs ~10 ms
    # per evaluation, against ~0.3 s for RDP at Opacus' fractional orders plus PLD (which made
    # the old first guess, a full RDP plan, a third of a plan's time).
    if accountant != "prv":
        return 1.0
    events = tuple(extra)

    def gap(log_noise: float) -> float:
        noise = math.exp(log_noise)
        return math.log(max(integer_rdp_epsilon(((noise, rate, steps), *events), delta),
                            1e-300)) - math.log(target)
    lo, hi = math.log(MIN_NOISE), math.log(MAX_NOISE)
    if gap(lo) <= 0 or gap(hi) > 0:  # out of RDP's reach (PRV is tighter): start from the top
        return MAX_NOISE
    return math.exp(brentq(gap, lo, hi, xtol=1e-3))


def _bracket(eps: Callable[[float], float], target: float,
             guess: float, down: float = 1.5) -> tuple[float, float]:
    """Noise values (lo, hi) with eps(lo) > target >= eps(hi), both in [MIN_NOISE, MAX_NOISE];
    ``down``: the step below the guess (small when the guess is known to be a little high)."""
    lo = hi = min(max(guess, MIN_NOISE), MAX_NOISE)
    while eps(hi) > target:
        lo, hi = hi, min(hi * 1.25, MAX_NOISE)
    while eps(lo) <= target:
        hi, lo = lo, max(lo / down, MIN_NOISE)
    return lo, hi


def epsilon_curve(noise: float, sample_rate: float, steps_per_round: int, rounds: int, delta: float,
                  accountant: str = "prv") -> list[float]:
    """Cumulative epsilon after each round 1..rounds."""
    return [spent(noise, sample_rate, r * steps_per_round, delta, accountant)
            for r in range(1, rounds + 1)]


@dataclass
class AccountantPlan:
    """One accountant's row of a plan: its sigma, final epsilon and curve."""

    accountant: str
    noise_multiplier: float
    epsilon: float  # after the last round
    curve: list[tuple[int, float]]  # (round, cumulative epsilon after it)
    epsilon_pld: float = 0.0  # dp_accounting's PLD epsilon at this noise, side by side


@dataclass
class Plan:
    """A schedule's plan: sample rate and steps, and one row per accountant."""

    rounds: int
    local_epochs: int
    batch_size: int
    num_examples: int
    delta: float
    sample_rate: float
    steps_per_round: int
    total_steps: int
    target_epsilon: float | None  # None when the noise multiplier was given
    accountants: list[AccountantPlan] = field(default_factory=list)
    # The once-per-run statistics release every epsilon above includes (None: not planned for,
    # e.g. release_stats = "exact-outside-guarantee"); its event is (sigma, 1, 1).
    stats_noise_multiplier: float | None = None
    # The once-per-run drift-reference release (privacy/reference.py; None: not made, e.g.
    # deployment.reference_source = "server"); its event is (sigma, 1, 1) too.
    reference_noise_multiplier: float | None = None
    extra_events: list[tuple[float, float, int]] = field(default_factory=list)
    # Federated evaluation's releases every epsilon above includes (None: not planned for).
    eval_noise_multiplier: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``--json``)."""
        return asdict(self)


def milestones(rounds: int) -> list[int]:
    """Rounds 1, 10%, 50% and 100% of the schedule (the CLI table's columns)."""
    return sorted({1, max(1, round(rounds * 0.1)), max(1, round(rounds * 0.5)), rounds})


def plan(*, rounds: int, local_epochs: int, batch_size: int, num_examples: int, delta: float,
         target_epsilon: float | None = None, noise_multiplier: float | None = None,
         accountants: tuple[str, ...] = PLAN_ACCOUNTANTS, max_steps: int = 0,
         curve_rounds: list[int] | None = None,
         stats_noise_multiplier: float | None = None,
         eval_noise_multiplier: float | None = None,
         reference_noise_multiplier: float | None = None) -> Plan:
    """Per accountant: the sigma spending ``target_epsilon`` over the schedule and its curve;
    or, given ``noise_multiplier``, the epsilon it spends (the inverse).

    ``stats_noise_multiplier``: the client's class-histogram release (``privacy.release_stats =
    "dp"``), released before round 1; the planned sigma leaves room for it and every epsilon of
    the curve includes it, as the client's ledger does. ``eval_noise_multiplier``: federated
    evaluation under DP, planned as the client does (a count and one release per round); the
    curve counts the releases made by each round (count and evaluations up to it).
    ``reference_noise_multiplier``: the client's drift-reference release, made with the same
    first round and counted like the histogram release. The curve holds every round unless
    ``curve_rounds`` picks some (PRV costs ~0.3 s a point).
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ConfigError("give exactly one of target_epsilon or noise_multiplier")
    if noise_multiplier is not None and not (math.isfinite(noise_multiplier)
                                             and noise_multiplier > 0):
        raise ConfigError(f"noise_multiplier = {noise_multiplier!r} must be a finite number > 0")
    if rounds < 1:
        raise ConfigError(f"rounds = {rounds} must be >= 1")
    check_delta(delta, num_examples)
    # The release's event, exactly as the client records it (privacy/releases.py).
    extra: tuple[tuple[float, float, int], ...] = (
        (histogram_event(stats_noise_multiplier),) if stats_noise_multiplier is not None else ())
    if reference_noise_multiplier is not None:  # the drift reference's (privacy/reference.py)
        extra += (reference_event(reference_noise_multiplier),)
    # Federated evaluation's releases, as the client plans them: by round r it has made r + 1.
    evaluation = evaluation_events(eval_noise_multiplier, rounds) \
        if eval_noise_multiplier is not None else ()

    def made_by(r: int) -> tuple[tuple[float, float, int], ...]:
        if eval_noise_multiplier is None:
            return extra
        noise, q, _ = evaluation_event(eval_noise_multiplier)
        return (*extra, (noise, q, 1 + r))  # the count and r evaluations
    rate = sample_rate(num_examples, batch_size)
    per_round = steps_per_round(num_examples, batch_size, local_epochs, max_steps)
    planned = extra + evaluation
    result = Plan(rounds, local_epochs, batch_size, num_examples, delta, rate, per_round,
                  rounds * per_round, target_epsilon, stats_noise_multiplier=stats_noise_multiplier,
                  extra_events=list(planned), eval_noise_multiplier=eval_noise_multiplier,
                  reference_noise_multiplier=reference_noise_multiplier)
    for name in accountants:
        check_bound_accountant(name, "planning noise")
    for name in accountants:
        sigma = noise_multiplier if noise_multiplier is not None else plan_noise(
            target_epsilon, delta, rate, rounds * per_round, name, planned)
        points = sorted({*(curve_rounds or range(1, rounds + 1)), rounds})
        curve = [(r, spent(sigma, rate, r * per_round, delta, name, made_by(r)))
                 for r in points if 1 <= r <= rounds]
        result.accountants.append(AccountantPlan(
            name, sigma, curve[-1][1], curve,
            pld_epsilon([(sigma, rate, rounds * per_round), *planned], delta)))
    return result
