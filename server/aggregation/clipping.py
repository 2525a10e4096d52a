"""Norm clipping rules.

``cclip``: centered clipping (Karimireddy et al. 2021), v <- v + mean_i clip(x_i - v, tau), L times,
starting from the previous round's aggregate (the caller keeps it; see Aggregator). tau <= 0 picks
the radius each iteration as the median distance to the center (scale-free; a Byzantine minority
cannot move the median).
``clip``: norm bounding (Sun et al. 2019), clip each update to norm C (default the median norm),
then average.
"""

from __future__ import annotations

import torch

from server.aggregation.distances import distances_to, norms
from server.aggregation.result import AggregationResult, clip_scale, median_of, working_copy


def cclip(updates: torch.Tensor, center: torch.Tensor | None = None, tau: float = 10.0,
          iters: int = 1) -> AggregationResult:
    x = working_copy(updates)
    n, d = x.shape
    v = torch.zeros(d, dtype=x.dtype) if center is None else center.to(x.dtype).clone()
    for _ in range(iters):
        dist = distances_to(x, v)
        radius = median_of(dist) if tau <= 0 else tau  # adaptive: half the clients unclipped
        scale = clip_scale(dist, radius)
        # mean_i s_i (x_i - v) without materialising the (n, d) differences
        v += ((scale.to(x.dtype) @ x) - scale.sum().to(x.dtype) * v) / n
    suspicion = (1.0 - scale).clamp(0.0, 1.0)
    info = {"clipped": float((scale < 1).sum()), "tau": float(radius)}
    return AggregationResult(v.to(updates.dtype), suspicion, info)


def clip(updates: torch.Tensor, clip_norm: float = 0.0) -> AggregationResult:
    x = working_copy(updates)
    row_norms = norms(x)
    bound = median_of(row_norms) if clip_norm <= 0 else clip_norm
    scale = clip_scale(row_norms, bound)
    update = scale.to(x.dtype) @ x / x.shape[0]
    info = {"clipped": float((scale < 1).sum()), "clip_norm": bound}
    return AggregationResult(update.to(updates.dtype), (1.0 - scale).clamp(0.0, 1.0), info)
