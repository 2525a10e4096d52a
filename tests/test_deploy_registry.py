"""MLflow registry, promotion gate and hand-off on a real digits run folder; registry CLI."""

import json
from pathlib import Path

import pytest
from fedshield.deployment.artifacts import ONNX_DATA, IntegrityError
from fedshield.deployment.card import build_card
from fedshield.deployment.export import ExportResult
from fedshield.deployment.gate import decide, promote
from fedshield.deployment.handoff import handoff
from fedshield.deployment.policy import GatePolicy
from fedshield.deployment.registry import client_for, list_versions, register, resolve
from fedshield.deployment.serving import create_app
from typer.testing import CliRunner

from fedshield.commands.deploy import monitor_command, registry_app
from fedshield.schema import DeploymentConfig
from tests.config_support import neutral_config
from tests.deploy_support import make_run_dir

MODEL = "fedshield-digits-test"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/registry.db"
    run = make_run_dir(root / "runs", "digits", epsilon_max=3.0)
    cfg = neutral_config({"task": {"name": "digits"},
                             "deployment": {"registry_uri": uri, "model_name": MODEL,
                                            "min_accuracy": 0.5,
                                            "max_epsilon": 5.0, "explain_examples": 16}})
    result = handoff(run, cfg)
    return {"root": root, "uri": uri, "run": run, "cfg": cfg, "result": result}


def aliases(uri):
    return {a: str(v) for a, v in client_for(uri).get_registered_model(MODEL).aliases.items()}


def test_passing_model_becomes_champion(setup):
    result = setup["result"]
    assert result.passed and result.reasons == [] and result.version == "1"
    assert aliases(setup["uri"])["champion"] == "1"
    assert Path(result.card_path).is_file() and (setup["run"] / "handoff.json").is_file()
    assert {c["name"] for c in result.checks} == {"status", "accuracy", "epsilon", "parity",
                                                  "integrity"}
    resolved = resolve(f"models:/{MODEL}@champion", setup["uri"], setup["root"] / "dl")
    assert resolved.version == "1" and set(resolved.sha256) >= {"model.onnx", ONNX_DATA,
                                                                "model.safetensors"}
    from fastapi.testclient import TestClient

    health = TestClient(create_app(f"models:/{MODEL}@champion",
                                   tracking_uri=setup["uri"])).get("/health").json()
    assert health == {"status": "ok", "model": MODEL, "version": "1"}


def register_variant(setup, name, **run_options):
    run = make_run_dir(setup["root"] / name, "digits", **run_options)
    export = ExportResult.load(setup["result"].export_dir)
    card = build_card(run, export, explain_examples=8)
    return register(run, export, card, setup["uri"], MODEL,
                    policy=GatePolicy.from_deployment(setup["cfg"].deployment))


def test_epsilon_policy_failure_stays_candidate_with_reason(setup):
    version = register_variant(setup, "eps8", epsilon_max=8.0)
    decision = promote(setup["uri"], MODEL, version)  # the policy stored at registration
    assert decision.policy_source == "stored" and decision.policy["max_epsilon"] == 5.0
    assert not decision.passed and len(decision.reasons) == 1
    assert "epsilon" in decision.reasons[0] and "8.000 vs limit 5.000" in decision.reasons[0]
    tags = client_for(setup["uri"]).get_model_version(MODEL, version).tags
    assert tags["gate"] == "failed" and tags["stage"] == "candidate"
    assert "epsilon" in tags["gate.reason.0"]
    assert aliases(setup["uri"]) == {"champion": "1", "candidate": version}
    # --force overrides a policy failure and records who, when and why.
    forced = promote(setup["uri"], MODEL, version, force=True, reason="accepted by the DPO")
    assert forced.forced and aliases(setup["uri"])["champion"] == version
    assert "candidate" not in aliases(setup["uri"])
    tags = client_for(setup["uri"]).get_model_version(MODEL, version).tags
    assert tags["gate.forced"] == "true" and tags["gate.forced.reason"] == "accepted by the DPO"
    assert tags["gate.forced.by"] and tags["gate.forced.at"].endswith("Z")
    promote(setup["uri"], MODEL, "1", setup["cfg"].deployment)  # restore
    assert aliases(setup["uri"])["champion"] == "1"


