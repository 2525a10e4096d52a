"""Drift reference statistics: per-feature histograms on fixed bin edges plus class priors.

CLIENT side (``client_histograms``): each client counts its own examples and adds Gaussian noise
(the Gaussian mechanism), so the reference leaks no more than a stated DP budget. SERVER side
(``merge_histograms``): sum the clients' noisy counts into one reference.

Monitored features: tabular tasks use their input features; image tasks use a few summary features
(``image_summary_features``): the mean intensity of the whole image and of 4 horizontal bands, 4
vertical bands (9 features). These catch brightness, inversion and shift drift cheaply.

Privacy. Bin edges are fixed in advance from public information (the server's evaluation split),
and the outer bins are open, so each example adds exactly one count to each of the H histograms
(H = features + 1 for the labels). Replacing one example moves one count in each histogram: L2
sensitivity sqrt(2 H) (add/remove adjacency, the one Opacus' DP-SGD accounting uses, needs only
sqrt(H); replace-one is the conservative choice). Noise std = sigma * sensitivity. The release is
one Gaussian mechanism, i.e. the Opacus accountant event ``(sigma, sample_rate=1.0, steps=1)``,
which the client appends to the accountant history of its privacy ledger so it composes with
training.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from fedshield.run_records import DataQuality

BANDS = 4


def image_summary_features(x: np.ndarray) -> np.ndarray:
    """``(n, C, H, W)`` images -> ``(n, 1 + 2 * BANDS)``: mean, row-band means, column-band
    means."""
    gray = x.reshape(len(x), *x.shape[-3:]).mean(1)
    rows = np.array_split(gray, BANDS, axis=1)
    cols = np.array_split(gray, BANDS, axis=2)
    feats = [gray.mean((1, 2))] + [b.mean((1, 2)) for b in rows] + [b.mean((1, 2)) for b in cols]
    return np.stack(feats, 1).astype(np.float64)


def image_summary_names() -> tuple[str, ...]:
    """Names of the summary features the drift monitor computes for images."""
    return (("mean",) + tuple(f"row_band_{i}" for i in range(BANDS))
            + tuple(f"col_band_{i}" for i in range(BANDS)))


def monitored_features(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """The features the drift monitor compares: summaries for images, the inputs for tables."""
    x = np.asarray(x)
    if len(input_shape) == 3:
        return image_summary_features(x)
    return x.reshape(len(x), -1).astype(np.float64)


def fixed_edges(public_features: np.ndarray, bins: int) -> np.ndarray:
    """``(f, bins + 1)`` edges, equal width over each feature's public range; outer edges +-inf.

    Computed once by the server from public data (its evaluation split) and sent to clients.
    """
    lo, hi = public_features.min(0), public_features.max(0)
    hi = np.where(hi > lo, hi, lo + 1.0)
    inner = np.linspace(lo, hi, bins + 1).T
    inner[:, 0], inner[:, -1] = -np.inf, np.inf
    return inner


def histograms(features: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``(f, bins)`` counts: each example lands in exactly one bin per feature."""
    counts = np.empty((edges.shape[0], edges.shape[1] - 1))
    for j in range(edges.shape[0]):
        idx = np.searchsorted(edges[j], features[:, j], side="right") - 1
        counts[j] = np.bincount(np.clip(idx, 0, edges.shape[1] - 2), minlength=edges.shape[1] - 1)
    return counts


@dataclass
class ClientHistograms:
    """What a client sends: noisy counts, and how much privacy they cost."""

    feature_counts: np.ndarray   # (f, bins), noisy
    class_counts: np.ndarray     # (num_classes,), noisy
    sigma: float                 # noise multiplier
    sensitivity: float           # L2 sensitivity of all counts together (replace-one)
    noise_std: float             # sigma * sensitivity, the std of the noise on every count
    event: tuple[float, float, int]  # Opacus accountant history entry (sigma, sample_rate, steps)


def histogram_sensitivity(num_features: int) -> float:
    """L2 sensitivity of one client's feature and class counts together (replace-one)."""
    return float(np.sqrt(2.0 * (num_features + 1)))


def client_histograms(x: np.ndarray, y: np.ndarray, input_shape: tuple[int, ...], num_classes: int,
                      edges: np.ndarray, sigma: float,
                      rng: np.random.Generator) -> ClientHistograms:
    """DP histograms of one client's data (Gaussian mechanism with noise multiplier ``sigma``)."""
    feats = monitored_features(x, input_shape)
    if feats.shape[1] != edges.shape[0]:
        raise ValueError(f"edges are for {edges.shape[0]} features, the data has {feats.shape[1]}")
    counts = histograms(feats, edges)
    classes = np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes).astype(np.float64)
    sensitivity = histogram_sensitivity(feats.shape[1])
    std = sigma * sensitivity
    return ClientHistograms(counts + rng.normal(0.0, std, counts.shape) if std else counts,
                            classes + rng.normal(0.0, std, classes.shape) if std else classes,
                            float(sigma), sensitivity, float(std), (float(sigma), 1.0, 1))


@dataclass
class Reference:
    """Drift reference: per-feature bin probabilities on fixed edges and class priors."""

    edges: np.ndarray          # (f, bins + 1)
    probs: np.ndarray          # (f, bins), rows sum to 1
    class_priors: np.ndarray   # (num_classes,)
    feature_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    source: str                # e.g. "dp-client-histograms (8 clients, sigma 1.0)"
    noise_std: float = 0.0

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
                   d["source"], d.get("noise_std", 0.0))

    def save(self, path: str | Path) -> Path:
        """Write the reference as JSON to ``path``; returns the path."""
        Path(path).write_text(self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        """Read a reference saved by ``save``."""
        return cls.from_json(Path(path).read_text())


def normalise(counts: np.ndarray) -> np.ndarray:
    """Noisy counts -> probabilities: negative counts clipped to 0 (post-processing keeps DP)."""
    clipped = np.clip(counts, 0.0, None)
    totals = clipped.sum(-1, keepdims=True)
    uniform = np.full_like(clipped, 1.0 / clipped.shape[-1])
    return np.where(totals > 0, clipped / np.where(totals > 0, totals, 1.0), uniform)


def merge_histograms(parts: list[ClientHistograms], edges: np.ndarray,
                     feature_names: tuple[str, ...],
                     input_shape: tuple[int, ...]) -> Reference:
    """SERVER side: sum the clients' noisy counts into a reference."""
    if not parts:
        raise ValueError("no client histograms to merge")
    # parts is not empty: the sums are arrays, never sum()'s start value 0
    counts = cast(np.ndarray, sum(p.feature_counts for p in parts))
    classes = cast(np.ndarray, sum(p.class_counts for p in parts))
    sigmas = sorted({p.sigma for p in parts})
    noise = float(np.sqrt(sum(p.noise_std ** 2 for p in parts)))
    return Reference(edges, normalise(counts), normalise(classes), feature_names, input_shape,
                     f"dp-client-histograms ({len(parts)} clients, sigma {sigmas})", noise)


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


def names_for(input_shape: tuple[int, ...], feature_names: tuple[str, ...]) -> tuple[str, ...]:
    """Monitored feature names: image summaries, else the given names or ``feature_<i>``."""
    if len(input_shape) == 3:
        return image_summary_names()
    return feature_names or tuple(f"feature_{i}" for i in range(int(np.prod(input_shape))))
