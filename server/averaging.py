"""Averaging the global models over rounds (Polyak / EMA): the model the server evaluates and hands
off.

Under DP every round's global model is already private, so averaging them is post-processing: it
costs no privacy and smooths the round-to-round noise of the updates (De et al. 2022 average the
iterates the same way). Clients keep training from the raw global model; only the released model
is averaged.
"""

from __future__ import annotations

import torch


def ema_decay(decay: float, count: int) -> float:
    """The weight on the old average when the ``count``-th model (1-based) arrives.

    min(decay, (count - 1) / count): a plain mean of the first models, then exponential, so the
    initial weights never linger in the average the way a fixed decay from round 0 would keep them.
    """
    return min(decay, (count - 1) / count)


def ema_update(average: dict[str, torch.Tensor] | None, weights: dict[str, torch.Tensor],
               decay: float, count: int) -> dict[str, torch.Tensor]:
    """The average after the ``count``-th model. Float tensors are averaged in float64 (a decay
    near 1 loses float32 precision); others (counters) take the newest value."""
    if average is None or count <= 1:
        return {k: v.detach().to(torch.float64) if v.is_floating_point() else v.detach().clone()
                for k, v in weights.items()}
    if set(average) != set(weights):
        raise ValueError(f"weights changed names: {sorted(set(average) ^ set(weights))}")
    beta = ema_decay(decay, count)
    return {k: (beta * average[k] + (1 - beta) * v.detach().to(torch.float64))
            if v.is_floating_point() else v.detach().clone() for k, v in weights.items()}


class ModelAverage:
    """Running average of the global models, one ``update`` a round; ``state_dict`` for
    checkpoints."""

    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay = {decay}: must be in [0, 1)")
        self.decay = decay
        self.count = 0
        self.average: dict[str, torch.Tensor] | None = None

    @property
    def enabled(self) -> bool:
        """Averaging is on (``aggregation.model_ema`` > 0)."""
        return self.decay > 0

    def update(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add this round's global model; returns the model to evaluate and release, in the
        dtypes of ``weights`` (the raw model itself when averaging is off)."""
        if not self.enabled:
            return weights
        self.count += 1
        self.average = ema_update(self.average, weights, self.decay, self.count)
        return self.current(weights)

    def current(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The averaged weights in ``like``'s dtypes (``like`` itself when averaging is off)."""
        if not self.enabled or self.average is None:
            return like
        return {k: self.average[k].to(v.dtype) for k, v in like.items()}

    def state_dict(self) -> dict:
        """torch.save-able state for checkpoints."""
        return {"count": self.count, "average": self.average}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore what ``state_dict`` saved (nothing for None)."""
        if state:
            self.count, self.average = int(state["count"]), state["average"]
