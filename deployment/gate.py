"""Promotion gate: a registered version becomes ``champion`` only if it meets the policy.

Checks (policy = ``[deployment]`` config): test accuracy of the served ONNX model >= min_accuracy;
per-client epsilon (privacy.epsilon_max in summary.json) <= max_epsilon, and DP must be on when a
limit is set; accuracy drop under the run's robustness check (summary.robustness.accuracy_drop,
when present) <= max_accuracy_drop; ONNX parity <= parity_tolerance; every artifact's sha256 equal
to the registry's. A failing version gets the ``candidate`` alias and its reasons as tags.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from deployment.artifacts import EXPORT_JSON, hash_mismatches
from deployment.registry import client_for, download, expected_hashes, get_version
from fedshield.config import DeploymentConfig

CHAMPION, CANDIDATE = "champion", "candidate"


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str]      # why it failed (empty when it passed)
    checks: list[dict]      # every check: name, passed, detail
    forced: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _check(name: str, ok: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(ok), "detail": detail}


def decide(summary: dict, export: dict, policy: DeploymentConfig, hash_problems: list[str]) -> GateDecision:
    """The pure policy: summary.json + export.json + integrity findings -> decision with reasons."""
    checks = []
    acc = export["parity"]["onnx_accuracy"]
    checks.append(_check("accuracy", acc >= policy.min_accuracy,
                         f"test accuracy {acc:.4f} (ONNX) vs minimum {policy.min_accuracy:.4f}"))
    if policy.max_epsilon > 0:
        privacy = summary.get("privacy") or {}
        eps = privacy.get("epsilon_max") if privacy.get("enabled") else None
        if eps is None:
            checks.append(_check("epsilon", False, f"no sample-level DP guarantee (privacy disabled) but "
                                 f"deployment.max_epsilon = {policy.max_epsilon}"))
        else:
            checks.append(_check("epsilon", eps <= policy.max_epsilon,
                                 f"per-client epsilon {eps:.3f} vs limit {policy.max_epsilon:.3f}"))
    drop = (summary.get("robustness") or {}).get("accuracy_drop")
    if policy.max_accuracy_drop > 0 and drop is not None:
        checks.append(_check("robustness", drop <= policy.max_accuracy_drop,
                             f"accuracy drop under attack {drop:.4f} vs limit {policy.max_accuracy_drop:.4f}"))
    diff = export["parity"]["max_abs_diff"]
    checks.append(_check("parity", diff <= policy.parity_tolerance,
                         f"max |torch - onnxruntime| logit difference {diff:.2e} vs tolerance "
                         f"{policy.parity_tolerance:.1e}"))
    checks.append(_check("integrity", not hash_problems,
                         "; ".join(hash_problems) or "every artifact's sha256 matches the registry"))
    reasons = [f"{c['name']}: {c['detail']}" for c in checks if not c["passed"]]
    return GateDecision(not reasons, reasons, checks)


def evaluate_version(tracking_uri: str, model_name: str, version: str, policy: DeploymentConfig) -> GateDecision:
    """Download a version, verify its hashes against the registry and apply the policy."""
    client = client_for(tracking_uri)
    mv = get_version(client, model_name, version=version)
    with tempfile.TemporaryDirectory() as tmp:
        local = download(client, mv, tmp)
        hashes = expected_hashes(mv.tags)
        problems = hash_mismatches(local, hashes) if hashes else ["no sha256 tags recorded in the registry"]
        export = json.loads((local / EXPORT_JSON).read_text())
        summary_path = Path(client.download_artifacts(mv.run_id, "run/summary.json", tmp))
        summary = json.loads(summary_path.read_text())
    return decide(summary, export, policy, problems)


def record(tracking_uri: str, model_name: str, version: str, decision: GateDecision) -> None:
    """Set the alias (champion or candidate) and write the decision as tags on the version."""
    client = client_for(tracking_uri)
    for key in get_version(client, model_name, version=version).tags:
        if key.startswith("gate.reason."):
            client.delete_model_version_tag(model_name, str(version), key)
    alias = CHAMPION if decision.passed or decision.forced else CANDIDATE
    client.set_registered_model_alias(model_name, alias, str(version))
    stale = CANDIDATE if alias == CHAMPION else CHAMPION
    if str(client.get_registered_model(model_name).aliases.get(stale)) == str(version):
        client.delete_registered_model_alias(model_name, stale)
    client.set_model_version_tag(model_name, str(version), "gate", "passed" if decision.passed else "failed")
    client.set_model_version_tag(model_name, str(version), "stage", alias)
    client.set_model_version_tag(model_name, str(version), "gate.forced", str(decision.forced).lower())
    for i, reason in enumerate(decision.reasons):
        client.set_model_version_tag(model_name, str(version), f"gate.reason.{i}", reason[:5000])


def promote(tracking_uri: str, model_name: str, version: str, policy: DeploymentConfig,
            force: bool = False) -> GateDecision:
    """Run the gate and record it. ``force`` overrides policy failures, never integrity ones."""
    decision = evaluate_version(tracking_uri, model_name, version, policy)
    integrity_ok = next(c for c in decision.checks if c["name"] == "integrity")["passed"]
    decision.forced = force and not decision.passed and integrity_ok
    record(tracking_uri, model_name, version, decision)
    return decision
