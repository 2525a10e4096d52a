"""Promotion gate: a registered version becomes ``champion`` only if it meets the policy.

Checks: the run completed (summary ``status``); its DP noise was not reproducible (a seeded noise
makes the epsilon void against the server, so this refuses under any policy); test accuracy of the
served ONNX model >= min_accuracy; per-client epsilon (privacy.epsilon_max) <= max_epsilon, and DP
must be on when a limit is set; accuracy drop under the run's robustness check <= max_accuracy_drop;
ONNX parity <= parity_tolerance; the sha256 of every file the gate reads (model files, export.json,
card, run/summary.json) equal to the registry's; and, when the run was audited before it was
registered (run/audit.json), that no empirical epsilon lower bound exceeds the stated epsilon: a
bound above it refutes the accountant, so that check, like the noise check, cannot be forced.

The policy is the one stored with the version at registration; an explicit policy (``--config``)
can only add to it (``strictest``). A version without a stored policy needs an explicit one: the
gate never runs on an empty policy. ``force`` overrides accuracy/epsilon/robustness/parity failures
only, needs a reason, and is recorded as tags (who, when, why). A failing version gets the
``candidate`` alias and its reasons as tags.
"""

from __future__ import annotations

import getpass
import json
import tempfile
import time
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

from fedshield.deployment.artifacts import EXPORT_JSON, hash_mismatches
from fedshield.deployment.policy import POLICY_TAG, GatePolicy, strictest
from fedshield.deployment.registry import (
    RegistryError,
    client_for,
    download,
    expected_hashes,
    expected_run_hashes,
    get_version,
)
from fedshield.privacy.audit import AUDIT_JSON, AuditRecord, mechanism_digest

from fedshield.errors import ConfigError, StateCorrupted
from fedshield.run_records import COMPLETED, SUMMARY_FILE, RunSummary

CHAMPION, CANDIDATE = "champion", "candidate"
# Checks --force can never override: the inputs are untrustworthy, or the guarantee is void.
HARD_CHECKS = ("integrity", "status", "noise", "audit")
# Files the gate decides on; a version whose registration did not hash them is refused.
MODEL_INPUTS = (EXPORT_JSON,)
RUN_INPUTS = (SUMMARY_FILE,)


@dataclass
class GateDecision:
    """The promotion gate's verdict: every check, why it failed, the policy applied."""
    passed: bool
    reasons: list[str]      # why it failed (empty when it passed)
    checks: list[dict]      # every check: name, passed, detail
    forced: bool = False
    policy: dict = field(default_factory=dict)   # the policy applied
    policy_source: str = ""                       # stored / stored+config / config

    def to_dict(self) -> dict:
        """The decision as a JSON-ready dict."""
        return asdict(self)


def _check(name: str, ok: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(ok), "detail": detail}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def audit_check(audit: AuditRecord, config: Mapping | None) -> dict:
    """The ``audit`` check: every canary attack's empirical lower bound at most its stated
    epsilon. An audit of other settings is not evidence about this model: reported, not failed."""
    if config is not None and audit.mechanism_digest != mechanism_digest(config):
        return _check("audit", True, "run/audit.json audits other settings than this run's "
                      "config.toml: not evidence about this model")
    refuted = [c for c in audit.canary
               if float(c["empirical_epsilon"]) > float(c["stated_epsilon"])]
    if refuted:
        worst = max(refuted, key=lambda c: float(c["empirical_epsilon"]))
        return _check("audit", False, f"empirical epsilon lower bound "
                      f"{float(worst['empirical_epsilon']):.3f} ({worst['adversary']} adversary) "
                      f"exceeds the stated epsilon {float(worst['stated_epsilon']):.3f}: the "
                      "accountant's guarantee is refuted; find the cause before deploying")
    bounds = ", ".join(f"{float(c['empirical_epsilon']):.3f} <= {float(c['stated_epsilon']):.3f}"
                       for c in audit.canary)
    return _check("audit", True, f"empirical lower bounds {bounds or '(no canary attack)'}")


