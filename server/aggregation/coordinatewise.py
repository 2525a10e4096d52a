"""Coordinate-wise median and trimmed mean (Yin et al. 2018).

Selection runs on the (n, d) tensor along dim 0. Measured on 2 cores at n = 100, d = 1e6 (float32):
torch.median 2.7 s, torch.kthvalue 3.3 s, torch.sort 4.5 s, np.median 2.3 s. So an odd-n median
uses torch.median (one selection); an even-n median needs the two middle values, where one sort
beats two selections (kthvalue twice 6.6 s, median of x and of -x 5.3 s).
"""

from __future__ import annotations

import torch

from fedshield.errors import ConfigError
from server.aggregation.distances import distances_to
from server.aggregation.result import AggregationResult, excess_over_median, working_copy


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Per-coordinate median; the mean of the two middle values when n is even."""
    n = x.shape[0]
    if n % 2 == 1:
        return x.median(dim=0).values
    middle = x.sort(dim=0).values[n // 2 - 1: n // 2 + 1]
    return middle.mean(dim=0)


def median(updates: torch.Tensor) -> AggregationResult:
    x = working_copy(updates)
    update = coordinate_median(x)
    suspicion = excess_over_median(distances_to(x, update))
    return AggregationResult(update.to(updates.dtype), suspicion, {})


def check_trim(n: int, trim: int) -> None:
    if trim < 0 or 2 * trim >= n:
        raise ConfigError(f"trimmed mean needs 2 * trim < n, got trim = {trim} per side with "
                          f"n = {n}; lower aggregation.trim_fraction (or f when it is 0)")


def trimmed_mean(updates: torch.Tensor, trim: int) -> AggregationResult:
    """Per coordinate, drop the ``trim`` largest and ``trim`` smallest values, average the rest."""
    x = working_copy(updates)
    n = x.shape[0]
    check_trim(n, trim)
    if trim == 0:
        update = x.mean(dim=0)
    else:
        # One sort keeps the kept values exact; "sum - top-k - bottom-k" would cancel badly
        # against huge outliers and is barely faster (2 x topk 3.5 s vs sort 4.5 s at 100 x 1e6).
        update = x.sort(dim=0).values[trim: n - trim].mean(dim=0)
    suspicion = excess_over_median(distances_to(x, update))
    return AggregationResult(update.to(updates.dtype), suspicion, {"trimmed": float(2 * trim)})
