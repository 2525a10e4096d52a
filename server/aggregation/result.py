"""The value every rule returns, and small helpers the rules share."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from fedshield.server.aggregation.distances import ROUNDING_SLACK, unit_roundoff

from fedshield.errors import ConfigError


@dataclass
class AggregationResult:
    """What a rule returns: the aggregate, each client's suspicion and a few numbers."""
    update: torch.Tensor  # (d,), same dtype as the input updates
    suspicion: torch.Tensor  # (n,) float in [0, 1], the rule's own evidence that client i is bad
    info: dict[str, float] = field(default_factory=dict)


def working_copy(updates: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are averaged in float32; float32/float64 are used as they are."""
    if updates.dim() != 2:
        raise ValueError(f"updates must be an (n, d) tensor, got shape {tuple(updates.shape)}")
    if not updates.is_floating_point():
        raise ValueError(f"updates must be floating point, got {updates.dtype}")
    return updates if updates.dtype in (torch.float32, torch.float64) else updates.float()


def median_of(values: torch.Tensor) -> float:
    """The usual median of a vector (mean of the two middle values for even length)."""
    return float(torch.quantile(values.double(), 0.5))


def excess_over_median(values: torch.Tensor, noise: torch.Tensor | float = 0.0,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(value - median - tol) / value, clamped to [0, 1]: 0 for typical clients, -> 1 for far
    outliers.

    A client at twice the typical distance scores ~0.5, at ten times ~0.9; honest spread stays low
    because the median is taken over the round's own clients. Scores within rounding of the
    median are 0: tol = ROUNDING_SLACK * eps(dtype) * |median| (the values' own relative rounding)
    + ``noise`` (the caller's absolute bound on each value's rounding, from the size of the rows it
    came from; see distances.sq_distance_noise / distance_noise). Without it, rows that are equal
    up to rounding (after NNM, most honest rows) have a median score of ~0 and every honest score
    above it - pure rounding, and kernel-dependent - would be "fully suspicious".
    """
    values = values.double()
    return excess_over(values, median_of(values), noise, dtype)


def excess_over(values: torch.Tensor, bound: float, noise: torch.Tensor | float = 0.0,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(value - bound - tol) / value clamped to [0, 1], tol as in ``excess_over_median``; with
    bound = a clipping radius this is 1 - the clipping factor, minus what rounding explains."""
    values = values.double()
    tol = ROUNDING_SLACK * unit_roundoff(dtype) * abs(bound) + torch.as_tensor(noise).double()
    excess = values - bound - tol
    ratio = excess / values.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(excess > 0, ratio, torch.zeros_like(ratio)).clamp(0.0, 1.0)


def check_honest_majority(rule: str, n: int, f: int) -> None:
    """Refuse n <= 2f: a rule whose breakdown point is 1/2 cannot outvote f of n bad updates."""
    if f < 0 or n <= 2 * f:
        raise ConfigError(f"{rule} needs more honest than Byzantine updates, n > 2f, got n = {n}, "
                          f"f = {f}; lower aggregation.f (or byzantine_fraction_assumed) to at "
                          f"most {max((n - 1) // 2, 0)} or sample more clients")


def clip_scale(norms: torch.Tensor, bound: float | torch.Tensor) -> torch.Tensor:
    """Factor min(1, bound / norm) per row; rows of norm 0 keep factor 1."""
    norms = norms.double()
    return torch.where(norms > bound, bound / norms.clamp_min(1e-300), torch.ones_like(norms))


def mean_of_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of the chosen rows without an (m, d) copy of the selection: a few rows are summed one
    by one (reading only them), many by one multi-threaded GEMV with 1/m on the chosen rows."""
    if 4 * len(rows) > x.shape[0]:
        coeffs = torch.zeros(x.shape[0], dtype=x.dtype).index_fill_(0, rows, 1.0 / len(rows))
        return coeffs @ x
    total = x[int(rows[0])].clone()
    for i in rows[1:].tolist():
        total += x[i]
    return total / len(rows)
