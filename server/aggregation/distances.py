"""Pairwise geometry of client updates, in float64, without (n, n, d) intermediates.

Squared distances come from one Gram matrix, ||a||^2 + ||b||^2 - 2 a.b, accumulated in float64 over
column chunks (so the float64 copy never exceeds ~16 MiB; smaller blocks stay in cache and
measured faster than 64 MiB ones). Columns are centred first: distances do
not change under a common shift, and centring removes the cancellation that would otherwise lose
updates of size 1e-7 riding on large common values.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK_BYTES = 16 << 20


def column_chunks(n: int, d: int) -> Iterator[slice]:
    step = max(1, CHUNK_BYTES // (8 * max(n, 1)))
    for start in range(0, d, step):
        yield slice(start, min(start + step, d))


def gram(updates: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """(n, n) float64 inner products of the rows (of the column-centred rows when ``centered``)."""
    n, d = updates.shape
    out = torch.zeros(n, n, dtype=torch.float64)
    for cols in column_chunks(n, d):
        block = updates[:, cols].to(torch.float64)
        if centered:  # out of place: for float64 input, block is a view of the caller's tensor
            block = block - block.mean(dim=0)
        out.addmm_(block, block.T)
    return out


def sq_distances_from_gram(g: torch.Tensor) -> torch.Tensor:
    sq = g.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min_(0.0)
    dist.fill_diagonal_(0.0)
    return dist


def pairwise_sq_distances(updates: torch.Tensor) -> torch.Tensor:
    """(n, n) float64 squared Euclidean distances between the rows."""
    return sq_distances_from_gram(gram(updates, centered=True))


def cosine_similarities(updates: torch.Tensor) -> torch.Tensor:
    """(n, n) float64 cosine similarities of the uncentred rows (a zero row: similarity 0)."""
    g = gram(updates, centered=False)
    norms = g.diagonal().sqrt()
    denom = (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    return (g / denom).clamp_(-1.0, 1.0)


def norms(updates: torch.Tensor) -> torch.Tensor:
    """(n,) Euclidean norms of the rows, returned as float64.

    Reduced in the updates' own dtype: torch's vectorised reduction keeps float32 norms within
    ~1e-6 relative, and asking it for float64 accumulation was 3x slower (measured).
    """
    return torch.linalg.vector_norm(updates, dim=1).double()


def dots(updates: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """(n,) float64 inner products of each row with ``vector``."""
    n, d = updates.shape
    out = torch.zeros(n, dtype=torch.float64)
    for cols in column_chunks(n, d):
        out += updates[:, cols].to(torch.float64) @ vector[cols].to(torch.float64)
    return out


def distances_to(updates: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """(n,) Euclidean distances from each row to ``point``, by direct differences, as float64.

    Differences are taken in the updates' dtype: no cancellation, each is rounded relative to
    itself; norms as in ``norms``. Column chunks bound the temporary to CHUNK_BYTES.
    """
    n, d = updates.shape
    point = point.to(updates.dtype)
    sq = torch.zeros(n, dtype=torch.float64)
    for cols in column_chunks(n, d):
        sq += torch.linalg.vector_norm(updates[:, cols] - point[cols], dim=1).double().square()
    return sq.sqrt()
