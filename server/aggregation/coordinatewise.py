"""Coordinate-wise median and trimmed mean (Yin et al. 2018).

Both are order statistics along dim 0 of the (n, d) updates, done by selection, not sorting:
numpy's introselect (np.median / np.partition on the tensor's memory) was the fastest option
measured on 2 cores at n = 100, d = 1e6, float32 (two runs; the machine is shared):
np.median 2.3-4.5 s, torch.median 2.7-5.8 s, torch.kthvalue 3.3 s, torch.sort 4.5-14 s; for a
10 % trimmed mean np.partition 2.8-6.1 s vs torch.sort 4.5-14 s. np.partition keeps the kept
values exact, unlike "sum - top-k - bottom-k", which cancels badly against huge outliers.
"""

from __future__ import annotations

import numpy as np
import torch

from fedshield.errors import ConfigError
from server.aggregation.distances import distances_to
from server.aggregation.result import AggregationResult, excess_over_median, working_copy


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Per-coordinate median; the mean of the two middle values when n is even."""
    return torch.from_numpy(np.median(x.detach().cpu().numpy(), axis=0))


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
        values = np.partition(x.detach().cpu().numpy(), (trim, n - trim - 1), axis=0)
        update = torch.from_numpy(values[trim: n - trim].mean(axis=0))
    suspicion = excess_over_median(distances_to(x, update))
    return AggregationResult(update.to(updates.dtype), suspicion, {"trimmed": float(2 * trim)})
