"""Geometric median by smoothed Weiszfeld iterations, as in RFA (Pillutla et al. 2022).

z <- sum_i b_i x_i / sum_i b_i with b_i = 1 / max(eps, ||z - x_i||); stops when the objective
sum_i ||z - x_i|| improves by less than ``ftol`` relative, or after ``iters`` steps.
"""

from __future__ import annotations

import torch

from server.aggregation.distances import distances_to
from server.aggregation.result import AggregationResult, excess_over_median, working_copy


def geomed(updates: torch.Tensor, iters: int = 10, eps: float = 1e-6,
           ftol: float = 1e-6) -> AggregationResult:
    x = working_copy(updates)
    z = x.mean(dim=0)
    dist = distances_to(x, z)
    objective = float(dist.sum())
    steps = 0
    for steps in range(1, iters + 1):
        b = 1.0 / dist.clamp_min(eps)
        z = (b / b.sum()).to(x.dtype) @ x
        dist = distances_to(x, z)
        previous, objective = objective, float(dist.sum())
        if abs(previous - objective) <= ftol * max(objective, 1e-300):
            break
    return AggregationResult(z.to(updates.dtype), excess_over_median(dist),
                             {"iterations": float(steps), "objective": objective})