def test_tampered_artifact_is_refused_by_gate_and_server(setup):
    version = register_variant(setup, "tamper")
    source = Path(client_for(setup["uri"]).get_model_version(MODEL, version).source)
    data = source / ONNX_DATA
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    decision = promote(setup["uri"], MODEL, version, force=True, reason="try to override")
    assert not decision.passed and not decision.forced
    assert any("integrity" in r and ONNX_DATA in r for r in decision.reasons)
    assert aliases(setup["uri"])["champion"] == "1"
    with pytest.raises(IntegrityError, match=ONNX_DATA):
        resolve(f"models:/{MODEL}/{version}", setup["uri"], setup["root"] / "dl-tampered")
    with pytest.raises(IntegrityError):
        create_app(f"models:/{MODEL}/{version}", tracking_uri=setup["uri"])


def test_tampered_run_folder_is_refused_against_the_registry(setup, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(setup["run"], run)
    (run / "export" / "model.safetensors").write_bytes(b"not the registered weights")
    with pytest.raises(IntegrityError, match="model.safetensors"):
        create_app(run, tracking_uri=setup["uri"])


def test_gate_policy_rules():
    export = {"parity": {"onnx_accuracy": 0.9, "max_abs_diff": 1e-6}}
    no_dp = {"privacy": {"enabled": False}}
    policy = DeploymentConfig(max_epsilon=4.0)
    refused = decide(no_dp, export, policy, [])
    assert not refused.passed and "no sample-level DP" in refused.reasons[0]
    assert decide(no_dp, export, DeploymentConfig(), []).passed  # no epsilon limit configured
    robust = {"privacy": {"enabled": True, "epsilon_max": 1.0},
              "robustness": {"accuracy_drop": 0.12}}
    strict = DeploymentConfig(max_epsilon=4.0, max_accuracy_drop=0.05, min_accuracy=0.95,
                              parity_tolerance=1e-7)
    reasons = decide(robust, export, strict, ["model.onnx is missing"]).reasons
    assert [r.split(":")[0] for r in reasons] == ["accuracy", "robustness", "parity", "integrity"]
    assert decide(robust, export, DeploymentConfig(max_epsilon=4.0, max_accuracy_drop=0.2),
                  []).passed


def test_registry_cli(setup):
    runner = CliRunner()
    out = runner.invoke(registry_app,
                        ["list", "-m", MODEL, "--registry-uri", setup["uri"], "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert rows[0]["version"] == "1" and "champion" in rows[0]["aliases"]
    assert rows[0]["gate"] == "passed"
    out = runner.invoke(registry_app, ["show", "1", "-m", MODEL, "--registry-uri", setup["uri"]])
    assert out.exit_code == 0 and json.loads(out.output)["export"]["task"] == "digits"
    out = runner.invoke(registry_app,
                        ["promote", "1", "-m", MODEL, "--registry-uri", setup["uri"], "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["passed"]
    out = runner.invoke(registry_app,
                        ["list", "-m", "no-such-model", "--registry-uri", setup["uri"]])
    assert out.exit_code == 1 and "no model named" in out.output
    assert "Example:" in runner.invoke(registry_app, ["promote", "--help"]).output
    assert len(list_versions(setup["uri"], MODEL)) >= 1


def test_monitor_cli_replays_window_log(tmp_path):
    import typer

    app = typer.Typer()
    app.command()(monitor_command)
    log = tmp_path / "windows.jsonl"
    values = [0.05, 0.3, 0.4, 0.5]
    log.write_text("".join(json.dumps({"index": i, "examples": 100, "scores": {
        "psi_mean": v, "prediction_psi": 0.01, "top_features": [["pixel_0_0", v]]}}) + "\n"
        for i, v in enumerate(values)))
    out = CliRunner().invoke(app, [str(log), "--patience", "3", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["triggers"][0]["windows"] == [1, 2, 3]
    out = CliRunner().invoke(app, [str(log), "--patience", "4"])
    assert "no retraining trigger" in out.output
