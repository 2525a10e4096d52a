"""Placeholder FedAvg until the robust rules land (replaced by the aggregation package)."""

from dataclasses import dataclass, field

import torch


@dataclass
class AggregationResult:
    update: torch.Tensor
    suspicion: torch.Tensor
    info: dict = field(default_factory=dict)


class Aggregator:
    def __init__(self, name: str) -> None:
        self.name = name
        self.needs_individual_updates = False

    def __call__(self, updates, weights=None, reference=None) -> AggregationResult:
        w = torch.ones(len(updates), dtype=torch.float64) if weights is None else weights.double()
        mean = (updates.double() * (w / w.sum())[:, None]).sum(0).to(updates.dtype)
        return AggregationResult(mean, torch.zeros(len(updates)), {})

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_aggregator(spec, cfg, num_clients, seed=0) -> Aggregator:
    return Aggregator(spec)
