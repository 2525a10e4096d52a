"""Drift statistics on fixed-edge histograms and a windowed monitor with a retraining trigger.

Pure numpy/scipy. PSI (population stability index): < 0.1 no change, 0.1-0.25 moderate, > 0.25
large. KS here is the largest CDF gap between binned distributions. Jensen-Shannon is the base-2
distance in [0, 1]. Window histograms are smoothed towards the reference with ``bins`` pseudo-
examples, so bins empty in both add nothing and a small window is not flagged for sampling noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from fedshield.deployment.reference_stats import Reference, histograms, monitored_features
from scipy.spatial.distance import jensenshannon

FLOOR = 1e-6
STATISTICS = ("psi_mean", "psi_max", "ks_max", "js_mean", "prediction_psi", "prediction_js")


def psi(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """PSI over the last axis of two probability arrays."""
    r, c = np.clip(reference, FLOOR, None), np.clip(current, FLOOR, None)
    return ((c - r) * np.log(c / r)).sum(-1)


def ks_binned(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Largest absolute CDF difference over the bin edges (last axis)."""
    return np.abs(np.cumsum(reference, -1) - np.cumsum(current, -1)).max(-1)


def js_distance(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance (base 2, in [0, 1]) between histograms, along the last axis."""
    return np.nan_to_num(jensenshannon(reference, current, base=2, axis=-1))


def smoothed(counts: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Window counts -> probabilities, with ``bins`` pseudo-examples spread like the reference."""
    bins = counts.shape[-1]
    return (counts + bins * reference) / (counts.sum(-1, keepdims=True) + bins)


def window_scores(reference: Reference, features: np.ndarray, predictions: np.ndarray,
                  top: int = 5) -> dict:
    """Scores of one window of monitored features and predicted classes against the reference."""
    cur = smoothed(histograms(features, reference.edges), reference.probs)
    per_feature = psi(reference.probs, cur)
    classes = np.bincount(np.asarray(predictions, dtype=np.int64),
                          minlength=len(reference.class_priors))
    pred = smoothed(classes.astype(np.float64), reference.class_priors)
    order = np.argsort(-per_feature)[:top]
    names = reference.feature_names
    return {
        "psi_mean": float(per_feature.mean()), "psi_max": float(per_feature.max()),
        "ks_max": float(ks_binned(reference.probs, cur).max()),
        "js_mean": float(js_distance(reference.probs, cur).mean()),
        "prediction_psi": float(psi(reference.class_priors, pred)),
        "prediction_js": float(js_distance(reference.class_priors, pred)),
        "top_features": [[names[i] if i < len(names) else str(i), float(per_feature[i])]
                         for i in order],
    }


@dataclass
class RetrainTrigger:
    """Ask for a federated fine-tuning run from the champion (the lead wires the action)."""

    reason: str
    windows: list[int]
    scores: list[float]
    statistic: str
    threshold: float
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                  time.gmtime()))

    def to_dict(self) -> dict:
        """A JSON-able dict."""
        return asdict(self)


@dataclass
class WindowReport:
    """The scores of one full window of served examples, and where the trigger stands."""
    index: int
    examples: int
    scores: dict
    over_threshold: bool
    streak: int
    note: str = ""

    def to_dict(self) -> dict:
        """A JSON-able dict (one line of the window log)."""
        return asdict(self)


