"""Coordinate-wise median and trimmed mean (Yin et al. 2018).

Both are means of a window of per-coordinate ranks (the middle one or two; all but ``trim`` at each
end), computed by the column-vectorised sorting network in ``order_stats``: exact, and at n = 100,
d = 1e6 (float32, 2 cores) 9-13x faster than np.median / np.partition, the fastest of NumPy and
torch's selection and sorting routines measured before it. The trimmed mean averages the kept values
themselves, unlike "sum - top-k - bottom-k", which cancels badly against huge outliers.
"""

from __future__ import annotations

import torch
from fedshield.server.aggregation.distances import distance_noise, distances_to
from fedshield.server.aggregation.order_stats import sorted_window_mean
from fedshield.server.aggregation.result import (
    AggregationResult,
    check_honest_majority,
    excess_over_median,
    working_copy,
)

from fedshield.errors import ConfigError


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Per-coordinate median; the mean of the two middle values when n is even."""
    n = x.shape[0]
    middle = (n - 1) // 2
    return _window_mean(x, middle, n - middle).to(x.dtype)


def check_median(n: int, f: int) -> None:
    """Refuse n <= 2f: the median's breakdown point is 1/2."""
    check_honest_majority("the coordinate-wise median", n, f)


def median(updates: torch.Tensor, f: int | None = None) -> AggregationResult:
    """Per-coordinate median; with ``f`` given, refuses n <= 2f (breakdown point 1/2)."""
    x = working_copy(updates)
    if f is not None:
        check_median(x.shape[0], f)
    update = coordinate_median(x)
    suspicion = excess_over_median(distances_to(x, update),
                                   distance_noise(x, update), x.dtype)
    return AggregationResult(update.to(updates.dtype), suspicion, {})


def check_trim(n: int, trim: int) -> None:
    """Refuse a trim that leaves no value: trimmed mean needs 0 <= trim and 2 * trim < n."""
    if trim < 0 or 2 * trim >= n:
        raise ConfigError(f"trimmed mean needs 2 * trim < n, got trim = {trim} per side with "
                          f"n = {n}; lower aggregation.trim_fraction (or f when it is 0)")


def trimmed_mean(updates: torch.Tensor, trim: int) -> AggregationResult:
    """Per coordinate, drop the ``trim`` largest and ``trim`` smallest values, average the rest."""
    x = working_copy(updates)
    n = x.shape[0]
    check_trim(n, trim)
    update = x.mean(dim=0) if trim == 0 else _window_mean(x, trim, n - trim).to(x.dtype)
    # the window mean is taken in float64 and rounded once: an order statistic's error
    suspicion = excess_over_median(distances_to(x, update), distance_noise(x, update), x.dtype)
    return AggregationResult(update.to(updates.dtype), suspicion, {"trimmed": float(2 * trim)})


def _window_mean(x: torch.Tensor, first: int, stop: int) -> torch.Tensor:
    return torch.from_numpy(sorted_window_mean(x.detach().cpu().numpy(), first, stop))
