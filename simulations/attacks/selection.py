"""Which clients are Byzantine."""

from __future__ import annotations

import numpy as np

from fedshield.config import byzantine_count, parse_id_list
from fedshield.errors import ConfigError


def select_byzantine(num_clients: int, fraction: float, explicit_ids: str, seed: int) -> frozenset[int]:
    """Explicit ids ("0,3") if given, else floor(fraction * num_clients) clients drawn with ``seed``."""
    if explicit_ids.strip():
        return frozenset(parse_id_list(explicit_ids, num_clients))
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"attack.byzantine_fraction = {fraction} must be in [0, 1)")
    count = byzantine_count(num_clients, fraction)
    chosen = np.random.default_rng(seed).choice(num_clients, size=count, replace=False)
    return frozenset(int(i) for i in chosen)
