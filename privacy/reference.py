"""What a client releases for the drift reference: histograms of its monitored features on public
bin edges and its class histogram, as one Gaussian mechanism (the design: docs/privacy.md).

Monitored features: tabular tasks use their input features; image tasks a few summary features
(:func:`image_summary_features`): the mean intensity of the whole image, of 4 horizontal bands and
of 4 vertical bands (9 features). They catch brightness, inversion and shift drift cheaply. The
serving side's drift monitor (deployment/drift.py) computes the same features.

Bin edges are public: :func:`public_edges` spreads ``bins`` equal-width bins over each feature's
range on the task's own test split (data that ships with the task and that the coordinator holds,
no client's data), with open outer bins. Client and server compute them the same way, so nothing
about them travels and a server cannot tailor them to a client.

Privacy. With open outer bins each example adds exactly one count to each of the H = features + 1
histograms (the labels are the last one). Under add/remove-one-example adjacency (the one the
clients' DP-SGD epsilon uses, privacy/releases.py) that moves H counts by 1: L2 sensitivity
sqrt(H). Noise std = sigma x sqrt(H) on every count; the release is one Gaussian mechanism at
noise multiplier sigma, the accountant event ``(sigma, sample_rate = 1, steps = 1)``.

Pure: numpy only, no Flower, no files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from fedshield.privacy.releases import Event, gaussian_noise

from fedshield.errors import ConfigError

BANDS = 4
EDGES_SOURCE = ("equal-width bins over the range of the task's public test split (no client "
                "data), outer bins open")


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


def num_monitored(input_shape: tuple[int, ...]) -> int:
    """How many features the drift monitor compares for inputs of ``input_shape``."""
    return 1 + 2 * BANDS if len(input_shape) == 3 else math.prod(input_shape)


def names_for(input_shape: tuple[int, ...], feature_names: tuple[str, ...]) -> tuple[str, ...]:
    """Monitored feature names: image summaries, else the given names or ``feature_<i>``."""
    if len(input_shape) == 3:
        return image_summary_names()
    return tuple(feature_names) or tuple(f"feature_{i}"
                                         for i in range(num_monitored(input_shape)))


def fixed_edges(public_features: np.ndarray, bins: int) -> np.ndarray:
    """``(f, bins + 1)`` edges, equal width over each feature's range in ``public_features``;
    outer edges +-inf. Give it public data only (:func:`public_edges`)."""
    lo, hi = public_features.min(0), public_features.max(0)
    hi = np.where(hi > lo, hi, lo + 1.0)
    inner = np.linspace(lo, hi, bins + 1).T
    inner[:, 0], inner[:, -1] = -np.inf, np.inf
    return inner


def public_edges(public_x: np.ndarray, input_shape: tuple[int, ...], bins: int) -> np.ndarray:
    """The reference's bin edges from the task's public test inputs (:data:`EDGES_SOURCE`)."""
    return fixed_edges(monitored_features(public_x, input_shape), bins)


def histograms(features: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``(f, bins)`` counts: each example lands in exactly one bin per feature."""
    counts = np.empty((edges.shape[0], edges.shape[1] - 1))
    for j in range(edges.shape[0]):
        idx = np.searchsorted(edges[j], features[:, j], side="right") - 1
        counts[j] = np.bincount(np.clip(idx, 0, edges.shape[1] - 2), minlength=edges.shape[1] - 1)
    return counts


def reference_sensitivity(num_features: int) -> float:
    """L2 sensitivity of the feature and class counts together (add/remove one example)."""
    return math.sqrt(num_features + 1)


# A release's ledger event id: "<run key>/drift-reference-release/<8 hex nonce>" (the ledger's
# run_id of the event; a fresh nonce per draw, so a redraw is a new event and never skipped).
REFERENCE_TAG = "drift-reference-release"
_NONCE_CHARS = 8


def reference_event_id(run_key: str, nonce: str) -> str:
    """The ledger event id of one drift-reference release of run ``run_key``."""
    return f"{run_key}/{REFERENCE_TAG}/{nonce}"


def event_id_problem(event_id: str | None, run_key: str) -> str | None:
    """None when ``event_id`` names a drift-reference ledger event of run ``run_key`` (with its
    nonce), else what is wrong with it."""
    if not event_id:
        return "no ledger event id"
    prefix = reference_event_id(run_key, "")
    nonce = event_id[len(prefix):] if event_id.startswith(prefix) else ""
    if len(nonce) != _NONCE_CHARS or any(c not in "0123456789abcdef" for c in nonce):
        return (f"ledger event id {event_id[:120]!r} is not {prefix}<{_NONCE_CHARS} hex nonce>")
    return None


