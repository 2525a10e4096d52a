"""FLAME (Nguyen et al. 2022): cluster out poisoned updates, clip, add a little noise.

1. HDBSCAN on pairwise cosine distances with min_cluster_size = n // 2 + 1, min_samples = 1 and a
   single cluster allowed - the settings of the authors' code - using scikit-learn's HDBSCAN;
   only the majority cluster is kept (every update is kept if HDBSCAN finds no cluster).
2. The kept updates are clipped to the median of their norms S and averaged.
3. Gaussian noise of std lambda * S is added (lambda = 0.001 in the paper's image tasks), drawn
   from the caller's seeded torch.Generator so runs are reproducible.

The cosine distance matrix is exactly symmetric (distances.gram symmetrises it): scikit-learn's
HDBSCAN refuses a precomputed matrix that is not, which float32 GEMM rounding made it at n = 5..11.
It is taken from distances, not from 1 - cos, so rows close relative to their size keep their
geometry (see distances.cosine_distances).
FLAME keeps a majority cluster, so it assumes honest clients are more than half: with ``f``
given it refuses n <= 2f.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from fedshield.server.aggregation.distances import (
    ROUNDING_SLACK,
    SUM_BLOCK,
    cosine_distances,
    norms,
    unit_roundoff,
)
from fedshield.server.aggregation.result import (
    AggregationResult,
    check_honest_majority,
    clip_scale,
    excess_over_median,
    median_of,
    working_copy,
)


def check_flame(n: int, f: int) -> None:
    """Refuse n <= 2f: FLAME keeps a majority cluster, so honest clients must be a majority."""
    check_honest_majority("FLAME", n, f)


def majority_cluster(cosine_distance: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the updates in the cluster holding more than half of them."""
    n = cosine_distance.shape[0]
    if n < 3:
        return torch.ones(n, dtype=torch.bool)
    # scikit-learn only here: importing it costs every process (each worker) seconds
    from sklearn.cluster import HDBSCAN

    distance = cosine_distance.numpy()
    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed",
                     allow_single_cluster=True, copy=True).fit(distance).labels_
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        return torch.ones(n, dtype=torch.bool)
    return torch.from_numpy(labels == np.bincount(clustered).argmax())


def flame(updates: torch.Tensor, noise: float = 0.001,
          generator: torch.Generator | None = None, f: int | None = None) -> AggregationResult:
    """FLAME: keep the majority HDBSCAN cluster, clip to its median norm, average, add noise of
    std ``noise`` * that norm drawn from ``generator``; with ``f`` given, refuses n <= 2f."""
    x = working_copy(updates)
    if f is not None:
        check_flame(x.shape[0], f)
    cos_dist = cosine_distances(x)
    keep = majority_cluster(cos_dist)
    kept = x[keep]
    kept_norms = norms(kept)
    bound = median_of(kept_norms)
    scale = clip_scale(kept_norms, bound)
    update = scale.to(x.dtype) @ kept / kept.shape[0]
    if noise > 0:
        update = update + torch.randn(update.shape, generator=generator,
                                      dtype=x.dtype) * (noise * bound)
    info = {"selected": float(keep.sum()), "clip_norm": bound,
            "clipped": float((scale < 1).sum())}
    return AggregationResult(update.to(updates.dtype), cluster_suspicion(cos_dist, keep, x), info)


def cluster_suspicion(cos_dist: torch.Tensor, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """For a dropped update, how far its median cosine distance to the kept ones exceeds the
    typical one (excess_over_median), so evidence is graded like Krum's; for every update, at
    least the excess of its norm over the median norm.

    Not a flat 1: HDBSCAN calls some honest updates noise in most rounds (min_samples = 1), and
    flat 1s quarantined 9 of 11 honest clients in 30 honest-only rounds (tests measure it)."""
    to_kept = cos_dist[:, keep].clone()
    to_kept[keep.nonzero().flatten(), torch.arange(int(keep.sum()))] = float("nan")  # not self
    typical = to_kept.nanmedian(dim=1).values.nan_to_num(0.0)
    # 1 - cos from Gram products errs by ~2 sqrt(d) eps (distances.sq_distance_noise, / |a||b|)
    noise = 2.0 * ROUNDING_SLACK * math.sqrt(x.shape[1]) * unit_roundoff(x.dtype)
    suspicion = excess_over_median(typical, noise, x.dtype)
    suspicion[keep] = 0.0
    # FLAME's second line of defence is the norm: an update the clustering cannot place (random
    # directions look alike to cosine) but of outsized norm is evidence too, graded the same way.
    row_norms = norms(x)
    by_norm = excess_over_median(row_norms, SUM_BLOCK * unit_roundoff(x.dtype) * row_norms, x.dtype)
    return torch.maximum(suspicion, by_norm)
