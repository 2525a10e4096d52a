"""Drift reference statistics: per-feature histograms on fixed bin edges plus class priors.

The monitored features, public bin edges and each client's (DP) release are privacy/reference.py
(below the apps, which compute them); this module is the reference itself. ``merge_histograms``
sums the clients' released counts into one reference (the hand-off does it from the run folder's
``client_reference.json``, which the ServerApp writes after the last round: server/reference.py).
``reference_from_data`` is the noise-free reference of data the server holds itself (its
evaluation split, on the same public edges): the fallback when no client reference exists.
``distance_from`` measures a reference against exact pooled counts (a simulation's truth); the
hand-off reports it for the clients' reference and, for comparison, for the server split.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fedshield.privacy.reference import (
    BANDS,
    EDGES_SOURCE,
    ReferenceRelease,
    fixed_edges,
    histograms,
    image_summary_features,
    image_summary_names,
    monitored_features,
    names_for,
    normalise,
    public_edges,
    summed,
    total_variation,
)

from fedshield.run_records import DataQuality

# Re-exported: drift.py, serving and tests import these from here (their home is
# privacy/reference.py).
__all__ = ["BANDS", "EDGES_SOURCE", "Reference", "ReferenceRelease", "fixed_edges", "histograms",
           "image_summary_features", "image_summary_names", "merge_histograms",
           "monitored_features", "names_for", "normalise", "public_edges", "reference_from_data",
           "with_client_class_priors"]

CLIENTS_DP = "clients (DP)"
CLIENTS_EXACT = "clients (exact, no DP)"


@dataclass
class Reference:
    """Drift reference: per-feature bin probabilities on fixed edges and class priors."""

    edges: np.ndarray          # (f, bins + 1)
    probs: np.ndarray          # (f, bins), rows sum to 1
    class_priors: np.ndarray   # (num_classes,)
    feature_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    source: str                # e.g. "clients (DP)" or "server evaluation split (...)"
    noise_std: float = 0.0     # std of the noise on each summed count (0: exact)
    details: str = ""          # how it was built: clients, sigma, where the edges come from
    # Distance from the true pooled histograms (a simulation knows them), else None: unknown.
    distance: dict | None = None

    def to_json(self) -> str:
        """The reference as JSON (infinite bin edges as "-inf"/"inf")."""
        data = dataclasses.asdict(self)
        data["edges"] = [[("-inf" if e == -np.inf else "inf" if e == np.inf else float(e))
                          for e in row]
                         for row in self.edges]
        data["probs"], data["class_priors"] = self.probs.tolist(), self.class_priors.tolist()
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Reference:
        """Read a reference written by ``to_json``."""
        d = json.loads(text)
        return cls(np.array([[float(e) for e in row] for row in d["edges"]]), np.array(d["probs"]),
                   np.array(d["class_priors"]), tuple(d["feature_names"]), tuple(d["input_shape"]),
                   d["source"], d.get("noise_std", 0.0), d.get("details", ""),
                   d.get("distance"))

    def save(self, path: str | Path) -> Path:
        """Write the reference as JSON to ``path``; returns the path."""
        Path(path).write_text(self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        """Read a reference saved by ``save``."""
        return cls.from_json(Path(path).read_text())


def merge_histograms(parts: Sequence[ReferenceRelease], edges: np.ndarray,
                     feature_names: tuple[str, ...],
                     input_shape: tuple[int, ...]) -> Reference:
    """Sum the clients' released counts into a reference (post-processing: no privacy cost)."""
    counts, classes, noise = summed(parts)
    private = all(p.private for p in parts)
    sigmas = sorted({p.noise_multiplier for p in parts})
    details = (f"{len(parts)} clients, noise multiplier {', '.join(f'{s:g}' for s in sigmas)}, "
               f"noise std {noise:.3g} per summed count; {EDGES_SOURCE}" if private else
               f"{len(parts)} clients, exact counts; {EDGES_SOURCE}")
    return Reference(edges, normalise(counts), normalise(classes), feature_names, input_shape,
                     CLIENTS_DP if private else CLIENTS_EXACT, noise, details)


def distance_from(reference: Reference, truth_features: np.ndarray,
                  truth_classes: np.ndarray) -> dict:
    """Total-variation distance of ``reference`` from exact pooled counts on the same edges:
    mean and max over the features, per feature, and for the labels."""
    per_feature = total_variation(reference.probs, normalise(truth_features))
    return {"metric": "total variation", "features_mean": float(per_feature.mean()),
            "features_max": float(per_feature.max()),
            "labels": float(total_variation(reference.class_priors, normalise(truth_classes))),
            "per_feature": dict(zip(reference.feature_names, map(float, per_feature),
                                    strict=True))}


def with_client_class_priors(reference: Reference,
                             data_quality: DataQuality | Mapping | None) -> Reference:
    """``reference`` with its class priors from the clients' released class histograms (the run
    summary's ``data_quality``, privacy/releases.py; a mapping is decoded as that record): the
    training label mix, noised under DP. Unchanged when there is no such view, it is not the DP
    one (a run without DP keeps the reference it always had) or it has another number of
    classes."""
    if data_quality is not None and not isinstance(data_quality, DataQuality):
        data_quality = DataQuality.from_dict(data_quality, "data_quality")
    if (data_quality is None or not data_quality.private
            or len(data_quality.class_priors) != len(reference.class_priors)):
        return reference
    priors = normalise(np.asarray(data_quality.class_counts, dtype=np.float64))
    return dataclasses.replace(
        reference, class_priors=priors,
        source=f"{reference.source}; class priors: {data_quality.source} "
               f"({data_quality.clients} clients, noise std {data_quality.noise_std:.3g})")


def reference_from_data(x: np.ndarray, y: np.ndarray, input_shape: tuple[int, ...],
                        num_classes: int,
                        feature_names: tuple[str, ...], bins: int, source: str) -> Reference:
    """A noise-free reference from data the server holds itself (its evaluation split)."""
    feats = monitored_features(x, input_shape)
    edges = fixed_edges(feats, bins)
    classes = np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes).astype(np.float64)
    return Reference(edges, normalise(histograms(feats, edges)), normalise(classes),
                     feature_names, tuple(input_shape), source)