# A DP training reply's keys for the reference release's event (recorded per client in the
# metrics line of the round whose ledger entry holds it: server/recording.py).
REFERENCE_NOISE_KEY = "dp-reference-noise-multiplier"
REFERENCE_NEW_KEY = "dp-reference-new"  # 1 in the round whose ledger entry holds the event


def reference_event(sigma: float) -> Event:
    """The accountant event of one reference release at noise multiplier ``sigma``."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"privacy.reference_noise_multiplier = {sigma!r} must be a finite "
                          "number > 0")
    return (float(sigma), 1.0, 1)


@dataclass(frozen=True)
class ReferenceRelease:
    """One client's released reference counts (noised under DP) and the mechanism's parameters.

    ``noise_multiplier`` 0 means exact counts (a run without DP: there is no guarantee to keep).
    ``event_id`` names the client's ledger event of a private release (:func:`reference_event_id`;
    None for exact counts, and for releases kept before ids were recorded)."""

    feature_counts: np.ndarray  # (f, bins); may be negative: no post-processing here
    class_counts: np.ndarray    # (num_classes,)
    noise_multiplier: float
    noise_std: float            # std of the noise on every count (sigma x sensitivity)
    event_id: str | None = None

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of these counts (:func:`reference_sensitivity`)."""
        return reference_sensitivity(self.feature_counts.shape[0])

    @property
    def private(self) -> bool:
        """The counts are noised (a DP release), not exact."""
        return self.noise_multiplier > 0

    @property
    def event(self) -> Event:
        """The privacy event of this release (one Gaussian mechanism); only for private ones."""
        return reference_event(self.noise_multiplier)

    def to_metrics(self, new: bool) -> dict[str, float]:
        """A training reply's metrics naming this release's event; ``new``: the event is
        recorded in the ledger this round (the values themselves go only to the query)."""
        return {REFERENCE_NOISE_KEY: self.noise_multiplier,
                REFERENCE_NEW_KEY: 1.0 if new else 0.0}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the client's releases file, the server's client_reference.json)."""
        out = {"feature_counts": self.feature_counts.tolist(),
               "label_counts": self.class_counts.tolist(),
               "noise_multiplier": self.noise_multiplier, "noise_std": self.noise_std}
        return out if self.event_id is None else {**out, "event_id": self.event_id}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], shape: tuple[int, int] | None = None,
                  num_classes: int | None = None) -> ReferenceRelease:
        """The release a ``to_dict`` wrote; ValueError when it is malformed or, given ``shape``
        and ``num_classes``, of another shape."""
        return checked_release(np.asarray(d["feature_counts"], dtype=np.float64),
                               np.asarray(d["label_counts"], dtype=np.float64),
                               float(d["noise_multiplier"]), float(d["noise_std"]), shape,
                               num_classes, event_id=d.get("event_id"))


def checked_release(features: np.ndarray, classes: np.ndarray, sigma: float, std: float,
                    shape: tuple[int, int] | None = None,
                    num_classes: int | None = None,
                    event_id: str | None = None) -> ReferenceRelease:
    """A ReferenceRelease from untrusted parts (a reply, a file); ValueError says what is wrong."""
    if features.ndim != 2 or classes.ndim != 1:
        raise ValueError(f"feature counts must be (features, bins) and class counts a vector; got "
                         f"shapes {features.shape} and {classes.shape}")
    if shape is not None and features.shape != tuple(shape):
        raise ValueError(f"feature counts have shape {features.shape}, expected {tuple(shape)}")
    if num_classes is not None and classes.shape != (num_classes,):
        raise ValueError(f"{classes.shape[0]} class counts, expected {num_classes}")
    if not (np.isfinite(features).all() and np.isfinite(classes).all()):
        raise ValueError("counts must be finite")
    if not (math.isfinite(sigma) and sigma >= 0 and math.isfinite(std) and std >= 0):
        raise ValueError(f"noise multiplier {sigma!r} and noise std {std!r} must be finite >= 0")
    if (sigma > 0) != (std > 0):
        raise ValueError(f"noise multiplier {sigma!r} and noise std {std!r}: both 0 or both > 0")
    if event_id is not None and not isinstance(event_id, str):
        raise ValueError(f"event id is a {type(event_id).__name__}, expected a string")
    return ReferenceRelease(features, classes, float(sigma), float(std), event_id)


def release_reference(features: np.ndarray, labels: np.ndarray, num_classes: int,
                      edges: np.ndarray, sigma: float,
                      rng: np.random.Generator) -> ReferenceRelease:
    """The Gaussian mechanism on one client's monitored-feature and class histograms.

    ``sigma`` 0: the exact counts (only for runs without DP)."""
    if sigma:
        reference_event(sigma)  # validates sigma
    if features.shape[1] != edges.shape[0]:
        raise ValueError(f"edges are for {edges.shape[0]} features, the data has "
                         f"{features.shape[1]}")
    counts = histograms(features, edges)
    classes = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    if len(classes) != num_classes:
        raise ValueError(f"labels reach {len(classes) - 1}, beyond num_classes = {num_classes}")
    classes = classes.astype(np.float64)
    std = float(sigma) * reference_sensitivity(features.shape[1])
    if std:
        counts = counts + gaussian_noise(std, counts.shape, rng)
        classes = classes + gaussian_noise(std, classes.shape, rng)
    return ReferenceRelease(counts, classes, float(sigma), std)


def summed(parts: Sequence[ReferenceRelease]) -> tuple[np.ndarray, np.ndarray, float]:
    """(feature counts, class counts, noise std per count) summed over the clients' releases."""
    if not parts:
        raise ValueError("no client reference releases to merge")
    features = np.sum([p.feature_counts for p in parts], axis=0)
    classes = np.sum([p.class_counts for p in parts], axis=0)
    return features, classes, float(math.sqrt(sum(p.noise_std ** 2 for p in parts)))


