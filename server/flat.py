"""Named arrays <-> flat float32 vectors, in the reference's key order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def flatten(arrays: Mapping[str, np.ndarray], names: list[str]) -> np.ndarray:
    """One float32 vector of ``arrays[name]`` for ``name`` in ``names``, in one allocation."""
    return stack([arrays], names)[0]


def stack(updates: Sequence[Mapping[str, np.ndarray]], names: list[str]) -> np.ndarray:
    """The ``(n, d)`` float32 matrix of n updates, in one allocation."""
    sizes = [int(np.prod(np.shape(updates[0][k]))) if updates else 0 for k in names]
    out = np.empty((len(updates), sum(sizes)), dtype=np.float32)
    for row, arrays in zip(out, updates, strict=True):  # one row per update, by construction
        start = 0
        for name, size in zip(names, sizes, strict=True):
            row[start:start + size] = np.ravel(arrays[name])
            start += size
    return out


def unflatten(vector: np.ndarray, reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays shaped (and typed) like ``reference``; views into ``vector`` where the dtype
    matches."""
    expected = sum(int(a.size) for a in reference.values())
    if vector.ndim != 1 or vector.size != expected:
        raise ValueError(f"vector of shape {vector.shape} does not hold the reference's "
                         f"{expected} values")
    out, start = {}, 0
    for name, ref in reference.items():
        chunk = vector[start:start + ref.size].reshape(ref.shape)
        out[name] = chunk.astype(ref.dtype, copy=False)
        start += ref.size
    return out
