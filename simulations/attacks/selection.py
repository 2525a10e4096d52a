"""Which clients are Byzantine."""

from __future__ import annotations

import math

import numpy as np

from fedshield.errors import ConfigError


def parse_id_list(text: str, num_clients: int, key: str = "attack.byzantine_ids") -> list[int]:
    """``"0,3"`` -> ``[0, 3]``; ids must be distinct integers in [0, num_clients)."""
    ids = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            ids.append(int(part))
        except ValueError:
            raise ConfigError(f"{key} = {text!r}: {part!r} is not an integer; "
                              'write comma-separated client ids, e.g. "0,3"') from None
    bad = [i for i in ids if not 0 <= i < num_clients]
    if bad:
        raise ConfigError(f"{key} = {text!r}: id {bad[0]} is outside [0, {num_clients}) "
                          f"(federation.num_clients = {num_clients})")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{key} = {text!r} lists a client twice")
    return ids


def byzantine_count(num_clients: int, fraction: float) -> int:
    """Byzantine clients for ``fraction`` of ``num_clients``: never more than the fraction says."""
    # The epsilon keeps 0.29 * 100 at 29 despite float rounding.
    return math.floor(fraction * num_clients + 1e-9)


def select_byzantine(num_clients: int, fraction: float, explicit_ids: str,
                     seed: int) -> frozenset[int]:
    """Explicit ids ("0,3") if given, else floor(fraction * num_clients) clients drawn with
    ``seed``."""
    if explicit_ids.strip():
        return frozenset(parse_id_list(explicit_ids, num_clients))
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"attack.byzantine_fraction = {fraction} must be in [0, 1)")
    count = byzantine_count(num_clients, fraction)
    chosen = np.random.default_rng(seed).choice(num_clients, size=count, replace=False)
    return frozenset(int(i) for i in chosen)
