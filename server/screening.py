"""Server-side screening of client updates before aggregation (pure numpy, no Flower).

Each reply is checked against the global model's arrays, in this order, and rejected at its first
problem; the reason starts with a short code:

- ``missing`` / ``extra``: array names differ from the model's;
- ``dtype``: not a numpy array of the model's kind (a float model needs float arrays: no strings,
  complex, bool or int arrays);
- ``shape``: an array's shape differs from the model's;
- ``nan`` / ``inf``: non-finite values;
- ``norm_cap``: L2 norm above ``screening.max_norm`` (absolute). ``max_norm = 0`` here means no
  bound; the server's strategies pass ``default_norm_bound(global model)`` instead, so an absolute
  bound holds in every round, whatever the number of clients;
- ``norm``: L2 norm above ``screening.max_norm_ratio`` x the median norm of the round's updates that
  passed every check before it (only with at least 3 of them and a non-zero median).

With ``screening.enabled = false`` only the structural checks (missing, extra, dtype, shape) run:
aggregation cannot proceed without them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedshield.errors import TooFewUpdates
from fedshield.records import dtype_kind as _kind
from fedshield.schema import ScreeningConfig

# Norm ratio checks need a meaningful median.
MIN_UPDATES_FOR_RATIO = 3

# Default absolute bound on an update's norm ||weights - global||, for any n (the ratio check
# needs 3 updates): NORM_BOUND_FACTOR x (||global|| + NORM_BOUND_FLOOR x sqrt(d)); the floor keeps
# a model that starts near zero trainable. Measured: the largest honest update on digits was
# 3.4x that scale (DP-SGD at lr 0.5, round 1), and a worst-case estimate for the ScatterNet +
# linear DP benchmark (lr 2, aligned clipped steps) is about 4x. Refusing an honest update is the
# costlier mistake, and with one or two clients no bound makes a round robust anyway, so the bound
# is generous: it stops scaled (1e3x..1e38x), overflowing and garbage updates, not subtle ones.
NORM_BOUND_FACTOR = 100.0
NORM_BOUND_FLOOR = 0.01

# FedAvg weight cap: a client's example count counts for at most MAX_WEIGHT_RATIO x the round's
# median claim, and never for more than all the other clients together.
MAX_WEIGHT_RATIO = 10.0


@dataclass(frozen=True)
class Rejection:
    """One screened-out update: the client and why (``code: detail``)."""
    client: int
    reason: str  # "code: human-readable detail"

    @property
    def code(self) -> str:
        """The reason's code (the part before the colon)."""
        return self.reason.split(":", 1)[0]


def structural_problem(update: Mapping[str, np.ndarray],
                       reference: dict[str, np.ndarray]) -> str | None:
    """Why an update does not match the model's arrays (names, dtypes, shapes), or None."""
    missing = [k for k in reference if k not in update]
    if missing:
        return f"missing: {len(missing)} model array(s) absent, first {missing[0]!r}"
    extra = [k for k in update if k not in reference]
    if extra:
        return f"extra: {len(extra)} unknown array(s), first {extra[0]!r}"
    for name, ref in reference.items():
        arr = update[name]
        if not isinstance(arr, np.ndarray):
            return f"dtype: {name} is a {type(arr).__name__}, expected a numpy array"
        if _kind(arr.dtype) != _kind(ref.dtype):
            return (f"dtype: {name} has dtype {arr.dtype}, expected {_kind(ref.dtype)} like "
                    f"{ref.dtype}")
        if arr.shape != ref.shape:
            return f"shape: {name} has shape {arr.shape}, expected {ref.shape}"
    return None


def non_finite_problem(update: Mapping[str, np.ndarray]) -> str | None:
    """Which arrays of an update hold NaN or Inf, or None."""
    counts: dict[str, dict[str, int]] = {"nan": {}, "inf": {}}
    for name, arr in update.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            counts["nan"][name] = int(np.isnan(arr).sum())
            counts["inf"][name] = int(np.isinf(arr).sum())
    for code, label in (("nan", "NaN"), ("inf", "Inf")):
        hits = {k: v for k, v in counts[code].items() if v}
        if hits:
            first = next(iter(hits))
            more = f" (and {len(hits) - 1} more array(s))" if len(hits) > 1 else ""
            return f"{code}: {hits[first]} {label} values in {first}{more}"
    return None


