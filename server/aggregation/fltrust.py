"""FLTrust (Cao et al. 2021): trust updates that point the way of the server's own update.

The server trains on a small clean root dataset and passes its update g0 as ``reference``.
Trust TS_i = ReLU(cos(x_i, g0)); each update is rescaled to ||g0||; the aggregate is the
trust-weighted mean. With zero total trust the aggregate is zero (nothing is trusted).

Takes no f: trust comes from the server's own root data, not from a vote among the clients, so
FLTrust makes no honest-majority assumption (Cao et al. evaluate it with most clients malicious).
"""

from __future__ import annotations

import torch
from fedshield.server.aggregation.distances import dots, norms
from fedshield.server.aggregation.result import AggregationResult, working_copy

from fedshield.errors import ConfigError


def fltrust(updates: torch.Tensor, reference: torch.Tensor | None) -> AggregationResult:
    """FLTrust: the mean of the updates rescaled to ||reference||, weighted by ReLU(cosine with
    ``reference``), the server's update on its clean root data; suspicion is 1 - trust."""
    if reference is None:
        raise ConfigError("FLTrust needs the server's reference update from a clean root dataset "
                          "(pass reference=...); without server root data choose another rule, "
                          "e.g. aggregation.rule = \"cclip\" or \"multikrum\"")
    x = working_copy(updates)
    if reference.shape != (x.shape[1],):
        raise ValueError(f"reference must have shape ({x.shape[1]},), got {tuple(reference.shape)}")
    ref_norm = float(norms(reference.reshape(1, -1))[0])
    row_norms = norms(x)
    cosine = dots(x, reference) / (row_norms * ref_norm).clamp_min(1e-300)
    trust = cosine.clamp(0.0, 1.0)
    if trust.sum() <= 0:
        update = torch.zeros(x.shape[1], dtype=x.dtype)
    else:
        coeffs = trust * ref_norm / row_norms.clamp_min(1e-300) / trust.sum()
        update = coeffs.to(x.dtype) @ x
    info = {"trusted": float((trust > 0).sum()), "reference_norm": ref_norm}
    return AggregationResult(update.to(updates.dtype), 1.0 - trust, info)
