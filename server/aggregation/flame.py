"""FLAME (Nguyen et al. 2022): cluster out poisoned updates, clip, add a little noise.

1. HDBSCAN on pairwise cosine distances with min_cluster_size = n // 2 + 1, min_samples = 1 and a
   single cluster allowed - the settings of the authors' code - using scikit-learn's HDBSCAN;
   only the majority cluster is kept (every update is kept if HDBSCAN finds no cluster).
2. The kept updates are clipped to the median of their norms S and averaged.
3. Gaussian noise of std lambda * S is added (lambda = 0.001 in the paper's image tasks), drawn
   from the caller's seeded torch.Generator so runs are reproducible.

The cosine matrix is exactly symmetric (distances.gram symmetrises it): scikit-learn's HDBSCAN
refuses a precomputed matrix that is not, which float32 GEMM rounding made it at n = 5..11.
FLAME keeps a majority cluster, so it assumes honest clients are more than half: with ``f``
given it refuses n <= 2f.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import HDBSCAN

from server.aggregation.distances import cosine_similarities, norms
from server.aggregation.result import (AggregationResult, check_honest_majority, clip_scale,
                                       median_of, working_copy)


def check_flame(n: int, f: int) -> None:
    check_honest_majority("FLAME", n, f)


def majority_cluster(cosine: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the updates in the cluster holding more than half of them."""
    n = cosine.shape[0]
    if n < 3:
        return torch.ones(n, dtype=torch.bool)
    distance = (1.0 - cosine).clamp_min(0.0).numpy()
    np.fill_diagonal(distance, 0.0)
    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed",
                     allow_single_cluster=True, copy=True).fit(distance).labels_
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        return torch.ones(n, dtype=torch.bool)
    return torch.from_numpy(labels == np.bincount(clustered).argmax())


def flame(updates: torch.Tensor, noise: float = 0.001,
          generator: torch.Generator | None = None, f: int | None = None) -> AggregationResult:
    x = working_copy(updates)
    if f is not None:
        check_flame(x.shape[0], f)
    keep = majority_cluster(cosine_similarities(x))
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
    return AggregationResult(update.to(updates.dtype), (~keep).double(), info)
