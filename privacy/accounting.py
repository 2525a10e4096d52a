"""Privacy accounting on plain events, with Opacus' accountants.

A privacy event is plain data: ``(noise_multiplier, sample_rate, steps)``, i.e. ``steps``
applications of the Poisson-subsampled Gaussian mechanism. A history is a list of events; composing
rounds (or runs) is concatenating their histories. Epsilon is always recomputed from the whole
history, so it never depends on an accountant object having survived in memory.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from fedshield.errors import ConfigError

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

ACCOUNTANTS = ("prv", "rdp", "gdp")  # Opacus' accountants: the ones DP-SGD training can run
# Accountants whose epsilon is an upper bound; gdp (a CLT approximation) is not one: on the default
# MNIST schedule a planned gdp eps 3.0 really spends 3.60, so budgets and planning refuse it.
BOUNDS = ("prv", "rdp", "pld")
# PLD grid step: dp_accounting's pessimistic PLD stays an upper bound at any step; 1e-3 costs
# ~0.1 s a history and moves epsilon by < 1e-3 against 1e-4 (measured at eps 2.8-15).
PLD_DISCRETIZATION = 1e-3

# Above this epsilon PRV's discretisation grows without bound (sigma 0.2 over 4,700 steps: 143 s,
# sigma 0.05: a 35 GB array), while the guarantee is meaningless anyway; report the RDP bound there,
# which is also a valid (if looser) upper bound.
PRV_MAX_EPSILON = 64.0

Event = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)

# Epsilons are pure functions of (history, delta, accountant), and one client round asks for the
# same few many times (the budget check, the record, the metrics, the planner's search): results
# are memoised per process, keyed by the compacted history, so a repeat costs nothing and every
# answer is exactly what the computation gives (bit for bit: the same code on the same inputs).
EPSILON_CACHE = 4096


def make_accountant(name: str) -> IAccountant:
    """A fresh Opacus accountant: ``prv`` (tightest), ``rdp`` (classic) or ``gdp`` (CLT,
    approximate)."""
    # Imported here: opacus imports torch, which processes that only read or write ledgers skip.
    from opacus.accountants import create_accountant

    if name not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {name!r}; choose one of {', '.join(ACCOUNTANTS)}")
    _memoise_opacus_rdp()
    with warnings.catch_warnings():
        # Opacus warns on every GDP accountant; the CLI and docs already say GDP is approximate.
        warnings.simplefilter("ignore", UserWarning)
        return create_accountant(mechanism=name)


@functools.cache
def _memoise_opacus_rdp() -> None:
    """Memoise Opacus' per-order RDP of the subsampled Gaussian, ``_compute_rdp(q, sigma, alpha)``.

    Why: it is a pure function of its three numbers (steps only multiply it), but Opacus computes
    it afresh in every RDP call, in a Python series for each fractional order (~0.15 s per
    (q, sigma) on a core). PRV calls RDP several times per epsilon (its safe domain size), and a
    client's training event keeps one (q, sigma) all run: measured, this was 60% of a default
    run's wall time (profile in benchmarks/results/cpu-2026-12-02/default-run/). The values, and
    so every epsilon, are unchanged; ``compute_rdp`` looks ``_compute_rdp`` up at call time.
    """
    from opacus.accountants.analysis import rdp

    # A pure memo of a private function (values unchanged: tests/test_privacy_accounting.py
    # compares with fresh accountants); an Opacus without it is simply not sped up.
    original = getattr(rdp, "_compute_rdp", None)
    if callable(original) and not hasattr(original, "cache_info"):
        rdp._compute_rdp = functools.lru_cache(maxsize=1 << 16)(original)


def as_event(event: Sequence[float]) -> Event:
    """Validate one event; refuses what the Gaussian-mechanism accountants cannot account for."""
    try:
        noise, rate, steps = event
        noise, rate, steps = float(noise), float(rate), int(steps)
    except (TypeError, ValueError):
        raise ConfigError("a privacy event is (noise_multiplier, sample_rate, steps), got "
                          f"{event!r}") from None
    if not (math.isfinite(noise) and noise > 0):
        raise ConfigError(f"privacy event {event!r}: noise_multiplier must be > 0 (no noise, no "
                          "DP)")
    if not 0 < rate <= 1:
        raise ConfigError(f"privacy event {event!r}: sample_rate must be in (0, 1]")
    if steps < 0:
        raise ConfigError(f"privacy event {event!r}: steps must be >= 0")
    return noise, rate, steps


def compact(history: Iterable[Sequence[float]]) -> list[Event]:
    """Merge events with the same (noise, rate), summing steps; drop empty ones.

    Composition is commutative, so this changes no epsilon; it is the history Opacus itself keeps
    when one accountant steps through all the rounds, and it keeps PRV fast (one FFT per distinct
    mechanism instead of one per round: 50 rounds 0.4 s instead of 20 s).
    """
    steps: dict[tuple[float, float], int] = {}
    for noise, rate, n in map(as_event, history):
        if n:
            steps[(noise, rate)] = steps.get((noise, rate), 0) + n
    return [(noise, rate, n) for (noise, rate), n in steps.items()]


def epsilon(history: Iterable[Sequence[float]], delta: float, accountant: str = "prv") -> float:
    """Epsilon at ``delta`` spent by all events in ``history`` (0 for an empty history)."""
    if not 0 < delta < 1:
        raise ConfigError(f"delta = {delta!r} must be in (0, 1)")
    events = compact(history)
    if not events:
        return 0.0
    if accountant == "pld":
        return pld_epsilon(events, delta)
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {accountant!r}; choose one of {', '.join(BOUNDS)}")
    if accountant == "gdp" and len(events) > 1:
        # Opacus' GDP accountant only reads its last entry: it cannot compose different mechanisms.
        raise ConfigError("the gdp accountant needs one constant (noise_multiplier, sample_rate); "
                          f"this history has {len(events)} different ones. Use accountant = "
                          "\"prv\"")
    if accountant == "prv":
        rdp_bound = _epsilon(tuple(events), delta, "rdp")
        if rdp_bound > PRV_MAX_EPSILON:
            return rdp_bound
    return _epsilon(tuple(events), delta, accountant)


def pld_epsilon(history: Iterable[Sequence[float]], delta: float) -> float:
    """Epsilon at ``delta`` by dp_accounting's PLD accountant: an implementation independent of
    Opacus' (Google's), composing each event as Poisson-subsampled Gaussian ``steps`` times."""
    if not 0 < delta < 1:
        raise ConfigError(f"delta = {delta!r} must be in (0, 1)")
    events = compact(history)
    if not events:
        return 0.0
    return _pld_epsilon(tuple(events), delta)


@functools.lru_cache(maxsize=EPSILON_CACHE)
def _pld_epsilon(events: tuple[Event, ...], delta: float) -> float:
    # What dp_accounting's PLDAccountant does for PoissonSampledDpEvent(rate, Gaussian(noise))
    # composed ``steps`` times, from memoised per-event PLDs (building one is most of the cost).
    from dp_accounting.pld import privacy_loss_distribution as PLD

    pld = PLD.identity(value_discretization_interval=PLD_DISCRETIZATION)
    for event in events:
        pld = pld.compose(_event_pld(*event))
    return float(pld.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=256)
def _event_pld(noise: float, rate: float, steps: int) -> Any:
    return _mechanism_pld(noise, rate).self_compose(steps)


@functools.lru_cache(maxsize=256)
def _mechanism_pld(noise: float, rate: float) -> Any:
    from dp_accounting.pld import privacy_loss_distribution as PLD
    from dp_accounting.privacy_accountant import NeighboringRelation

    return PLD.from_gaussian_mechanism(
        standard_deviation=noise, value_discretization_interval=PLD_DISCRETIZATION,
        sampling_prob=rate, neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)


def reported_epsilon(history: Iterable[Sequence[float]], delta: float,
                     accountant: str = "prv") -> float:
    """The epsilon fedshield states: the larger of ``accountant``'s and PLD's, so a stated epsilon
    is never below an independent accountant's (nor a gdp approximation below a bound).

    Beyond PRV_MAX_EPSILON the RDP bound is stated alone (PLD's grid would grow without bound
    there too, and the RDP bound is valid)."""
    history = compact(history)
    primary = epsilon(history, delta, accountant) if accountant != "pld" else 0.0
    if accountant in ("prv", "rdp") and primary > PRV_MAX_EPSILON:
        return primary
    if accountant == "gdp" and math.isinf(primary):
        return primary
    if accountant != "rdp" and epsilon(history, delta, "rdp") > PRV_MAX_EPSILON:
        return max(primary, epsilon(history, delta, "rdp"))
    return max(primary, pld_epsilon(history, delta))


# RDP orders 2..256: integer orders have a closed form (fast); a coarser grid than Opacus', so a
# looser but valid bound, for first guesses (privacy/planner.py), never for a stated epsilon.
INTEGER_ORDERS = tuple(range(2, 64)) + (80, 96, 128, 192, 256)


def integer_rdp_epsilon(history: Iterable[Sequence[float]], delta: float) -> float:
    """An RDP upper bound on epsilon at integer orders only: ~10 ms, against ~0.15 s per new
    (q, sigma) at Opacus' fractional orders. Looser than ``epsilon(.., "rdp")``."""
    from opacus.accountants.analysis import rdp

    _memoise_opacus_rdp()
    events = compact(history)
    if not events:
        return 0.0
    total = sum(rdp.compute_rdp(q=rate, noise_multiplier=noise, steps=steps,
                                orders=list(INTEGER_ORDERS)) for noise, rate, steps in events)
    with warnings.catch_warnings():  # "optimal order at the grid's end": still a valid bound
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp.get_privacy_spent(orders=list(INTEGER_ORDERS), rdp=total, delta=delta)
    return float(eps)


