"""Min-Max and Min-Sum (Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the Byzantine").

The malicious update is ``mean + gamma * p`` for a perturbation direction ``p`` (inverse std,
inverse unit mean, or inverse sign), with gamma as large as possible while the update stays inside
the honest updates' spread:

- min-max: its largest distance to an honest update <= the largest honest pairwise distance;
- min-sum: its sum of squared distances to the honest updates <= the largest such sum of an
  honest update.

As in the paper gamma is found by binary search on that feasibility test (the feasible set is an
interval [0, gamma*] because both sides are convex in gamma and gamma = 0 is feasible). Distances
are expanded as ``|c_i|^2 + 2 gamma c_i.p + gamma^2 |p|^2`` with ``c_i = mean - x_i`` so each test
costs O(h), not O(h d).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from fedshield.simulations.attacks.base import broadcast, coordinate_std, knowledge

from fedshield.schema import AttackConfig

# Binary search stops when the bracket is this small relative to gamma.
RELATIVE_TOLERANCE = 1e-9


def perturbation(ref: torch.Tensor, direction: str) -> torch.Tensor:
    """The direction p: minus the coordinate std ("std"), the unit mean ("unit") or its sign."""
    mean = ref.mean(dim=0)
    if direction == "std":
        return -coordinate_std(ref)
    if direction == "unit":
        length = mean.norm()
        return -mean / length if length > 0 else torch.zeros_like(mean)
    if direction == "sign":
        return -torch.sign(mean)
    raise ValueError(f"unknown perturbation direction {direction!r}; use std, unit or sign")


def pairwise_sq_distances(ref: torch.Tensor) -> torch.Tensor:
    """(h, h) squared distances between the rows of ``ref``, clamped at 0."""
    sq = (ref * ref).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2.0 * ref @ ref.T).clamp_min(0.0)


def largest_feasible(feasible: Callable[[float], bool]) -> float:
    """Largest gamma >= 0 with ``feasible(gamma)``, given feasible(0) and an interval feasible
    set."""
    lo, hi = 0.0, 1.0
    while feasible(hi):  # grow the bracket; the quadratic constraint fails for large gamma
        lo, hi = hi, 2.0 * hi
        if hi > 1e300:
            return lo
    while hi - lo > RELATIVE_TOLERANCE * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo


def optimal_gamma(ref: torch.Tensor, p: torch.Tensor, objective: str) -> float:
    """Binary-searched gamma for ``objective`` "minmax" or "minsum" (ref, p in float64)."""
    centred = ref.mean(dim=0) - ref  # c_i
    a = (centred * centred).sum(dim=1)  # |c_i|^2
    b = centred @ p  # c_i . p
    pp = float(p @ p)
    if pp == 0.0:
        return 0.0
    d2 = pairwise_sq_distances(ref)
    if objective == "minmax":
        bound = float(d2.max())

        def feasible(g: float) -> bool:
            return float((a + 2.0 * g * b + g * g * pp).max()) <= bound
    elif objective == "minsum":
        bound = float(d2.sum(dim=1).max())
        sa, sb, h = float(a.sum()), float(b.sum()), ref.shape[0]

        def feasible(g: float) -> bool:
            return sa + 2.0 * g * sb + h * g * g * pp <= bound
    else:
        raise ValueError(f"unknown objective {objective!r}; use minmax or minsum")
    return largest_feasible(feasible)


def _crafter(objective: str) -> Callable[..., torch.Tensor]:
    def craft(own: torch.Tensor, honest: torch.Tensor, params: AttackConfig,
              generator: torch.Generator) -> torch.Tensor:
        ref = knowledge(own, honest)
        p = perturbation(ref, params.minmax_direction)
        gamma = optimal_gamma(ref, p, objective)
        return broadcast(ref.mean(dim=0) + gamma * p, own)

    craft.__name__ = objective
    craft.__doc__ = f"Shejwalkar & Houmansadr's {objective} attack (module docstring)."
    return craft


minmax = _crafter("minmax")
minsum = _crafter("minsum")
