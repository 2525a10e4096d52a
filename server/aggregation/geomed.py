"""Geometric median by smoothed Weiszfeld iterations, as in RFA (Pillutla et al. 2022).

z <- sum_i b_i x_i / sum_i b_i with b_i = 1 / max(eps, ||z - x_i||).

Start and stop are chosen so that outliers' size cannot matter: the iterations start at the
coordinate-wise median (inside the honest cluster whenever n > 2f, unlike the mean, which 5 rows at
1e9x the honest norm put 1e8 away), and stop when a step moves z by less than ``tol`` times the
median distance of the rows to z (the honest scale), not on the objective's relative change, which
the outliers' distances dominate (measured before this change: error 627 against 0.64 for the true
geometric median with 5 of 25 rows at 1e9x; now within 1e-3 of it, see the tests).
"""

from __future__ import annotations

import torch
from fedshield.server.aggregation.coordinatewise import coordinate_median
from fedshield.server.aggregation.distances import distance_noise, distances_to, mean_error, norms
from fedshield.server.aggregation.result import (
    AggregationResult,
    check_honest_majority,
    excess_over_median,
    median_of,
    working_copy,
)


def check_geomed(n: int, f: int) -> None:
    """Refuse n <= 2f: the geometric median's breakdown point is 1/2."""
    check_honest_majority("the geometric median", n, f)


def geomed(updates: torch.Tensor, iters: int = 10, eps: float = 1e-6, tol: float = 1e-6,
           f: int | None = None) -> AggregationResult:
    """Smoothed Weiszfeld from the coordinate-wise median, at most ``iters`` steps; with ``f``
    given, refuses n <= 2f (breakdown point 1/2)."""
    x = working_copy(updates)
    if f is not None:
        check_geomed(x.shape[0], f)
    z = coordinate_median(x)
    dist = distances_to(x, z)
    steps, moved, coeffs = 0, float("inf"), torch.zeros(x.shape[0], dtype=torch.float64)
    for steps in range(1, iters + 1):  # noqa: B007 - read after the loop (steps taken)
        b = 1.0 / dist.clamp_min(eps)
        coeffs = b / b.sum()
        new = coeffs.to(x.dtype) @ x
        moved = float(distances_to(new.reshape(1, -1), z)[0])
        z, dist = new, distances_to(x, new)
        if moved <= tol * max(median_of(dist), eps):
            break
    info = {"iterations": float(steps), "objective": float(dist.sum()), "last_step": moved}
    noise = distance_noise(x, z, mean_error(coeffs, norms(x)))
    return AggregationResult(z.to(updates.dtype), excess_over_median(dist, noise, x.dtype), info)
