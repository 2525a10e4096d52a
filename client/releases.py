"""Client side of what a reply releases besides the update (the design: privacy/releases.py).

``stats_release`` makes (once per run) or reloads the client's DP class-histogram release, with its
event in the client's ledger. ``reply_metrics`` decides which metrics a training reply may carry.
``planned_events`` is what the client's DP-SGD plan leaves room for; ``evaluation_release`` makes
one accounted federated-evaluation release. ``reference_release`` does the same for the
drift-reference histograms (privacy/reference.py) when ``deployment.reference_source =
"clients"``; ``kept_reference`` reads it back for the ServerApp's query after the last round
(client/reference.py), which never draws anew.
A release is kept beside the ledger (``releases-client-<id>.json``), keyed by run, so later rounds,
resumed runs and new processes resend the same noised values instead of drawing (and paying for)
fresh noise. Losing that file costs privacy, never hides it: the next draw is a new ledger event.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import replace
from pathlib import Path

import numpy as np
from fedshield.privacy.ledger import Ledger, atomic_write_json
from fedshield.privacy.reference import (
    REFERENCE_TAG,
    ReferenceRelease,
    monitored_features,
    num_monitored,
    public_edges,
    reference_event_id,
    release_reference,
)
from fedshield.privacy.releases import (
    EXACT_MODE,
    OUTSIDE_KEY,
    CountRelease,
    EvaluationRelease,
    Event,
    HistogramRelease,
    evaluation_event,
    evaluation_events,
    release_count,
    release_evaluation,
    release_histogram,
    secure_rng,
)
from fedshield.tasks import Split, Task

from fedshield import schema
from fedshield.errors import BudgetExhausted, FedShieldError
from fedshield.schema import PrivacyConfig

# What a DP training reply may carry: the DP events' public parameters, the release and identity.
DP_REPLY_KEYS = frozenset({"epsilon", "delta", "noise-multiplier", "clip-norm", "sample-rate",
                           "steps", "num-examples", "partition-id"})
log = logging.getLogger("flwr")

RELEASE_TAG = "class-histogram-release"
EVAL_TAG = "federated-evaluation"  # run_id suffix of the evaluation releases' ledger events
EVAL_COUNT_KEY = "eval-count"  # sidecar key "<run>/eval-count": the held-out count release


def releases_path(ledger: Ledger) -> Path:
    """Beside the ledger, under a name no ``client-*.json`` ledger glob picks up."""
    return ledger.path.with_name(f"releases-{ledger.path.stem}.json")


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}  # lost: the next release is drawn afresh and accounted as a new event


def stats_release(labels: np.ndarray, num_classes: int, privacy: PrivacyConfig, ledger: Ledger,
                  run_key: str) -> tuple[HistogramRelease, bool]:
    """This run's class-histogram release and whether it was made now (its event is then new in
    the ledger). Raises BudgetExhausted when the release itself would exceed the budget."""
    path = releases_path(ledger)
    doc = _read(path)
    try:
        kept = HistogramRelease.from_dict(doc[run_key])
        if len(kept.counts) == num_classes:
            return kept, False
    except (KeyError, TypeError, ValueError):
        pass
    release = release_histogram(labels, num_classes, privacy.stats_noise_multiplier, secure_rng())
    ledger.check([release.event])
    # A tag of its own per draw: never the (run, round) key of a training round, and a redraw
    # (file lost) is a new event, not a duplicate the ledger would skip.
    tag = f"{run_key}/{RELEASE_TAG}/{secrets.token_hex(4)}"
    ledger.record([release.event], round=0, run_id=tag)  # raises rather than skip a release
    doc[run_key] = release.to_dict()
    atomic_write_json(path, doc)
    return release, True


def _reference_key(run_key: str) -> str:
    return f"{run_key}/{REFERENCE_TAG}"  # beside the class release's entry (keyed by run_key)


def kept_reference(ledger: Ledger, run_key: str, shape: tuple[int, int],
                   num_classes: int) -> ReferenceRelease | None:
    """This run's kept drift-reference release, None when there is none of this shape."""
    try:
        return ReferenceRelease.from_dict(_read(releases_path(ledger))[_reference_key(run_key)],
                                          shape, num_classes)
    except (KeyError, TypeError, ValueError):
        return None


def reference_release(features: np.ndarray, labels: np.ndarray, num_classes: int,
                      edges: np.ndarray, privacy: PrivacyConfig, ledger: Ledger,
                      run_key: str) -> tuple[ReferenceRelease, bool]:
    """This run's drift-reference release (privacy/reference.py) and whether it was made now
    (its event is then new in the ledger). Raises BudgetExhausted when the release itself would
    exceed the budget: nothing is kept or sent then."""
    shape = (edges.shape[0], edges.shape[1] - 1)
    kept = kept_reference(ledger, run_key, shape, num_classes)
    if kept is not None:
        return kept, False
    release = release_reference(features, labels, num_classes, edges,
                                privacy.reference_noise_multiplier, secure_rng())
    ledger.check([release.event])
    # Its own tag per draw, as the class release: a redraw is a new event, never skipped. The
    # tag travels with the release (the server checks and records which event it cost).
    event_id = reference_event_id(run_key, secrets.token_hex(4))
    release = replace(release, event_id=event_id)
    ledger.record([release.event], round=0, run_id=event_id)
    path = releases_path(ledger)
    doc = _read(path)
    doc[_reference_key(run_key)] = release.to_dict()
    atomic_write_json(path, doc)
    return release, True


