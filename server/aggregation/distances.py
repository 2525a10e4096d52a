"""Pairwise geometry of client updates, without (n, n, d) intermediates.

Squared distances come from one Gram matrix, ||a||^2 + ||b||^2 - 2 a.b, built over column blocks
of at most CHUNK_BYTES (they stay in cache: measured faster than 64 MiB blocks). A block's product
is taken in the updates' own precision (float32 GEMM needs no converted copy and measured ~3.5x
faster than converting each block to float64) and the blocks are summed in float64. A float32
block whose product overflows (a finite row of 1e19 has a squared norm above float32's max) is
recomputed in float64, so every finite float32 input gives finite distances. The Gram matrix is
symmetrised: a GEMM need not round a.b and b.a alike (2.5e-6 apart measured in float32), and
HDBSCAN refuses an asymmetric distance matrix.

The formula loses what is small next to the rows' norms, so it needs rows that are small where
their differences are. Deltas from the global model usually are. When instead the rows share a
common part holding most of their energy (raw weights, or updates of size 1e-7 riding on large
values), the Gram matrix is recomputed on column-centred blocks: distances do not change under a
common shift, and centring removes the cancellation (tests check both cases against exact
differences). Centring is not the default because it costs an extra pass (0.045 s of 0.136 s at
n = 100, d = 1e6) and because the mean it subtracts is not robust: one huge outlier moves it far
from every honest row, which would then carry the outlier's size into their own differences.

Rounding: ``sq_distance_noise`` bounds what the Gram formula's rounding can add to each squared
distance, so suspicion scores can tell rounding from evidence (see result.excess_over_median).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

CHUNK_BYTES = 16 << 20
# Squares are summed in the input dtype over runs of SUM_BLOCK columns, the runs in float64. A
# float32 run of 64 errs by at most 64 eps = 3.8e-6 relative (worst case; 5e-10 measured on
# normal data), against 3.6e-4 measured for torch's float32 vector_norm of a constant row at
# d = 1e6, and costs the same time (5 ms at n = 20, d = 1e6; float64 accumulation: 255 ms).
SUM_BLOCK = 64
# Safety factor of the rounding model below: accumulated rounding grows like sqrt(terms) * eps
# with high probability (Higham & Mary 2019); ROUNDING_SLACK covers the constant and the
# kernel-dependent order of summation (BLAS blocking differs between CPUs).
ROUNDING_SLACK = 8.0


def column_chunks(n: int, d: int, itemsize: int = 8) -> Iterator[slice]:
    """Column slices of an (n, d) array, each about CHUNK_BYTES of ``itemsize``-byte values."""
    step = max(1, CHUNK_BYTES // (itemsize * max(n, 1)))
    for start in range(0, d, step):
        yield slice(start, min(start + step, d))


def unit_roundoff(dtype: torch.dtype) -> float:
    """eps of the precision the rules compute in for ``dtype`` (half precision runs in float32)."""
    return torch.finfo(dtype if dtype == torch.float64 else torch.float32).eps


def _block_product(block: torch.Tensor) -> torch.Tensor:
    prod = (block @ block.T).double()
    if block.dtype != torch.float64 and not torch.isfinite(prod).all():
        prod = block.double() @ block.double().T  # float32 overflow: float64 holds any square
    return prod


def gram(updates: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """(n, n) float64 inner products of the rows (of the column-centred rows when ``centered``);
    exactly symmetric."""
    n, d = updates.shape
    x = updates if updates.dtype in (torch.float32, torch.float64) else updates.float()
    out = torch.zeros(n, n, dtype=torch.float64)
    for cols in column_chunks(n, d, x.element_size()):
        block = x[:, cols]
        if centered:  # out of place: block is a view of the caller's tensor
            block = block - block.mean(dim=0)
        out += _block_product(block)
    if not torch.isfinite(out).all():
        raise ValueError("updates are too large to compare: their squared norms overflow float64 "
                         f"(largest |value| {float(x.abs().max()):.3g}); screen them out first "
                         "(screening.max_norm)")
    return (out + out.T) / 2  # a + b == b + a exactly, so the result is symmetric


def sq_distances_from_gram(g: torch.Tensor) -> torch.Tensor:
    """(n, n) squared distances ||x_i||^2 + ||x_j||^2 - 2 <x_i, x_j> from a Gram matrix, >= 0, with
    an exact zero diagonal."""
    sq = g.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min_(0.0)
    dist.fill_diagonal_(0.0)
    return dist


def sq_distance_noise(g: torch.Tensor, dtype: torch.dtype, d: int,
                      row_norms: torch.Tensor | None = None) -> torch.Tensor:
    """(n, n) bound on the rounding in ``sq_distances_from_gram(g)`` for rows of ``dtype``.

    Two parts. The Gram formula's own: each product a.b over d columns errs by about sqrt(d) eps
    ||a|| ||b|| <= sqrt(d) eps (||a||^2 + ||b||^2) / 2, so ||a||^2 + ||b||^2 - 2 a.b errs by at most
    ~2 sqrt(d) eps (||a||^2 + ||b||^2), times ROUNDING_SLACK (norms of the rows g was built from:
    centred ones when centred). And the rows' own: whatever computed them in this dtype (a delta
    new - old, NNM's mixing) rounded them to ~eps of their (uncentred) ``row_norms``, so rows
    ROUNDING_SLACK ulps apart are equal as far as the dtype can tell: (SLACK eps (||a|| + ||b||))^2.
    """
    sq = g.diagonal()
    eps = unit_roundoff(dtype)
    noise = 2.0 * ROUNDING_SLACK * math.sqrt(max(d, 1)) * eps * (sq[:, None] + sq[None, :])
    if row_norms is not None:
        noise += (ROUNDING_SLACK * eps * (row_norms[:, None] + row_norms[None, :])).square()
    return noise


def centring_pays(g: torch.Tensor) -> bool:
    """Whether the rows' mean holds more than half their energy, from their (uncentred) Gram.

    sum_i ||x_i - mean||^2 = sum_i ||x_i||^2 - n ||mean||^2: only when the common part dominates
    does centring shrink the rows (and the rounding of their products) by more than 2x.
    """
    n = g.shape[0]
    return bool(g.sum() / n > 0.5 * g.diagonal().sum())


def pairwise_geometry(updates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, n) float64 squared distances between the rows and the bound on their rounding."""
    g = gram(updates, centered=False)
    row_norms = g.diagonal().sqrt()
    if centring_pays(g):
        g = gram(updates, centered=True)
    noise = sq_distance_noise(g, updates.dtype, updates.shape[1], row_norms)
    return sq_distances_from_gram(g), noise


