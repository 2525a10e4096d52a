"""Norm clipping rules.

``cclip``: centered clipping (Karimireddy et al. 2021), v <- v + mean_i clip(x_i - v, tau), L times,
starting from the previous round's aggregate (the caller keeps it; see Aggregator). tau <= 0 picks
the radius each iteration as the median distance to the center (scale-free; a Byzantine minority
cannot move the median).
``clip``: norm bounding (Sun et al. 2019), clip each update to norm C (default the median norm),
then average.

Both take an f: they are means of clipped updates, whose error is bounded only while the clipped
honest updates outnumber the bad ones, so they refuse n <= 2f when f is given. Suspicion is the
part of a row's distance (norm) beyond the radius that rounding cannot explain.
"""

from __future__ import annotations

import math

import torch
from fedshield.server.aggregation.distances import (
    SUM_BLOCK,
    distance_noise,
    distances_to,
    norms,
    unit_roundoff,
)
from fedshield.server.aggregation.result import (
    AggregationResult,
    check_honest_majority,
    clip_scale,
    excess_over,
    median_of,
    working_copy,
)


def check_cclip(n: int, f: int) -> None:
    """Refuse n <= 2f: centered clipping needs the honest updates to outnumber the bad ones."""
    check_honest_majority("centered clipping", n, f)


def check_clip(n: int, f: int) -> None:
    """Refuse n <= 2f: norm clipping needs the honest updates to outnumber the bad ones."""
    check_honest_majority("norm clipping", n, f)


def cclip(updates: torch.Tensor, center: torch.Tensor | None = None, tau: float = 10.0,
          iters: int = 1, f: int | None = None) -> AggregationResult:
    """Centered clipping: ``iters`` steps of v <- v + mean_i clip(x_i - v, tau) from ``center``.

    tau <= 0 takes the radius of each step as the median distance to v; with ``f`` given, refuses
    n <= 2f."""
    x = working_copy(updates)
    n, d = x.shape
    if f is not None:
        check_cclip(n, f)
    v = torch.zeros(d, dtype=x.dtype) if center is None else center.to(x.dtype).clone()
    for _ in range(iters):
        start = v.clone()  # the suspicion is of the last step's distances, to its start
        dist = distances_to(x, v)
        radius = median_of(dist) if tau <= 0 else tau  # adaptive: half the clients unclipped
        scale = clip_scale(dist, radius)
        # mean_i s_i (x_i - v) without materialising the (n, d) differences
        v += ((scale.to(x.dtype) @ x) - scale.sum().to(x.dtype) * v) / n
    # Suspicion: the excess over the radius, or over the median distance if that is larger - a
    # fixed tau below the honest spread clips every honest client, which is not evidence against
    # them (it quarantined 16 of 16 honest clients at tau = 0.5 in 20 rounds, measured). v's error:
    # each of the iters steps adds a mean of n clipped terms, each at most radius long.
    point_error = iters * math.sqrt(n) * (radius + float(norms(start.reshape(1, -1))[0]))
    reference = max(radius, median_of(dist))
    suspicion = excess_over(dist, reference, distance_noise(x, start, point_error), x.dtype)
    info = {"clipped": float((scale < 1).sum()), "tau": float(radius)}
    return AggregationResult(v.to(updates.dtype), suspicion, info)


def clip(updates: torch.Tensor, clip_norm: float = 0.0, f: int | None = None) -> AggregationResult:
    """Mean of the updates clipped to norm ``clip_norm`` (<= 0: the median norm); with ``f``
    given, refuses n <= 2f."""
    x = working_copy(updates)
    if f is not None:
        check_clip(x.shape[0], f)
    row_norms = norms(x)
    bound = median_of(row_norms) if clip_norm <= 0 else clip_norm
    scale = clip_scale(row_norms, bound)
    update = scale.to(x.dtype) @ x / x.shape[0]
    info = {"clipped": float((scale < 1).sum()), "clip_norm": bound}
    # norms err by at most SUM_BLOCK eps relative (distances.SUM_BLOCK)
    noise = SUM_BLOCK * unit_roundoff(x.dtype) * row_norms
    suspicion = excess_over(row_norms, max(bound, median_of(row_norms)), noise, x.dtype)  # as cclip
    return AggregationResult(update.to(updates.dtype), suspicion, info)
