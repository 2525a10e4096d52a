"""What a DP client releases besides its update: one accounted Gaussian class-histogram release.

Adjacency. Client-level epsilons are sample-level under add/remove-one-example adjacency, the one
Opacus' Poisson-sampling accountant uses. Under add/remove a client's example count is itself
sensitive, and so is everything computed from it exactly: the class histogram, classes present,
the training loss, held-out loss and accuracy, and even the DP-SGD sample rate q = batch / n (and
the steps per epoch, and a noise multiplier planned from q), which would give n away exactly.

What a reply carries under DP (``privacy.release_stats = "dp"``, the default): the update and the
public parameters of its DP events, nothing exact about the data.

- Once per run (the first round the client trains) the client releases its class histogram with
  the Gaussian mechanism: one example moves one bin by 1, so the L2 sensitivity is 1 and the noise
  std is ``sigma`` (``privacy.stats_noise_multiplier``). That is the accountant event
  ``(sigma, sample_rate=1, steps=1)``, recorded in the same ledger as training, so every epsilon the
  client reports includes it. Later rounds resend the same noised values (post-processing, free).
- The noised example count is the sum of the noised bins (post-processing). The client plans its
  DP-SGD from it: q = 1 / ceil(count / batch), the steps per round, the planned noise and the
  scale of the averaged noisy gradient all depend on the noised count only, never on the exact n.
  The server gets q and steps to recompute epsilons, and they reveal nothing beyond the release.
  (The DP-SGD parameters are chosen after, and from, an earlier DP output: adaptive composition;
  the ledger's budget check before every release acts as the privacy filter.)
- ``num-examples`` in the reply is that noised count, rounded and clamped to >= 1: FedAvg's example
  weighting under DP uses the noised counts.
- The exact training loss, quality report and client timings are not sent. Client evaluation
  (held-out loss and accuracy) is released through its own accounted Gaussian mechanism (below).

``privacy.release_stats = "exact-outside-guarantee"``: the client sends today's exact statistics
(count, histogram, classes present, missing values, losses, accuracy, timings) and plans from the
exact count; every reply says so (``outside-guarantee`` = 1), and so do the metrics lines and the
summary: those values are NOT covered by the stated epsilon.

Without DP (``privacy.enabled = false``) there is no guarantee to break: replies are unchanged.

Randomness: noise from numpy's PCG64 seeded by the OS CSPRNG (``secrets``), never from the run
seed the server knows; each normal draw is the sum of 4 standard draws halved (Opacus' secure-mode
remedy against floating-point attacks on Gaussian sampling, Holohan and Braghin 2021).

Pure: numpy only, no Flower, no files.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedshield.errors import ConfigError

Event = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), as privacy.accounting

MODES = ("dp", "exact-outside-guarantee")
EXACT_MODE = "exact-outside-guarantee"

# Add/remove one example moves exactly one class bin by 1.
HISTOGRAM_SENSITIVITY = 1.0

# Reply metric names (kebab-case, as every other reply metric).
DP_CLASS_PREFIX = "dp-class-"           # dp-class-0 .. dp-class-{K-1}: the noised histogram
STATS_NOISE_KEY = "dp-stats-noise-multiplier"  # sigma of the histogram release
STATS_STD_KEY = "dp-stats-std"          # noise std on every bin (sigma x sensitivity)
STATS_NEW_KEY = "dp-stats-new"          # 1 in the round whose ledger entry holds the release event
OUTSIDE_KEY = "outside-guarantee"       # 1: the reply's exact statistics are outside the guarantee
EXACT_CLASS_PREFIX = "class-"           # quality_report's exact histogram (no DP, or the opt-in)


def histogram_event(sigma: float) -> Event:
    """The accountant event of one Gaussian histogram release at noise multiplier ``sigma``."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"privacy.stats_noise_multiplier = {sigma!r} must be a finite number > 0")
    return (float(sigma), 1.0, 1)