def pairwise_sq_distances(updates: torch.Tensor) -> torch.Tensor:
    """(n, n) float64 squared Euclidean distances between the rows (exactly symmetric)."""
    return pairwise_geometry(updates)[0]


def cosine_similarities(updates: torch.Tensor) -> torch.Tensor:
    """(n, n) float64 cosine similarities of the uncentred rows (a zero row: similarity 0);
    exactly symmetric, from the symmetric Gram matrix."""
    g = gram(updates, centered=False)
    norms = g.diagonal().sqrt()
    denom = (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    return (g / denom).clamp_(-1.0, 1.0)


def cosine_distances(updates: torch.Tensor) -> torch.Tensor:
    """(n, n) float64 1 - cos of the rows (1 against a zero row), exactly symmetric.

    1 - a.b / (|a| |b|) loses everything below eps: rows 1e-5 apart relative have 1 - cos ~ 1e-10,
    which a float32 cosine rounds to 0 or 8e-8. The same quantity is (||a - b||^2 - (|a| - |b|)^2)
    / (2 |a| |b|) (the part of the difference across the rows, not along them), from the
    distances, which pairwise_sq_distances keeps exact to rounding for such rows by centring.
    """
    sq = pairwise_sq_distances(updates)
    r = norms(updates)
    across = (sq - (r[:, None] - r[None, :]).square()).clamp_min(0.0)
    denom = 2.0 * r[:, None] * r[None, :]
    out = torch.where(denom > 0, across / denom.clamp_min(1e-300), torch.ones_like(sq))
    return out.clamp_(0.0, 2.0).fill_diagonal_(0.0)


def _row_norms(block: torch.Tensor) -> torch.Tensor:
    """(n,) float64 norms of a block's rows: squares summed in SUM_BLOCK runs (see SUM_BLOCK).

    A row whose float32 squares overflow, or a float64 row beyond 1e154, is redone in float64
    scaled by its largest entry (a norm that fits float64 always comes out finite)."""
    n, w = block.shape
    m = w // SUM_BLOCK * SUM_BLOCK
    sq = torch.zeros(n, dtype=torch.float64)
    if m:
        runs = torch.linalg.vector_norm(block[:, :m].reshape(n, -1, SUM_BLOCK), dim=2)
        sq += runs.double().square().sum(dim=1)
    if m < w:
        sq += torch.linalg.vector_norm(block[:, m:].double(), dim=1).square()
    out = sq.sqrt()
    bad = ~torch.isfinite(out)
    if bad.any():
        rows = block[bad].double()
        top = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
        out[bad] = top.squeeze(1) * torch.linalg.vector_norm(rows / top, dim=1)
    return out


def _combine(parts: list[torch.Tensor]) -> torch.Tensor:
    """Norms of whole rows from the norms of their column chunks (overflow-safe)."""
    stacked = torch.stack(parts, dim=1)
    top = stacked.amax(dim=1, keepdim=True).clamp_min(1e-300)
    row_norms: torch.Tensor = top.squeeze(1) * torch.linalg.vector_norm(stacked / top, dim=1)
    return row_norms


def norms(updates: torch.Tensor) -> torch.Tensor:
    """(n,) Euclidean norms of the rows, returned as float64.

    Squares are accumulated as SUM_BLOCK says: within ~4e-6 relative in float32 whatever d is
    (measured: 5e-10 on normal rows, 7e-8 on constant rows at d = 1e6), and finite for every
    finite input."""
    n, d = updates.shape
    if updates.is_contiguous():  # the runs are a view; the temporary is 1/SUM_BLOCK of the input
        return _row_norms(updates)
    return _combine([_row_norms(updates[:, cols]) for cols in column_chunks(n, d)])


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
    itself (a chunk whose float32 differences overflow is redone in float64: checked on the
    (n,) result, as isfinite over the (n, d) differences cost 5x the distances); norms as in
    ``norms``.
    Column chunks bound the temporary to CHUNK_BYTES.
    """
    n, d = updates.shape
    point = point.to(updates.dtype)
    parts = []
    for cols in column_chunks(n, d):
        part = _row_norms(updates[:, cols] - point[cols])
        if not torch.isfinite(part).all():
            part = _row_norms(updates[:, cols].double() - point[cols].double())
        parts.append(part)
    return _combine(parts)


def distance_noise(updates: torch.Tensor, point: torch.Tensor, point_error: float = 0.0,
                   row_norms: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) bound on the rounding in ``distances_to(updates, point)``, in units of distance.

    The rows and the point are each rounded to ~eps of their norms, and the differences relative
    to themselves; ``point_error`` is the caller's bound, in units of eps, on how far the point's
    own computation moved it (0 for an order statistic; for a weighted mean sum_k c_k x_k computed
    in the dtype, ~sqrt(n) sum_k |c_k| ||x_k||: see ``mean_error``)."""
    row_norms = norms(updates) if row_norms is None else row_norms
    point_norm = float(norms(point.reshape(1, -1))[0])
    return ROUNDING_SLACK * unit_roundoff(updates.dtype) * (row_norms + point_norm + point_error)


def mean_error(coeffs: torch.Tensor, row_norms: torch.Tensor) -> float:
    """Rounding bound (units of eps) of sum_k c_k x_k summed in the rows' dtype: sqrt(n) sum_k
    |c_k| ||x_k|| (random-walk growth over n terms). Rows with weight ~0 (outliers a robust
    rule down-weights) add ~0, so they do not blunt the suspicion of everyone else."""
    return math.sqrt(coeffs.shape[0]) * float(coeffs.double().abs() @ row_norms.double())