def wants_reference(cfg: schema.Config) -> bool:
    """Whether this run's clients release drift-reference histograms."""
    return cfg.deployment.reference_source == "clients"


def reference_shape(task: Task, bins: int) -> tuple[int, int]:
    """(monitored features, bins) of the task's reference counts."""
    return num_monitored(task.input_shape), bins


def task_edges(task: Task, bins: int) -> np.ndarray:
    """The public bin edges, from the task's own test split (privacy/reference.py)."""
    return public_edges(task.load()[1].x, task.input_shape, bins)


def training_release(task: Task, data: Split, cfg: schema.Config, ledger: Ledger,
                     run_key: str) -> tuple[ReferenceRelease | None, bool]:
    """Under DP, in the round the client trains: this run's reference release (made and
    accounted the first time, kept after), and whether it was made now (its event is then new
    in the ledger). None when the run wants none, or the public edges cannot be computed here
    (the task's test split is not installed): the client trains on, and later refuses the query
    saying why. Raises BudgetExhausted when the release alone would exceed the budget."""
    if not wants_reference(cfg):
        return None, False
    bins = cfg.deployment.reference_bins
    kept = kept_reference(ledger, run_key, reference_shape(task, bins), task.num_classes)
    if kept is not None:
        return kept, False
    try:
        edges = task_edges(task, bins)
    except (OSError, ImportError, FedShieldError) as exc:
        log.warning("drift reference: no public bin edges here (%s: %s); no release",
                    type(exc).__name__, exc)
        return None, False
    features = monitored_features(data.x, task.input_shape)
    return reference_release(features, data.y, task.num_classes, edges, cfg.privacy, ledger,
                             run_key)


def reply_metrics(metrics: dict, privacy: PrivacyConfig, exact: dict[str, float]) -> dict:
    """The metrics a training reply carries.

    No DP: everything, with the exact quality report ``exact`` (there is no guarantee to break).
    DP with release_stats = "dp": only DP_REPLY_KEYS and the dp-* release values. DP with the
    opt-in: everything, marked ``outside-guarantee``.
    """
    if not privacy.enabled:
        return {**metrics, **exact}
    if privacy.release_stats == EXACT_MODE:
        return {**metrics, **exact, OUTSIDE_KEY: 1.0}
    return {k: v for k, v in metrics.items() if k in DP_REPLY_KEYS or k.startswith("dp-")}


def planned_events(privacy: PrivacyConfig, fraction_evaluate: float, rounds: int,
                   release: HistogramRelease | None) -> tuple[Event, ...]:
    """The releases besides DP-SGD that a client's noise plan must leave room for: its histogram
    release, and, when the federation evaluates (``fraction_evaluate`` > 0) under release_stats
    "dp", one held-out count and one evaluation per round (privacy/releases.py)."""
    events: tuple[Event, ...] = (release.event,) if release is not None else ()
    if fraction_evaluate > 0 and privacy.release_stats != EXACT_MODE:
        events += evaluation_events(privacy.eval_noise_multiplier, rounds)
    return events


def evaluation_release(correct: int, loss_sum: float, n: int, privacy: PrivacyConfig,
                       ledger: Ledger, run_key: str,
                       server_round: int) -> tuple[EvaluationRelease, bool, float]:
    """One federated-evaluation release, whether the held-out count was released now, and the
    ledger's epsilon with it.

    Both events (the count's, the first time in a run, and this evaluation's) are recorded
    together, before anything is sent; the ledger checks them against the budget under its lock
    first and raises BudgetExhausted (nothing recorded, nothing released) when they would exceed
    it. ``loss_sum``: the per-example losses clipped to [0, privacy.eval_loss_clip], summed."""
    sigma = privacy.eval_noise_multiplier
    path = releases_path(ledger)
    doc = _read(path)
    count: CountRelease | None = None
    try:
        kept = CountRelease.from_dict(doc[f"{run_key}/{EVAL_COUNT_KEY}"])
        count = kept if kept.noise_multiplier == sigma else None
    except (KeyError, TypeError, ValueError):
        pass
    new = count is None
    if count is None:
        count = release_count(n, sigma, secure_rng())
    events = [count.event, evaluation_event(sigma)] if new else [evaluation_event(sigma)]
    # Its own run_id: never a training round's (run, round) key; every evaluation is a new event
    # with fresh noise (repeat_ok), and a lost sidecar redraws (and pays for) the count. The
    # ledger's budget check is the only epsilon computation when there is a budget.
    try:
        ledger.record(events, round=server_round, run_id=f"{run_key}/{EVAL_TAG}",
                      repeat_ok=True)
    except BudgetExhausted as exc:
        if type(exc) is not BudgetExhausted:  # a lost or corrupt ledger: its own code and text
            raise
        raise BudgetExhausted(str(exc).replace("the update must not be sent",
                                               "the client refuses to evaluate (nothing is "
                                               "released)")) from None
    result = release_evaluation(correct, loss_sum, count, privacy.eval_loss_clip, secure_rng())
    epsilon = ledger.recorded_epsilon
    if epsilon is None:
        epsilon = ledger.spent()
    if new:  # beside the run's histogram release, under a key of its own
        doc[f"{run_key}/{EVAL_COUNT_KEY}"] = count.to_dict()
        atomic_write_json(path, doc)
    return result, new, epsilon
