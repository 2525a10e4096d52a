"""Pre-aggregation steps for non-IID data; each maps (n, d) updates to (m, d) mixed ones.

Both return ``(mixed, membership)`` where membership[i] is the row of ``mixed`` that client i
went into, so a rule's suspicion of a row maps back to its clients.

``bucketing`` (Karimireddy et al. 2022): shuffle, average buckets of ``bucket_size`` (the last
bucket may be smaller). ``nnm`` (Allouah et al. 2023): replace each update by the mean of its
n - f nearest neighbours, itself included.
"""

from __future__ import annotations

import torch
from fedshield.server.aggregation.distances import pairwise_sq_distances
from fedshield.server.aggregation.result import working_copy

from fedshield.errors import ConfigError


def bucketing(updates: torch.Tensor, bucket_size: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the updates with ``generator`` and average buckets of ``bucket_size`` (the last one
    may be smaller); returns (bucket means, bucket of each client)."""
    x = working_copy(updates)
    n = x.shape[0]
    if bucket_size < 1:
        raise ConfigError(f"aggregation.bucket_size must be >= 1, got {bucket_size}")
    order = torch.randperm(n, generator=generator)
    membership = torch.empty(n, dtype=torch.long)
    membership[order] = torch.arange(n) // bucket_size
    buckets = -(-n // bucket_size)
    counts = torch.bincount(membership, minlength=buckets).to(x.dtype)
    sums = torch.zeros(buckets, x.shape[1], dtype=x.dtype).index_add_(0, membership, x)
    return (sums / counts[:, None]).to(updates.dtype), membership


def check_nnm(n: int, f: int) -> None:
    """Refuse f outside [0, n): nearest-neighbour mixing averages n - f updates."""
    if not 0 <= f < n:
        raise ConfigError(f"nearest-neighbour mixing needs 0 <= f < n, got n = {n}, f = {f}")


def nnm(updates: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-neighbour mixing: each update becomes the mean of its n - f nearest updates,
    itself included; returns (mixed, identity membership)."""
    x = working_copy(updates)
    n = x.shape[0]
    check_nnm(n, f)
    sq_dist = pairwise_sq_distances(x)
    # the diagonal is 0, so each update is among its own n - f nearest (ties broken by index)
    sq_dist.diagonal().fill_(-1.0)
    nearest = sq_dist.topk(n - f, dim=1, largest=False).indices
    mixing = torch.zeros(n, n, dtype=x.dtype).scatter_(1, nearest, 1.0 / (n - f))
    return (mixing @ x).to(updates.dtype), torch.arange(n)
