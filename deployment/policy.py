"""The promotion gate's policy as a record: stored with a registered version, applied on promotion.

Pure (no MLflow): the registry stores ``GatePolicy.to_json()`` and the gate combines a stored
policy with an explicit one through ``strictest``, so an explicit policy can add checks but never
loosen the one the version was registered under.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from fedshield.errors import ConfigError

POLICY_TAG = "gate.policy"


@dataclass(frozen=True)
class GatePolicy:
    """The bounds a run must meet to be promoted; stored with each registered version."""
    min_accuracy: float = 0.0        # test accuracy of the served ONNX model
    max_epsilon: float = 0.0         # per-client epsilon limit (0 = no limit)
    max_accuracy_drop: float = 0.0   # accuracy drop under the robustness check (0 = no limit)
    parity_tolerance: float = 1e-4   # largest |torch - onnxruntime| logit difference

    @classmethod
    def from_deployment(cls, deployment) -> GatePolicy:
        """The gate keys of a ``[deployment]`` table (DeploymentConfig or anything alike)."""
        defaults = cls()
        return cls(**{f.name: float(getattr(deployment, f.name, getattr(defaults, f.name)))
                      for f in fields(cls)})

    def to_json(self) -> str:
        """The policy as sorted-key JSON (the stored form)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GatePolicy:
        """Parse a stored policy; a malformed one is an error, never an empty policy."""
        try:
            data = json.loads(text)
            known = {f.name for f in fields(cls)}
            if not isinstance(data, dict) or set(data) - known:
                raise ValueError(f"keys {sorted(data) if isinstance(data, dict) else data!r}")
            policy = cls(**{k: float(v) for k, v in data.items()})
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"the stored gate policy {text[:200]!r} is malformed ({exc}); "
                              f"register the run again, or promote with --config CONFIG") from None
        if not all(math.isfinite(v) and v >= 0 for v in asdict(policy).values()):
            raise ConfigError(f"the stored gate policy {text[:200]!r} has a non-finite or negative "
                              f"bound; register the run again")
        return policy

    def describe(self) -> str:
        """The bounds in words, for messages and the CLI."""
        def limit(v: float) -> str:
            return f"{v:g}" if v > 0 else "no limit"
        return (f"min_accuracy {self.min_accuracy:g}, max_epsilon {limit(self.max_epsilon)}, "
                f"max_accuracy_drop {limit(self.max_accuracy_drop)}, "
                f"parity_tolerance {self.parity_tolerance:g}")


def _tighter_limit(a: float, b: float) -> float:
    """The smaller of two upper limits where 0 means "no limit"."""
    return max(a, b) if min(a, b) <= 0 else min(a, b)


def strictest(a: GatePolicy, b: GatePolicy) -> GatePolicy:
    """A policy at least as strict as both: every check of either one applies."""
    return GatePolicy(min_accuracy=max(a.min_accuracy, b.min_accuracy),
                      max_epsilon=_tighter_limit(a.max_epsilon, b.max_epsilon),
                      max_accuracy_drop=_tighter_limit(a.max_accuracy_drop, b.max_accuracy_drop),
                      parity_tolerance=min(a.parity_tolerance, b.parity_tolerance))
