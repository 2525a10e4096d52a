"""Federated averaging: the weighted (or uniform) mean of the updates."""

from __future__ import annotations

import torch
from fedshield.server.aggregation.distances import distance_noise, distances_to, mean_error, norms
from fedshield.server.aggregation.result import AggregationResult, excess_over_median, working_copy


def fedavg(updates: torch.Tensor, weights: torch.Tensor | None = None) -> AggregationResult:
    """Mean of the updates, weighted by ``weights`` (e.g. example counts) when given.

    Takes no f: the mean has no breakdown point to check (one update can move it anywhere), which
    is why fedavg is only for federations without Byzantine clients, or under central DP."""
    x = working_copy(updates)
    n = x.shape[0]
    if weights is None:
        coeffs = torch.full((n,), 1.0 / n, dtype=x.dtype)
    else:
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if w.shape[0] != n or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {n} non-negative numbers with a positive sum")
        coeffs = (w / w.sum()).to(x.dtype)
    update = coeffs @ x
    row_norms = norms(x)
    noise = distance_noise(x, update, mean_error(coeffs, row_norms), row_norms)
    suspicion = excess_over_median(distances_to(x, update), noise, x.dtype)
    return AggregationResult(update.to(updates.dtype), suspicion, {"selected": float(n)})
