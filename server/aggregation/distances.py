"""Pairwise geometry of client updates, without (n, n, d) intermediates.

Squared distances come from one Gram matrix, ||a||^2 + ||b||^2 - 2 a.b, built over column blocks
of at most CHUNK_BYTES (they stay in cache: measured faster than 64 MiB blocks). A block's product
is taken in the updates' own precision (float32 GEMM needs no converted copy and measured ~3.5x
faster than converting each block to float64) and the blocks are summed in float64.

The formula loses what is small next to the rows' norms, so it needs rows that are small where
their differences are. Deltas from the global model usually are. When instead the rows share a
common part holding most of their energy (raw weights, or updates of size 1e-7 riding on large
values), the Gram matrix is recomputed on column-centred blocks: distances do not change under a
common shift, and centring removes the cancellation (tests check both cases against exact
differences). Centring is not the default because it costs an extra pass (0.045 s of 0.136 s at
n = 100, d = 1e6) and because the mean it subtracts is not robust: one huge outlier moves it far
from every honest row, which would then carry the outlier's size into their own differences.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK_BYTES = 16 << 20


def column_chunks(n: int, d: int, itemsize: int = 8) -> Iterator[slice]:
    step = max(1, CHUNK_BYTES // (itemsize * max(n, 1)))
    for start in range(0, d, step):
        yield slice(start, min(start + step, d))


def gram(updates: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """(n, n) float64 inner products of the rows (of the column-centred rows when ``centered``)."""
    n, d = updates.shape
    x = updates if updates.dtype in (torch.float32, torch.float64) else updates.float()
    out = torch.zeros(n, n, dtype=torch.float64)
    for cols in column_chunks(n, d, x.element_size()):
        block = x[:, cols]
        if centered:  # out of place: block is a view of the caller's tensor
            block = block - block.mean(dim=0)
        out += (block @ block.T).double()
    return out


def sq_distances_from_gram(g: torch.Tensor) -> torch.Tensor:
    sq = g.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min_(0.0)
    dist.fill_diagonal_(0.0)
    return dist


def centring_pays(g: torch.Tensor) -> bool:
    """Whether the rows' mean holds more than half their energy, from their (uncentred) Gram.

    sum_i ||x_i - mean||^2 = sum_i ||x_i||^2 - n ||mean||^2: only when the common part dominates
    does centring shrink the rows (and the rounding of their products) by more than 2x.
    """
    n = g.shape[0]
    return bool(g.sum() / n > 0.5 * g.diagonal().sum())


def pairwise_sq_distances(updates: torch.Tensor) -> torch.Tensor:
    """(n, n) float64 squared Euclidean distances between the rows."""
    g = gram(updates, centered=False)
    if centring_pays(g):
        g = gram(updates, centered=True)
    return sq_distances_from_gram(g)


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