def decide(summary: RunSummary | Mapping | None, export: dict, policy,
           hash_problems: list[str], audit: AuditRecord | None = None,
           config: Mapping | None = None) -> GateDecision:
    """The pure policy: summary.json + export.json + integrity findings -> decision with reasons.

    ``summary``: the run's RunSummary (a parsed summary.json object is decoded into one; None:
    no trustworthy summary). ``policy``: a GatePolicy or a DeploymentConfig (anything with the
    four gate attributes). ``audit``: the registered run's audit record, if it had one;
    ``config``: its config table (to tell whether the audit is of this run's mechanism)."""
    policy = policy if isinstance(policy, GatePolicy) else GatePolicy.from_deployment(policy)
    if summary is None:
        summary = RunSummary()
    elif not isinstance(summary, RunSummary):
        summary = RunSummary.from_dict(summary)
    checks = []
    if summary.status is not None:  # absent in runs written before the status contract
        status = summary.status
        checks.append(_check("status", status == COMPLETED, f"run status {status!r}" + (
            "" if status == COMPLETED else "; only a completed run can be promoted")))
    privacy = summary.privacy
    if privacy.reproducible_noise:
        checks.append(_check("noise", False, "reproducible (seeded) DP noise: the epsilon is NOT "
                             "valid against the server, which can regenerate the noise; retrain "
                             "with privacy.reproducible_noise = false"))
    parity = export.get("parity") or {}
    acc = _number(parity.get("onnx_accuracy"))
    checks.append(_check("accuracy", acc is not None and acc >= policy.min_accuracy,
                         f"test accuracy {acc:.4f} (ONNX) vs minimum {policy.min_accuracy:.4f}"
                         if acc is not None else "export.json records no ONNX test accuracy"))
    if policy.max_epsilon > 0:
        eps = privacy.sample_level_epsilon
        if eps is None:
            checks.append(_check("epsilon", False,
                                 f"no sample-level DP guarantee (privacy disabled) but "
                                 f"deployment.max_epsilon = {policy.max_epsilon}"))
        else:
            checks.append(_check("epsilon", eps <= policy.max_epsilon,
                                 f"per-client epsilon {eps:.3f} vs limit {policy.max_epsilon:.3f}"))
    drop = summary.robustness.accuracy_drop if summary.robustness else None
    if policy.max_accuracy_drop > 0 and drop is not None:
        checks.append(_check("robustness", drop <= policy.max_accuracy_drop,
                             f"accuracy drop under attack {drop:.4f} vs limit "
                             f"{policy.max_accuracy_drop:.4f}"))
    if audit is not None:
        checks.append(audit_check(audit, config))
    diff = _number(parity.get("max_abs_diff"))
    checks.append(_check("parity", diff is not None and diff <= policy.parity_tolerance,
                         f"max |torch - onnxruntime| logit difference {diff:.2e} vs tolerance "
                         f"{policy.parity_tolerance:.1e}" if diff is not None
                         else "export.json records no ONNX parity"))
    checks.append(_check("integrity", not hash_problems,
                         "; ".join(hash_problems) or "every artifact's sha256 matches the "
                                                     "registry"))
    reasons = [f"{c['name']}: {c['detail']}" for c in checks if not c["passed"]]
    return GateDecision(not reasons, reasons, checks, policy=asdict(policy))


def integrity_problems(model_dir: Path, model_hashes: dict[str, str], run_dir: Path,
                       run_hashes: dict[str, str]) -> list[str]:
    """Every gate input must have been hashed at registration and be unchanged."""
    problems = [f"{name} was not hashed at registration (registered by an older fedshield); "
                f"register the run again" for name in MODEL_INPUTS if name not in model_hashes]
    problems += [f"run/{name} was not hashed at registration; register the run again"
                 for name in RUN_INPUTS if name not in run_hashes]
    problems += hash_mismatches(model_dir, model_hashes)
    problems += [f"run/{p}" for p in hash_mismatches(run_dir, run_hashes)]
    return problems


def stored_policy(tags: dict[str, str], params: dict[str, str]) -> GatePolicy | None:
    """The policy registered with the version; the tag must agree with the write-once run param."""
    text = tags.get(POLICY_TAG)
    if text is None:
        return None
    if POLICY_TAG in params and params[POLICY_TAG] != text:
        raise RegistryError(f"the version's {POLICY_TAG} tag ({text}) differs from the policy it "
                            f"was registered with ({params[POLICY_TAG]}); the tag was edited: "
                            f"restore it")
    return GatePolicy.from_json(text)


def applied_policy(stored: GatePolicy | None, explicit: GatePolicy | None,
                   version: str) -> tuple[GatePolicy, str]:
    """The policy a promotion applies and where it came from; never an empty one."""
    if stored is None and explicit is None:
        raise ConfigError(f"version {version} has no stored gate policy (registered before "
                          f"policies were stored); pass --config CONFIG whose [deployment] table "
                          f"is the policy")
    if stored is None:  # then explicit is not None (checked above)
        return cast(GatePolicy, explicit), "config"
    if explicit is None:
        return stored, "stored"
    return strictest(stored, explicit), "stored+config"