class TriggerPolicy:
    """Fires when a score exceeds ``threshold`` in ``patience`` consecutive windows (then
    resets)."""

    def __init__(self, statistic: str = "psi_mean", threshold: float = 0.2, patience: int = 3,
                 budget_remaining: Callable[[], bool] | None = None) -> None:
        if statistic not in STATISTICS:
            raise ValueError(f"unknown drift statistic {statistic!r}; choose one of "
                             f"{', '.join(STATISTICS)}")
        if patience < 1 or threshold <= 0:
            raise ValueError("drift patience must be >= 1 and threshold > 0")
        self.statistic, self.threshold, self.patience = statistic, threshold, patience
        self.budget_remaining = budget_remaining
        self.streak: list[tuple[int, float]] = []

    def update(self, index: int, scores: dict) -> tuple[bool, RetrainTrigger | None, str]:
        """(over threshold, trigger or None, note) for the window ``index``."""
        value = scores[self.statistic]
        if value <= self.threshold:
            self.streak = []
            return False, None, ""
        self.streak.append((index, value))
        if len(self.streak) < self.patience:
            return True, None, ""
        windows, values = [i for i, _ in self.streak], [v for _, v in self.streak]
        self.streak = []
        if self.budget_remaining is not None and not self.budget_remaining():
            return True, None, "drift persists but no privacy budget remains: not retraining"
        reason = (f"{self.statistic} above {self.threshold} in {self.patience} consecutive windows "
                  f"({', '.join(f'{v:.3f}' for v in values)})")
        return True, RetrainTrigger(reason, windows, values, self.statistic, self.threshold), ""


class DriftMonitor:
    """Consumes served inputs and predictions, scores full windows, fires retraining triggers."""

    def __init__(self, reference: Reference, window: int = 200, threshold: float = 0.2,
                 patience: int = 3, statistic: str = "psi_mean",
                 budget_remaining: Callable[[], bool] | None = None,
                 on_trigger: Callable[[RetrainTrigger], None] | None = None,
                 on_window: Callable[[WindowReport], None] | None = None) -> None:
        if window < 1:
            raise ValueError("drift window must hold at least 1 example")
        self.reference, self.window = reference, window
        self.policy = TriggerPolicy(statistic, threshold, patience, budget_remaining)
        self.on_trigger, self.on_window = on_trigger, on_window
        self.reports: list[WindowReport] = []
        self.triggers: list[RetrainTrigger] = []
        self._features: list[np.ndarray] = []
        self._predictions: list[np.ndarray] = []
        self._buffered = 0

    @property
    def latest(self) -> WindowReport | None:
        """The last full window's report (None before the first window fills)."""
        return self.reports[-1] if self.reports else None

    def observe(self, inputs: np.ndarray, predictions: np.ndarray) -> list[WindowReport]:
        """Add a served batch (model inputs, predicted classes); returns the windows it
        completed."""
        feats = monitored_features(inputs, self.reference.input_shape)
        self._features.append(feats)
        self._predictions.append(np.asarray(predictions).reshape(-1))
        self._buffered += len(feats)
        done = []
        while self._buffered >= self.window:
            feats, preds = np.concatenate(self._features), np.concatenate(self._predictions)
            self._features, self._predictions = [feats[self.window:]], [preds[self.window:]]
            self._buffered -= self.window
            done.append(self._score(feats[:self.window], preds[:self.window]))
        return done

    def _score(self, feats: np.ndarray, preds: np.ndarray) -> WindowReport:
        index = len(self.reports)
        scores = window_scores(self.reference, feats, preds)
        over, trigger, note = self.policy.update(index, scores)
        report = WindowReport(index, len(feats), scores, over, len(self.policy.streak), note)
        if trigger is not None:
            report.note = "retraining triggered: " + trigger.reason
            self.triggers.append(trigger)
            if self.on_trigger:
                self.on_trigger(trigger)
        self.reports.append(report)
        if self.on_window:
            self.on_window(report)
        return report


def replay_windows(reports: list[dict], statistic: str, threshold: float,
                   patience: int) -> list[RetrainTrigger]:
    """Re-apply a trigger policy to logged window reports (``WindowReport.to_dict`` lines)."""
    policy = TriggerPolicy(statistic, threshold, patience)
    fired = []
    for r in reports:
        _, trigger, _ = policy.update(r["index"], r["scores"])
        if trigger:
            fired.append(trigger)
    return fired