def secure_rng() -> np.random.Generator:
    """A generator nobody else can derive: seeded from the OS CSPRNG, not from the run seed."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def gaussian_noise(std: float, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """N(0, std^2) noise as (sum of 4 N(0, std^2)) / 2, which has the same law but hides the
    low-order bits a single floating-point draw leaks (Opacus' secure mode does the same)."""
    noise: np.ndarray = rng.normal(0.0, std, (4, *shape)).sum(0) / 2.0
    return noise


@dataclass(frozen=True)
class HistogramRelease:
    """A client's released class histogram: noised counts and the mechanism's public parameters."""

    counts: tuple[float, ...]  # noised, one per class (may be negative: no post-processing here)
    noise_multiplier: float
    noise_std: float

    @property
    def event(self) -> Event:
        """The privacy event of this release (one Gaussian mechanism)."""
        return histogram_event(self.noise_multiplier)

    @property
    def total(self) -> float:
        """The noised example count: the sum of the noised bins (post-processing)."""
        return float(sum(self.counts))

    @property
    def planning_count(self) -> int:
        """The example count the client plans DP-SGD from and reports: the noised total, rounded,
        at least 1 (a function of the release only)."""
        return planning_count(self.total)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the release sidecar's format)."""
        return {"counts": list(self.counts), "noise_multiplier": self.noise_multiplier,
                "noise_std": self.noise_std}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HistogramRelease:
        """The release a ``to_dict`` wrote."""
        return cls(tuple(float(c) for c in d["counts"]), float(d["noise_multiplier"]),
                   float(d["noise_std"]))

    def to_metrics(self, new: bool) -> dict[str, float]:
        """The reply metrics of this release; ``new``: its event is recorded in this round."""
        out = {f"{DP_CLASS_PREFIX}{k}": float(c) for k, c in enumerate(self.counts)}
        out.update({STATS_NOISE_KEY: self.noise_multiplier, STATS_STD_KEY: self.noise_std,
                    STATS_NEW_KEY: 1.0 if new else 0.0})
        return out


def planning_count(noised_total: float) -> int:
    """Noised count -> a usable example count (>= 1): post-processing, so still private."""
    if not math.isfinite(noised_total):
        raise ValueError(f"noised count {noised_total!r} is not finite")
    return max(1, int(round(noised_total)))


def release_histogram(labels: np.ndarray, num_classes: int, sigma: float,
                      rng: np.random.Generator) -> HistogramRelease:
    """The Gaussian mechanism on the class histogram of ``labels`` (L2 sensitivity 1)."""
    histogram_event(sigma)  # validates sigma
    hist = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    if len(hist) != num_classes:
        raise ValueError(f"labels reach {len(hist) - 1}, beyond num_classes = {num_classes}")
    std = float(sigma) * HISTOGRAM_SENSITIVITY
    noised = hist.astype(np.float64) + gaussian_noise(std, hist.shape, rng)
    return HistogramRelease(tuple(float(c) for c in noised), float(sigma), std)


# --- federated evaluation under client DP --------------------------------------------------
#
# A DP client's answer to an evaluation message is two Gaussian releases on its held-out split:
#
# - once per run, its held-out example count + N(0, sigma^2) (add/remove moves it by 1): the
#   event (sigma, 1, 1), cached and resent like the histogram;
# - each time it evaluates, its correct count c and its clipped loss sum L = sum min(loss, B),
#   with noise std sigma sqrt(2) on c and sigma sqrt(2) B on L. One example moves (c, L / B) by at
#   most (1, 1), L2 norm sqrt(2), so the pair is one Gaussian mechanism of noise multiplier
#   sigma: the event (sigma, 1, 1) again.
#
# Accuracy and mean loss are the noised sums over the noised count, clipped to [0, 1] and
# [0, B] (post-processing, free). The client plans its DP-SGD noise leaving room for one count and
# ``rounds`` evaluations (:func:`evaluation_events`), so a planned target still holds.

EVAL_SENSITIVITY = math.sqrt(2.0)  # L2 norm of (correct count, loss sum / B) under add/remove
EVAL_NOISE_KEY = "dp-eval-noise-multiplier"  # sigma of both evaluation releases
EVAL_CLIP_KEY = "dp-eval-loss-clip"          # B: each example's loss is clipped to [0, B]
EVAL_ACC_STD_KEY = "dp-eval-accuracy-std"    # approximate std of the released accuracy's noise
EVAL_COUNT_NEW_KEY = "dp-eval-count-new"     # 1: the count release's event is new this round
EVAL_KEYS = (EVAL_NOISE_KEY, EVAL_CLIP_KEY, EVAL_ACC_STD_KEY, EVAL_COUNT_NEW_KEY)


def evaluation_event(sigma: float) -> Event:
    """The accountant event of one evaluation release (count, or correct count and loss sum)."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"privacy.eval_noise_multiplier = {sigma!r} must be a finite number > 0")
    return (float(sigma), 1.0, 1)


def evaluation_events(sigma: float, rounds: int) -> tuple[Event, ...]:
    """What a client plans for federated evaluation over ``rounds`` rounds: its count release
    and one release per round (the most Flower's loop asks for). Client and planner both use it."""
    if rounds < 1:
        raise ConfigError(f"rounds = {rounds} must be >= 1")
    noise, rate, _ = evaluation_event(sigma)
    return ((noise, rate, 1), (noise, rate, int(rounds)))


@dataclass(frozen=True)
class CountRelease:
    """A client's held-out example count with Gaussian noise (once per run)."""

    count: float  # noised (may be below 1: clamped only where it is divided by)
    noise_multiplier: float

    @property
    def event(self) -> Event:
        """The privacy event of this release."""
        return evaluation_event(self.noise_multiplier)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the release sidecar's format)."""
        return {"count": self.count, "noise_multiplier": self.noise_multiplier}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CountRelease:
        """The release a ``to_dict`` wrote."""
        return cls(float(d["count"]), float(d["noise_multiplier"]))


def release_count(n: int, sigma: float, rng: np.random.Generator) -> CountRelease:
    """The Gaussian mechanism on an example count (sensitivity 1)."""
    evaluation_event(sigma)  # validates sigma
    return CountRelease(float(n + gaussian_noise(float(sigma), (), rng)), float(sigma))


@dataclass(frozen=True)
class EvaluationRelease:
    """One client's evaluation as released under DP: noised accuracy and clipped mean loss."""

    accuracy: float  # in [0, 1]
    loss: float  # in [0, loss_clip]
    num_examples: int  # the noised count, rounded, at least 1
    accuracy_std: float  # approximate std of the accuracy's noise (from released values only)
    noise_multiplier: float
    loss_clip: float

    def to_metrics(self, count_new: bool) -> dict[str, float]:
        """The reply metrics (accuracy, loss, num-examples and the dp-eval-* parameters)."""
        return {"accuracy": self.accuracy, "loss": self.loss,
                "num-examples": float(self.num_examples), EVAL_NOISE_KEY: self.noise_multiplier,
                EVAL_CLIP_KEY: self.loss_clip, EVAL_ACC_STD_KEY: self.accuracy_std,
                EVAL_COUNT_NEW_KEY: 1.0 if count_new else 0.0}


def release_evaluation(correct: int, loss_sum: float, count: CountRelease, loss_clip: float,
                       rng: np.random.Generator) -> EvaluationRelease:
    """The Gaussian mechanism on (correct count, clipped loss sum), divided by the noised count.

    ``loss_sum`` must already be the sum of per-example losses clipped to [0, ``loss_clip``]."""
    sigma = count.noise_multiplier
    evaluation_event(sigma)
    if not (math.isfinite(loss_clip) and loss_clip > 0):
        raise ConfigError(f"privacy.eval_loss_clip = {loss_clip!r} must be a finite number > 0")
    std = sigma * EVAL_SENSITIVITY
    noise = gaussian_noise(std, (2,), rng)
    denominator = float(planning_count(count.count))
    accuracy = float(np.clip((correct + noise[0]) / denominator, 0.0, 1.0))
    loss = float(np.clip((loss_sum + loss_clip * noise[1]) / denominator, 0.0, loss_clip))
    # Delta method on c / n with both noised (n's noise sigma, c's sigma sqrt 2), from released
    # values only: a guide to how far apart two clients must be to differ, not a guarantee.
    acc_std = float(math.sqrt(std ** 2 + (accuracy * sigma) ** 2) / denominator)
    return EvaluationRelease(accuracy, loss, planning_count(count.count), acc_std, float(sigma),
                             float(loss_clip))


# --- server side: readers of released values (pure) -----------------------------------------

def class_counts_from_metrics(metrics: Mapping[str, object]) -> tuple[list[float], float] | None:
    """(class counts, noise std per count) from one reply's metrics: the noised histogram when
    the client released one, its exact histogram (std 0) when it sent that, else None."""
    for prefix, std_key in ((DP_CLASS_PREFIX, STATS_STD_KEY), (EXACT_CLASS_PREFIX, None)):
        keyed = {}
        for key, value in metrics.items():
            if key.startswith(prefix) and key[len(prefix):].isdigit():
                keyed[int(key[len(prefix):])] = value
        if keyed and sorted(keyed) == list(range(len(keyed))):
            try:
                counts = [float(keyed[k]) for k in range(len(keyed))]  # type: ignore[arg-type]
                std = float(metrics.get(std_key, 0.0)) if std_key else 0.0  # type: ignore[arg-type]
            except (TypeError, ValueError):
                return None  # malformed reply values: no view from them
            if all(map(math.isfinite, counts)) and math.isfinite(std) and std >= 0:
                return counts, std
            return None
    return None


@dataclass(frozen=True)
class ClassView:
    """The federation's class distribution from the clients' released histograms."""

    clients: int
    counts: tuple[float, ...]   # summed (noised) counts
    priors: tuple[float, ...]   # counts clipped at 0 and normalised (post-processing)
    noise_std: float            # std of the noise on each summed count
    examples: float             # summed (noised) example count
    private: bool               # every part came from the DP release

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict for the summary, saying where the numbers came from."""
        return {"clients": self.clients, "class_counts": list(self.counts),
                "class_priors": list(self.priors), "noise_std": self.noise_std,
                "examples": self.examples, "private": self.private,
                "source": "dp-gaussian class histograms" if self.private
                else "exact client histograms (outside any DP guarantee)"}


def merge_class_counts(parts: Iterable[tuple[Sequence[float], float]]) -> ClassView | None:
    """Sum clients' (counts, noise std) into one view; None when there is nothing to merge or the
    parts disagree on the number of classes."""
    parts = list(parts)
    if not parts or len({len(c) for c, _ in parts}) != 1:
        return None
    counts = np.sum([np.asarray(c, dtype=np.float64) for c, _ in parts], axis=0)
    clipped = np.clip(counts, 0.0, None)
    total = clipped.sum()
    priors = clipped / total if total > 0 else np.full(len(counts), 1.0 / len(counts))
    noise = float(np.sqrt(sum(s ** 2 for _, s in parts)))
    return ClassView(len(parts), tuple(map(float, counts)), tuple(map(float, priors)), noise,
                     float(counts.sum()), all(s > 0 for _, s in parts))