def update_norm(update: Mapping[str, np.ndarray],
                reference: dict[str, np.ndarray] | None) -> float:
    """L2 norm in float64 (no float16 overflow); of ``update - reference`` when given."""
    total = 0.0
    for name, arr in update.items():
        a = arr.astype(np.float64, copy=False)
        if reference is not None:
            a = a - reference[name]
        total += float(np.dot(a.ravel(), a.ravel()))
    return float(np.sqrt(total))


def default_norm_bound(reference: dict[str, np.ndarray]) -> float:
    """The absolute update-norm bound used when screening.max_norm = 0 (see NORM_BOUND_FACTOR)."""
    d = sum(int(a.size) for a in reference.values())
    scale = update_norm({k: v for k, v in reference.items() if v.dtype.kind == "f"}, None)
    return NORM_BOUND_FACTOR * (scale + NORM_BOUND_FLOOR * float(np.sqrt(d)))


def capped_weights(claims: np.ndarray, ratio: float = MAX_WEIGHT_RATIO) -> np.ndarray:
    """FedAvg weights from positive example counts, so that no single claim captures the mean:
    each is capped at ``ratio`` x the median claim, then the largest at the sum of the others
    (so one client moves the mean at most half way towards itself). With one client: [1]."""
    w = np.minimum(np.asarray(claims, dtype=np.float64), ratio * float(np.median(claims)))
    if len(w) >= 2:
        top = int(np.argmax(w))
        w[top] = min(w[top], float(w.sum() - w[top]))
    return w if len(w) != 1 else np.ones(1)


def screen_updates(updates: Sequence[Mapping[str, np.ndarray]],
                   reference: dict[str, np.ndarray],
                   cfg: ScreeningConfig, client_ids: list[int],
                   relative_to_reference: bool = False) -> tuple[list[int], list[Rejection]]:
    """Indices (into ``updates``) kept, and a Rejection per refused update.

    ``updates`` are deltas; pass ``relative_to_reference=True`` when they are full model weights,
    so norms are measured on ``update - reference``.
    """
    if len(updates) != len(client_ids):
        raise ValueError(f"{len(updates)} updates but {len(client_ids)} client ids")
    problems: dict[int, str] = {}
    for i, update in enumerate(updates):
        problem = structural_problem(update, reference)
        if problem is None and cfg.enabled:
            problem = non_finite_problem(update)
        if problem:
            problems[i] = problem
    if cfg.enabled:
        problems.update(norm_problems(updates,
                                      [i for i in range(len(updates)) if i not in problems],
                                      reference if relative_to_reference else None, cfg))
    kept = [i for i in range(len(updates)) if i not in problems]
    rejections = [Rejection(client_ids[i], problems[i]) for i in sorted(problems)]
    return kept, rejections


def norm_problems(updates: Sequence[Mapping[str, np.ndarray]], candidates: list[int],
                  base: dict[str, np.ndarray] | None, cfg: ScreeningConfig) -> dict[int, str]:
    """Candidates whose update norm breaks the absolute or median-relative bound, with why."""
    norms = {i: update_norm(updates[i], base) for i in candidates}
    problems = {}
    if cfg.max_norm > 0:
        for i in candidates:
            if norms[i] > cfg.max_norm:
                problems[i] = (f"norm_cap: update norm {norms[i]:.4g} exceeds "
                               f"screening.max_norm = {cfg.max_norm:.4g}")
    survivors = [i for i in candidates if i not in problems]
    if cfg.max_norm_ratio > 0 and len(survivors) >= MIN_UPDATES_FOR_RATIO:
        median = float(np.median([norms[i] for i in survivors]))
        for i in survivors:
            if median > 0 and norms[i] > cfg.max_norm_ratio * median:
                problems[i] = (f"norm: update norm {norms[i]:.4g} is {norms[i] / median:.3g}x the "
                               f"round's median {median:.4g} "
                               f"(screening.max_norm_ratio = {cfg.max_norm_ratio:g})")
    return problems


def require_min_kept(kept: list[int], minimum: int, rejections: list[Rejection]) -> None:
    """Raise TooFewUpdates when fewer than ``minimum`` updates survived screening."""
    if len(kept) >= minimum:
        return
    codes: dict[str, int] = {}
    for r in rejections:
        codes[r.code] = codes.get(r.code, 0) + 1
    summary = ", ".join(f"{n} {code}" for code, n in sorted(codes.items())) or "none"
    raise TooFewUpdates(
        f"only {len(kept)} update(s) passed screening, {minimum} needed (rejections: {summary}); "
        "check the rejected clients, relax screening.max_norm_ratio / screening.max_norm, "
        "or lower federation.min_clients")
