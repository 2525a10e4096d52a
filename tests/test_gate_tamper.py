"""The promotion gate can't be bypassed: stored policy, recorded --force, hashed gate inputs,
moved registries, failed runs and reproducible noise."""

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import typer
from fedshield.deployment.artifacts import IntegrityError, NotDeployable
from fedshield.deployment.card import build_card
from fedshield.deployment.export import ExportResult, export_model
from fedshield.deployment.gate import decide, promote
from fedshield.deployment.handoff import handoff
from fedshield.deployment.policy import GatePolicy, strictest
from fedshield.deployment.registry import (
    RegistryError,
    client_for,
    list_versions,
    register,
    resolve,
)
from fedshield.deployment.serving import create_app
from fedshield.privacy.audit import AUDIT_JSON, AuditRecord, mechanism_digest
from fedshield.tasks import get_task
from typer.testing import CliRunner

from fedshield import configio
from fedshield.commands.deploy import registry_app, serve_command
from fedshield.errors import ConfigError
from tests.config_support import neutral_config
from tests.deploy_support import make_run_dir, trained_state

MODEL = "fedshield-digits-gate"
POLICY = GatePolicy(min_accuracy=0.5, max_epsilon=5.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    uri = f"sqlite:///{root}/registry/registry.db"
    run = make_run_dir(root / "runs", "digits", epsilon_max=3.0)
    deployment = {"registry_uri": uri, "model_name": MODEL, "min_accuracy": 0.5, "max_epsilon": 5.0,
                  "explain_examples": 8, "quantize": False}
    cfg = neutral_config({"task": {"name": "digits"}, "deployment": deployment})
    result = handoff(run, cfg)
    assert result.passed and result.version == "1"
    return {"root": root, "uri": uri, "run": run, "result": result}


def champion(uri) -> str:
    return str(client_for(uri).get_registered_model(MODEL).aliases["champion"])


def variant(setup, name, policy=POLICY, state=None, **run_options) -> str:
    """Register another version: a copy of the export (or one of ``state``) with its own card."""
    run = make_run_dir(setup["root"] / name, "digits", **run_options)
    if state is None:
        shutil.copytree(setup["result"].export_dir, run / "export")
        export = ExportResult.load(run / "export")
        export.out_dir = str(run / "export")
    else:
        export = export_model(get_task("digits"), state, run / "export", quantize=False)
    card = build_card(run, export, explain_examples=4)
    return register(run, export, card, setup["uri"], MODEL, policy=policy)


def artifacts(setup, version) -> Path:
    """The version's artifact folder in the registry's store (``model/`` and ``run/``)."""
    return Path(client_for(setup["uri"]).get_model_version(MODEL, version).source).parent


def promote_cli(setup, *args):
    return CliRunner().invoke(registry_app, ["promote", *args, "-m", MODEL,
                                             "--registry-uri", setup["uri"]])


def test_promote_without_options_applies_the_stored_policy(setup, tmp_path):
    weak = variant(setup, "weak", state=trained_state("digits", epochs=0))  # an untrained model
    out = promote_cli(setup, weak)  # as the README shows it: no --config
    assert out.exit_code == 2, out.output
    assert "policy (stored)" in out.output and "FAIL accuracy" in out.output
    assert "vs minimum 0.5000" in out.output and f"version {weak} -> candidate" in out.output
    assert champion(setup["uri"]) == "1"
    # An explicit policy can add checks but never loosen the stored one.
    lax = tmp_path / "lax.toml"
    lax.write_text(configio.to_toml(neutral_config({"deployment": {"min_accuracy": 0.0}})))
    out = promote_cli(setup, weak, "-c", str(lax), "--json")
    decision = json.loads(out.output)
    assert out.exit_code == 2 and decision["policy_source"] == "stored+config"
    assert decision["policy"]["min_accuracy"] == 0.5 and not decision["passed"]


def test_version_without_a_stored_policy_needs_an_explicit_one(setup, tmp_path):
    version = variant(setup, "nopolicy", policy=None)
    out = promote_cli(setup, version)
    assert out.exit_code == 1 and "no stored gate policy" in out.output
    strict = tmp_path / "strict.toml"
    strict.write_text(configio.to_toml(neutral_config({"deployment": {"min_accuracy": 0.999}})))
    out = promote_cli(setup, version, "-c", str(strict), "--json")
    assert out.exit_code == 2 and json.loads(out.output)["policy_source"] == "config"
    assert champion(setup["uri"]) == "1"


def test_force_needs_a_reason_and_is_recorded(setup):
    version = variant(setup, "eps8", epsilon_max=8.0)
    out = promote_cli(setup, version, "--force")
    assert out.exit_code == 1 and "--reason" in out.output
    assert champion(setup["uri"]) == "1"
    out = promote_cli(setup, version, "--force", "--reason", "signed off by the DPO, ticket 7")
    assert out.exit_code == 0 and "(forced)" in out.output
    tags = client_for(setup["uri"]).get_model_version(MODEL, version).tags
    assert tags["gate"] == "failed" and tags["gate.forced"] == "true"
    assert tags["gate.forced.reason"] == "signed off by the DPO, ticket 7"
    assert tags["gate.forced.by"] and tags["gate.forced.at"].endswith("Z")
    assert json.loads(tags["gate.applied_policy"])["max_epsilon"] == 5.0
    assert promote(setup["uri"], MODEL, "1").passed and champion(setup["uri"]) == "1"


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _set_accuracy(data):
    data["parity"]["onnx_accuracy"] = 0.999


def _set_epsilon(data):
    data["privacy"]["epsilon_max"] = 0.5


def _card_epsilon(data):
    data["privacy"]["epsilon_max"] = 0.5


# (what fails before the edit, registered options, file edited, the edit)
TAMPERING = [
    ("accuracy", {"policy": GatePolicy(min_accuracy=0.999)}, "model/export.json", _set_accuracy),
    ("epsilon", {"epsilon_max": 8.0}, "run/summary.json", _set_epsilon),
    ("epsilon", {"epsilon_max": 8.0}, "model/model_card.json", _card_epsilon),
]


@pytest.mark.parametrize("failing,options,edited,edit", TAMPERING, ids=[t[2] for t in TAMPERING])
def test_tampered_gate_input_is_refused(setup, failing, options, edited, edit):
    version = variant(setup, "tamper-" + edited.replace("/", "-"), **options)
    before = promote(setup["uri"], MODEL, version)
    assert not before.passed and before.reasons[0].startswith(failing)
    _edit_json(artifacts(setup, version) / edited, edit)  # 0.9x -> 0.999, or epsilon 8 -> 0.5
    after = promote(setup["uri"], MODEL, version, force=True, reason="edited the inputs")
    assert not after.passed and not after.forced
    assert [r.split(":")[0] for r in after.reasons if r.startswith("integrity")] == ["integrity"]
    said = " ".join(after.reasons)
    assert Path(edited).name in said and "differs from the recorded" in said
    assert champion(setup["uri"]) == "1"
    if edited.startswith("model/"):  # serving verifies the model folder too
        with pytest.raises(IntegrityError, match=Path(edited).name):
            resolve(f"models:/{MODEL}/{version}", setup["uri"], setup["root"] / f"dl-{version}")


def test_edited_policy_tag_is_refused(setup):
    version = variant(setup, "edited-policy", epsilon_max=8.0)
    client = client_for(setup["uri"])
    client.set_model_version_tag(MODEL, version, "gate.policy", GatePolicy().to_json())
    with pytest.raises(RegistryError, match="tag was edited"):
        promote(setup["uri"], MODEL, version)
    assert champion(setup["uri"]) == "1"


def test_moved_registry_works_or_refuses_clearly(setup, tmp_path):
    old = Path(setup["uri"][len("sqlite:///"):]).parent
    new = tmp_path / "moved"
    shutil.copytree(old, new)
    uri = f"sqlite:///{new}/registry.db"
    hidden = old.parent / "registry-hidden"
    (old / "registry-artifacts").rename(hidden)  # the recorded absolute paths are gone
    try:
        resolved = resolve(f"models:/{MODEL}@champion", uri, tmp_path / "dl")
        assert resolved.version == "1" and (resolved.local_dir / "model.onnx").is_file()
        assert promote(uri, MODEL, "1").passed
        app = create_app(f"models:/{MODEL}@champion", tracking_uri=uri)
        from fastapi.testclient import TestClient

        assert TestClient(app).get("/health").json()["version"] == "1"
        shutil.rmtree(new / "registry-artifacts")  # now missing in both places
        with pytest.raises(RegistryError, match="artifacts of run .* are missing.*together"):
            resolve(f"models:/{MODEL}@champion", uri, tmp_path / "dl2")
        cli = typer.Typer()
        cli.command()(serve_command)
        out = CliRunner().invoke(cli, ["--model", f"models:/{MODEL}@champion",
                                       "--registry-uri", uri])
        assert out.exit_code == 1 and "error:" in out.output and "are missing" in out.output
        assert out.exception is None or isinstance(out.exception, SystemExit)
    finally:
        hidden.rename(old / "registry-artifacts")
    with pytest.raises(RegistryError, match="no registry database"):
        resolve(f"models:/{MODEL}@champion", f"sqlite:///{tmp_path}/nowhere/registry.db")


def test_failed_run_is_never_registered(setup):
    run = make_run_dir(setup["root"] / "failed", "digits", status="failed")
    cfg = neutral_config({"task": {"name": "digits"},
                             "deployment": {"registry_uri": setup["uri"], "model_name": MODEL}})
    before = len(list_versions(setup["uri"], MODEL))
    with pytest.raises(NotDeployable, match="failed"):
        handoff(run, cfg)
    assert not (run / "export").exists() and len(list_versions(setup["uri"], MODEL)) == before
    export = ExportResult.load(setup["result"].export_dir)
    with pytest.raises(NotDeployable, match="never registered"):
        register(run, export, None, setup["uri"], MODEL, policy=POLICY)


def test_reproducible_noise_is_refused_under_any_policy(setup):
    version = variant(setup, "reproducible", policy=GatePolicy(min_accuracy=0.5),
                      reproducible_noise=True)
    decision = promote(setup["uri"], MODEL, version, force=True, reason="research run")
    assert not decision.passed and not decision.forced
    assert decision.reasons[0].startswith("noise")
    assert "NOT valid against the server" in decision.reasons[0]
    assert champion(setup["uri"]) == "1"
    row = next(r for r in list_versions(setup["uri"], MODEL) if r["version"] == version)
    assert "NOT VALID" in row["epsilon_max"]
    assert "EPSILON NOT VALID AGAINST THE SERVER" in row["warning"]
    card = (artifacts(setup, version) / "model" / "model_card.md").read_text()
    assert "EPSILON NOT VALID AGAINST THE SERVER" in card.splitlines()[2]  # right under the title
    out = CliRunner().invoke(registry_app, ["list", "-m", MODEL, "--registry-uri", setup["uri"]])
    assert f"version {version}: EPSILON NOT VALID" in " ".join(out.output.split())


def test_policy_records():
    assert GatePolicy.from_json(POLICY.to_json()) == POLICY
    for bad in ("", "[]", '{"min_accuracy": "x"}', '{"bogus": 1}', '{"max_epsilon": -1}',
                '{"min_accuracy": NaN}'):
        with pytest.raises(ConfigError, match="stored gate policy"):
            GatePolicy.from_json(bad)
    loose = GatePolicy(min_accuracy=0.2, max_epsilon=0.0, max_accuracy_drop=0.1,
                       parity_tolerance=1e-3)
    tight = GatePolicy(min_accuracy=0.5, max_epsilon=4.0, max_accuracy_drop=0.0,
                       parity_tolerance=1e-4)
    assert strictest(loose, tight) == strictest(tight, loose) == GatePolicy(0.5, 4.0, 0.1, 1e-4)


def test_decide_refuses_failed_runs_and_reproducible_noise():
    export = {"parity": {"onnx_accuracy": 0.9, "max_abs_diff": 1e-6}}
    ok = {"status": "completed", "privacy": {"enabled": True, "epsilon_max": 1.0}}
    assert decide(ok, export, GatePolicy(max_epsilon=3.0), []).passed
    failed = decide(ok | {"status": "failed"}, export, GatePolicy(), [])
    assert not failed.passed and failed.reasons[0].startswith("status")
    seeded = ok | {"privacy": {"enabled": True, "epsilon_max": 1.0, "reproducible_noise": True}}
    for policy in (GatePolicy(), GatePolicy(max_epsilon=3.0), GatePolicy(max_epsilon=100.0)):
        assert [r.split(":")[0] for r in decide(seeded, export, policy, []).reasons] == ["noise"]
    # Malformed export records are failed checks, never a traceback.
    assert not decide(ok, {}, GatePolicy(), []).passed
    garbled = {"parity": {"onnx_accuracy": "0.99", "max_abs_diff": None}}
    assert not decide(ok, garbled, GatePolicy(), []).passed


def audit_record(run: Path, empirical: float, stated: float = 3.0, digest: str | None = None):
    """An audit record of ``run``'s own mechanism (or ``digest``'s) with one canary result."""
    config = tomllib.loads((run / "config.toml").read_text())
    canary = {"adversary": "update", "empirical_epsilon": empirical, "stated_epsilon": stated,
              "bound": {"canaries": 400, "confidence": 0.95}, "delta": 1e-5, "accountant": "prv"}
    return AuditRecord(created_at="2026-12-01T00:00:00Z",
                       mechanism_digest=digest or mechanism_digest(config), task="digits",
                       client=0, canaries_in_released_model=False, procedure="test",
                       canary=(canary,))


def test_decide_refuses_a_refuted_guarantee(setup):
    export = {"parity": {"onnx_accuracy": 0.9, "max_abs_diff": 1e-6}}
    ok = {"status": "completed", "privacy": {"enabled": True, "epsilon_max": 3.0}}
    config = tomllib.loads((setup["run"] / "config.toml").read_text())
    holds = decide(ok, export, GatePolicy(), [], audit_record(setup["run"], 0.4), config)
    assert holds.passed and "0.400 <= 3.000" in str(holds.checks)
    refuted = decide(ok, export, GatePolicy(), [], audit_record(setup["run"], 4.2), config)
    assert [r.split(":")[0] for r in refuted.reasons] == ["audit"]
    assert "4.200" in refuted.reasons[0] and "refuted" in refuted.reasons[0]
    # An audit of other settings neither refutes nor supports this model: reported, not failed.
    other = decide(ok, export, GatePolicy(), [], audit_record(setup["run"], 9.0, digest="0" * 64),
                   config)
    assert other.passed and "not evidence about this model" in str(other.checks)


def test_registered_audit_is_checked_and_cannot_be_forced_or_swapped(setup, tmp_path):
    run = make_run_dir(setup["root"] / "audited", "digits", epsilon_max=3.0)
    (run / AUDIT_JSON).write_text(audit_record(run, 4.2).to_json())
    shutil.copytree(setup["result"].export_dir, run / "export")
    export = ExportResult.load(run / "export")
    export.out_dir = str(run / "export")
    version = register(run, export, build_card(run, export, explain_examples=4), setup["uri"],
                       MODEL, policy=POLICY)
    forced = promote(setup["uri"], MODEL, version, force=True, reason="ship it")
    assert not forced.passed and not forced.forced
    assert forced.reasons[0].startswith("audit") and "refuted" in forced.reasons[0]
    # Replacing the registered audit with a favourable one is tampering, not a new audit.
    stored = artifacts(setup, version) / "run" / AUDIT_JSON
    stored.write_text(audit_record(run, 0.1).to_json())
    swapped = promote(setup["uri"], MODEL, version)
    assert not swapped.passed and any(r.startswith("integrity") for r in swapped.reasons)
    # An audit dropped into the store of a version registered without one is not read.
    plain = variant(setup, "unaudited-later", epsilon_max=3.0)
    (artifacts(setup, plain) / "run" / AUDIT_JSON).write_text(audit_record(run, 4.2).to_json())
    assert promote(setup["uri"], MODEL, plain).passed
