"""SecAgg+ arithmetic, pure: the clients a round sums over and what Flower's mask modulus fits.

Flower's SecAgg+ masks live in ``[0, SECAGG_MODULUS)``: the quantized sum of every sampled
client must fit there, or it wraps around and the server decodes garbage.
"""

from __future__ import annotations

SECAGG_MODULUS = 2**32


def sample_size(num_clients: int, fraction_train: float, min_clients: int) -> int:
    """Clients Flower's legacy FedAvg samples per round (``max(int(n * fraction), min)``)."""
    return min(num_clients, max(int(num_clients * fraction_train), min_clients))


def max_quantization_range(sampled: int) -> int:
    """The largest quantization range whose sum over ``sampled`` clients fits the modulus."""
    return SECAGG_MODULUS // sampled