def _read_json(path: Path, problems: list[str]) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name} is unreadable ({exc})")
        return {}


def _read_summary(path: Path, problems: list[str]) -> RunSummary | None:
    try:
        return RunSummary.from_json(path.read_bytes(), f"run/{SUMMARY_FILE}")
    except OSError as exc:
        problems.append(f"{path.name} is unreadable ({exc})")
    except StateCorrupted as exc:
        problems.append(str(exc))
    return None


def _read_audit(run_local: Path, run_hashes: dict[str, str],
                problems: list[str]) -> tuple[AuditRecord | None, dict | None]:
    """The registered run's audit record and config; only files hashed at registration count (an
    audit.json added to the store later is not the registered run's)."""
    if AUDIT_JSON not in run_hashes:
        return None, None
    try:
        audit = AuditRecord.from_json((run_local / AUDIT_JSON).read_text())
        config = tomllib.loads((run_local / "config.toml").read_text())
    except (OSError, ConfigError, tomllib.TOMLDecodeError) as exc:
        problems.append(f"run/{AUDIT_JSON} or run/config.toml is unreadable ({exc})")
        return None, None
    return audit, config


def evaluate_version(tracking_uri: str, model_name: str, version: str,
                     policy=None) -> GateDecision:
    """Download a version, verify the hashes of everything the gate reads, and apply the policy
    (the stored one, made stricter by ``policy`` if given: a GatePolicy or DeploymentConfig)."""
    client = client_for(tracking_uri, create=False)
    mv = get_version(client, model_name, version=version)
    explicit = None if policy is None else (
        policy if isinstance(policy, GatePolicy) else GatePolicy.from_deployment(policy))
    params = client.get_run(mv.run_id).data.params
    chosen, source = applied_policy(stored_policy(mv.tags, params), explicit, str(mv.version))
    with tempfile.TemporaryDirectory() as tmp:
        local = download(client, mv, Path(tmp) / "m", tracking_uri)
        run_local = download(client, mv, Path(tmp) / "r", tracking_uri, folder="run")
        hashes = expected_hashes(mv.tags)
        if hashes:
            problems = integrity_problems(local, hashes, run_local, expected_run_hashes(mv.tags))
        else:
            problems = ["no sha256 tags recorded in the registry"]
        export = _read_json(local / EXPORT_JSON, problems)
        summary = _read_summary(run_local / SUMMARY_FILE, problems)
        audit, config = _read_audit(run_local, expected_run_hashes(mv.tags), problems)
    if problems:  # never decide on inputs that are not the registered ones
        export, summary, audit = {}, None, None
    decision = decide(summary, export, chosen, problems, audit, config)
    decision.policy_source = source
    return decision


def record(tracking_uri: str, model_name: str, version: str, decision: GateDecision,
           force_record: dict[str, str] | None = None) -> None:
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
    tags = {"gate": "passed" if decision.passed else "failed", "stage": alias,
            "gate.forced": str(decision.forced).lower(),
            "gate.applied_policy": json.dumps(decision.policy, sort_keys=True),
            "gate.policy_source": decision.policy_source}
    if decision.forced and force_record:
        tags |= {f"gate.forced.{k}": v[:5000] for k, v in force_record.items()}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    for i, reason in enumerate(decision.reasons):
        client.set_model_version_tag(model_name, str(version), f"gate.reason.{i}", reason[:5000])


def _actor() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in this environment (containers)
        return "unknown"


def promote(tracking_uri: str, model_name: str, version: str, policy=None,
            force: bool = False, reason: str = "") -> GateDecision:
    """Run the gate and record it.

    ``policy`` adds to the stored one (None: the stored policy alone). ``force`` overrides policy
    failures, never integrity, a failed run or reproducible noise; it needs ``reason`` and is
    recorded as ``gate.forced.by/at/reason`` tags.
    """
    if force and not reason.strip():
        raise ConfigError("--force needs --reason TEXT saying why the gate is overridden; it is "
                          "recorded on the version with who and when")
    decision = evaluate_version(tracking_uri, model_name, version, policy)
    hard_ok = all(c["passed"] for c in decision.checks if c["name"] in HARD_CHECKS)
    decision.forced = force and not decision.passed and hard_ok
    force_record = {"by": _actor(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "reason": reason.strip()} if decision.forced else None
    record(tracking_uri, model_name, version, decision, force_record)
    return decision
