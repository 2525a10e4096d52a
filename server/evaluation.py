"""Federated evaluation on the server: each client's checked result and the round's distribution.

Pure (no Flower): the strategy decodes a reply at the boundary (fedshield.records) and hands the
decoded numbers here. :func:`check_result` decides whether they are usable under the run's
privacy mode; :func:`distribution` and :func:`federated_evaluation` build the round's
``FederatedEvaluation`` record (fedshield/run_records.py), keyed by partition id.

The distribution is over clients, each counted once (a partner site asks how the model does at
*its* site, whatever its size): mean, worst client, mean of the worst 10% (at least one client)
and the spread (population standard deviation). Under client DP every value carries noise of
std about ``noise_std`` (privacy/releases.py), so the worst client is biased low and the spread
high by that noise: read them next to ``noise_std``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedshield.privacy.releases import (
    EVAL_ACC_STD_KEY,
    EVAL_CLIP_KEY,
    EVAL_COUNT_NEW_KEY,
    EVAL_NOISE_KEY,
    OUTSIDE_KEY,
    evaluation_event,
)

from fedshield.run_records import FederatedEvaluation, ReleaseEvent

WORST_FRACTION = 0.1  # "worst 10%"

# How a round's values were released (FederatedEvaluation.source).
DP_SOURCE = "dp-gaussian"
EXACT_SOURCE = "exact (no DP)"
OUTSIDE_SOURCE = "exact, outside the DP guarantee"


@dataclass(frozen=True)
class Distribution:
    """The spread of one metric over clients."""

    mean: float
    worst: float
    worst_decile: float
    spread: float


def distribution(values: Sequence[float], higher_is_better: bool = True) -> Distribution:
    """Mean, worst, mean of the worst ceil(10%) (at least one) and population std of ``values``."""
    if not values:
        raise ValueError("no client values to summarise")
    ordered = sorted(values, reverse=not higher_is_better)  # worst first
    k = max(1, math.ceil(WORST_FRACTION * len(ordered)))
    mean = math.fsum(ordered) / len(ordered)
    spread = math.sqrt(math.fsum((v - mean) ** 2 for v in ordered) / len(ordered))
    return Distribution(mean, ordered[0], math.fsum(ordered[:k]) / k, spread)


@dataclass(frozen=True)
class ClientResult:
    """One client's usable evaluation: released values and, under DP, the release's parameters."""

    accuracy: float
    loss: float
    num_examples: int | None
    accuracy_std: float | None  # None: exact values
    epsilon: float | None
    count_new: bool = False  # its held-out count release is new this round (one more event)


def release_mode(privacy_enabled: bool, release_stats: str) -> str:
    """What the run's clients send: DP_SOURCE, OUTSIDE_SOURCE (the opt-in) or EXACT_SOURCE."""
    if not privacy_enabled:
        return EXACT_SOURCE
    return DP_SOURCE if release_stats == "dp" else OUTSIDE_SOURCE


def check_result(accuracy: float | None, loss: float | None, num_examples: int | None,
                 extra: Mapping[str, float], *, mode: str, noise_multiplier: float,
                 loss_clip: float) -> ClientResult | str:
    """The client's result, or why it is not usable (a "code: detail" string).

    ``accuracy`` in [0, 1], ``loss`` >= 0 and ``num_examples`` >= 1 were checked by the decoder;
    here: both values present, and under DP the release's parameters, which must be this run's
    (a reply under other ones is not what the ledger accounts for)."""
    if accuracy is None or loss is None:
        return "malformed:evaluation: accuracy and loss are both required"
    epsilon = extra.get("epsilon")
    if mode != DP_SOURCE:
        return ClientResult(accuracy, loss, num_examples, None, epsilon)
    missing = [k for k in (EVAL_NOISE_KEY, EVAL_CLIP_KEY, EVAL_ACC_STD_KEY) if k not in extra]
    if missing or num_examples is None:
        return ("not-private: under client DP an evaluation reply carries its release's "
                f"parameters and noised count; missing {', '.join(missing) or 'num-examples'}")
    if extra.get(OUTSIDE_KEY):
        return "not-private: exact values sent although this run releases evaluation under DP"
    if extra[EVAL_NOISE_KEY] != noise_multiplier or extra[EVAL_CLIP_KEY] != loss_clip:
        return (f"dp-mismatch: released with noise {extra[EVAL_NOISE_KEY]:g} and loss clip "
                f"{extra[EVAL_CLIP_KEY]:g}; this run's are {noise_multiplier:g} and {loss_clip:g}")
    if not 0 <= loss <= loss_clip:
        return f"out-of-range:loss: {loss:g} beyond the loss clip {loss_clip:g}"
    std = extra[EVAL_ACC_STD_KEY]
    if std < 0 or (epsilon is not None and epsilon < 0):
        return "out-of-range:evaluation: a negative noise std or epsilon"
    return ClientResult(accuracy, loss, num_examples, std, epsilon,
                        count_new=extra.get(EVAL_COUNT_NEW_KEY) == 1.0)


def federated_evaluation(results: Mapping[str, ClientResult], *, server_round: int, mode: str,
                         noise_multiplier: float | None = None, loss_clip: float | None = None,
                         rejected: Mapping[str, str] | None = None,
                         refused: Mapping[str, str] | None = None) -> FederatedEvaluation:
    """The round's record from the usable results (keyed by partition id) and the rest."""
    private = mode == DP_SOURCE
    events: dict[str, tuple[ReleaseEvent, ...]] = {}
    if private and noise_multiplier is not None:
        noise, rate, steps = evaluation_event(noise_multiplier)
        one = ReleaseEvent(noise_multiplier=noise, sample_rate=rate, steps=steps)
        events = {k: (one, one) if r.count_new else (one,) for k, r in results.items()}
    stats = distribution([r.accuracy for r in results.values()]) if results else None
    stds = [r.accuracy_std for r in results.values() if r.accuracy_std is not None]
    return FederatedEvaluation(
        round=server_round, source=mode,
        accuracy={k: r.accuracy for k, r in results.items()},
        loss={k: r.loss for k, r in results.items()},
        mean=stats.mean if stats else None, worst=stats.worst if stats else None,
        worst_decile=stats.worst_decile if stats else None,
        spread=stats.spread if stats else None,
        # the typical client's accuracy noise (root mean square over clients)
        noise_std=math.sqrt(math.fsum(s * s for s in stds) / len(stds)) if stds else None,
        noise_multiplier=noise_multiplier if private else None,
        loss_clip=loss_clip if private else None,
        num_examples={k: r.num_examples for k, r in results.items()
                      if r.num_examples is not None},
        epsilon={k: r.epsilon for k, r in results.items() if r.epsilon is not None},
        events=events, rejected=dict(rejected or {}), refused=dict(refused or {}))