def normalise(counts: np.ndarray) -> np.ndarray:
    """Noisy counts -> probabilities: negative counts clipped to 0 (post-processing keeps DP);
    uniform where nothing is left."""
    clipped = np.clip(counts, 0.0, None)
    totals = clipped.sum(-1, keepdims=True)
    uniform = np.full_like(clipped, 1.0 / clipped.shape[-1])
    probs: np.ndarray = np.where(totals > 0, clipped / np.where(totals > 0, totals, 1.0), uniform)
    return probs


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total-variation distance between probability vectors along the last axis, in [0, 1]."""
    distance: np.ndarray = 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum(-1)
    return distance


CLIENT_REFERENCE_FORMAT = "fedshield-client-reference"
CLIENT_REFERENCE_JSON = "client_reference.json"  # in the run folder (server/reference.py)


@dataclass(frozen=True)
class ClientReference:
    """What the ServerApp collected after the last round (the run folder's
    ``client_reference.json``): each client's release by partition label, the public edges they
    are counted on, and who did not send one and why."""

    edges: np.ndarray                        # (f, bins + 1), public (EDGES_SOURCE)
    feature_names: tuple[str, ...]
    num_classes: int
    parts: Mapping[str, ReferenceRelease]    # partition id (node id where unknown) -> release
    refused: Mapping[str, str]               # label -> "code: reason" (the client said why)
    rejected: Mapping[str, str]              # label -> why the server could not use the reply
    noise_multiplier: float                  # the configured sigma (0 without DP)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (infinite outer edges as "-inf"/"inf")."""
        return {"format": CLIENT_REFERENCE_FORMAT, "edges_source": EDGES_SOURCE,
                "edges": [[_edge_text(e) for e in row] for row in self.edges],
                "feature_names": list(self.feature_names), "num_classes": self.num_classes,
                "noise_multiplier": self.noise_multiplier,
                "parts": {k: v.to_dict() for k, v in self.parts.items()},
                "refused": dict(self.refused), "rejected": dict(self.rejected)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClientReference:
        """Read ``to_dict``'s output; ValueError when it is not one or its parts disagree."""
        if d.get("format") != CLIENT_REFERENCE_FORMAT:
            raise ValueError(f"not a {CLIENT_REFERENCE_FORMAT} document")
        edges = np.array([[float(e) for e in row] for row in d["edges"]], dtype=np.float64)
        num_classes = int(d["num_classes"])
        shape = (edges.shape[0], edges.shape[1] - 1)
        parts = {str(k): ReferenceRelease.from_dict(v, shape, num_classes)
                 for k, v in d["parts"].items()}
        return cls(edges, tuple(d["feature_names"]), num_classes, parts,
                   {str(k): str(v) for k, v in d.get("refused", {}).items()},
                   {str(k): str(v) for k, v in d.get("rejected", {}).items()},
                   float(d["noise_multiplier"]))


def _edge_text(e: float) -> float | str:
    return "-inf" if e == -np.inf else "inf" if e == np.inf else float(e)


# A simulation's exact pooled counts on the same edges (simulations/reference_truth.py writes it;
# a real federation has none: the distance is then unknown).
TRUTH_JSON = "reference_truth.json"