def side_by_side(history: Iterable[Sequence[float]], delta: float,
                 accountants: Sequence[str] = ("prv", "pld")) -> dict[str, float]:
    """Epsilon by each accountant (raw, not maxed), for reports that show them side by side."""
    history = compact(history)
    return {name: pld_epsilon(history, delta) if name == "pld" else epsilon(history, delta, name)
            for name in accountants}


def check_bound_accountant(accountant: str, what: str) -> None:
    """Refuse an accountant that is not an upper bound (gdp) where a bound is needed."""
    if accountant not in BOUNDS:
        raise ConfigError(
            f"the {accountant} accountant is a CLT approximation, not an upper bound (a planned "
            f"eps 3.0 really spends 3.60 on the default schedule), so it cannot be used for "
            f"{what}. "
            'Use accountant = "prv" (tight) or "rdp"')


@functools.lru_cache(maxsize=EPSILON_CACHE)
def _epsilon(events: tuple[Event, ...], delta: float, accountant: str) -> float:
    acc = make_accountant(accountant)
    acc.history = list(events)
    with warnings.catch_warnings():
        # RDP warns when the optimal order sits at the end of its alpha grid (the bound is still
        # valid).
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            return float(acc.get_epsilon(delta=delta))
        except ValueError:
            # root finding fails when mu is so large that epsilon is unbounded
            if accountant == "gdp":
                return math.inf
            raise


SAMPLE_LEVEL = "sample-level, per client, add/remove"
USER_LEVEL = "user-level, per client, add/remove"


def describe(eps: float | None, unit: str, delta: float, accountant: str) -> str:
    """How every stated epsilon is printed: its unit, adjacency, delta and accountant, e.g.
    ``eps 2.99 (sample-level, per client, add/remove, delta 1e-05, prv, >= pld)``."""
    value = "-" if eps is None else f"{eps:.2f}"
    floor = "" if accountant == "pld" else ", >= pld"
    return f"eps {value} ({unit}, delta {delta:g}, {accountant}{floor})"
