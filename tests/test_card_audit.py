"""The model card shows the empirical privacy audit next to the accountant's epsilon, or says
that the model was not audited (issue 14 item 8)."""

import dataclasses
import json
import math
import shutil

import pytest
from fedshield.deployment.artifacts import CARD_JSON, CARD_MD
from fedshield.deployment.card import (
    NOT_AUDITED,
    audit_section,
    build_card,
    read_run,
    render_markdown,
)
from fedshield.deployment.export import export_model
from fedshield.privacy.audit import AUDIT_JSON, AuditBound, AuditRecord, mechanism_digest
from fedshield.simulations.audit import AuditReport, CanaryAudit, audit_record
from fedshield.tasks import get_task
from typer.testing import CliRunner

from fedshield import configio, schema, validation
from fedshield.errors import ConfigError
from tests.config_support import neutral_config
from tests.deploy_support import make_run_dir, trained_state


def audit_cfg(tmp_path) -> schema.Config:
    """A DP digits run cheap enough to audit in a test (as tests/test_audit.py's)."""
    return neutral_config({
        "name": "card-audit", "seed": 0, "task": {"name": "digits"},
        "federation": {"num_clients": 4, "rounds": 3}, "partition": {"kind": "iid"},
        "train": {"lr": 0.1, "momentum": 0.5, "batch_size": 16, "local_epochs": 2},
        "privacy": {"enabled": True, "target_epsilon": 3.0, "delta": 1e-5,
                    "ledger_dir": str(tmp_path / "ledgers")}})


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    state = {f"_module.{k}": v for k, v in trained_state("digits").items()}
    out = tmp_path_factory.mktemp("export") / "digits"
    return export_model(get_task("digits"), state, out, {"run": "t", "rounds": 3})


@pytest.fixture
def exported_run(tmp_path, digits_export):
    """make(cfg, **run): a run folder as the ServerApp leaves it, with its hand-off's export in
    run/export (a copy of one export: exporting costs seconds)."""

    def make(cfg: schema.Config | None = None, **run):
        folder = make_run_dir(tmp_path, "digits", **run)
        if cfg is not None:
            (folder / "config.toml").write_text(configio.to_toml(cfg))
        shutil.copytree(digits_export.out_dir, folder / "export")
        return folder, dataclasses.replace(digits_export, out_dir=str(folder / "export"))

    return make


def canary_result(bound: float, stated: float, adversary: str = "update") -> CanaryAudit:
    return CanaryAudit(adversary, AuditBound(bound, 400, 200, 150, 100, 100, 1e-5, 0.95), 203,
                       stated, 1e-5, "prv", 1.2, 3, 560, False)


def test_an_unaudited_card_says_not_audited(exported_run):
    run, export = exported_run()
    card = build_card(run, export, explain_examples=4)
    assert card.data["privacy_audit"] == {"audited": False, "status": "not audited",
                                          "text": NOT_AUDITED}
    md = card.md_path.read_text()
    assert "## Empirical privacy audit" in md and f"**{NOT_AUDITED}**" in md
    # A card written before audits existed renders "not audited" too, never nothing.
    old = {k: v for k, v in card.data.items() if k != "privacy_audit"}
    assert NOT_AUDITED in render_markdown(old)


@pytest.mark.slow
def test_an_audited_digits_run_shows_the_bound_below_the_stated_epsilon(tmp_path, exported_run):
    from fedshield.cli import app

    cfg = audit_cfg(tmp_path)
    run, export = exported_run(cfg, epsilon_max=3.0)
    build_card(run, export, explain_examples=4)  # the hand-off's card: not audited yet
    out = CliRunner().invoke(app, ["privacy", "audit", "--run-dir", str(run), "--attacks",
                                   "canary", "--canaries", "400", "--seed", "0"])
    assert out.exit_code == 0, out.output
    assert "audit recorded in" in out.output and "model card refreshed" in out.output
    assert (run / AUDIT_JSON).is_file()
    for data, md in [  # the refreshed card, and a card the hand-off builds after the audit
            (json.loads((run / "export" / CARD_JSON).read_text()),
             (run / "export" / CARD_MD).read_text()),
            (lambda c: (c.data, c.md_path.read_text()))(build_card(run, export, 4))]:
        section = data["privacy_audit"]
        assert section["audited"] and section["matches_run_config"] is True
        assert section["canaries_in_released_model"] is False
        (c,) = section["canary"]
        assert c["adversary"] == "update" and c["canaries"] == 400 and c["confidence"] == 0.95
        assert c["stated_epsilon"] == pytest.approx(3.0, rel=0.02)  # the planner spends the target
        assert c["empirical_epsilon_lower_bound"] <= c["stated_epsilon"] and c["holds"]
        assert c["unit"] == "sample-level, per client, add/remove" and c["delta"] == 1e-5
        assert (f"Empirical epsilon lower bound **{c['empirical_epsilon_lower_bound']:.3f}** at "
                "95% confidence (400 canaries") in md
        assert f"vs accountant epsilon **{c['stated_epsilon']:.3f}** (sample-level" in md
        assert "delta 1e-05, prv) of the audited training: holds" in md
        assert "Canaries in this model: **none**" in md
        assert "the audit used this run's data, schedule, privacy settings and seed" in md
    # The same record against a run trained otherwise is flagged, not passed off as its audit.
    (run / "config.toml").write_text(configio.to_toml(
        validation.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "lr": 0.2}})))
    other = audit_section(run, read_run(run)[1])
    assert other["matches_run_config"] is False
    assert other["status"] == "audited with another configuration"
    assert "not evidence about this model" in "\n".join(
        render_markdown({**data, "privacy_audit": other}).splitlines())


def test_a_bound_above_the_stated_epsilon_is_shouted(tmp_path, exported_run):
    cfg = audit_cfg(tmp_path)
    run, export = exported_run(cfg)
    report = AuditReport("digits", 0, canary=[canary_result(4.2, 1.0, "seed-replay"),
                                              canary_result(math.inf, math.inf)])
    (run / AUDIT_JSON).write_text(audit_record(report, cfg).to_json())
    section = audit_section(run, read_run(run)[1])
    leak, nodp = section["canary"]
    assert not leak["holds"] and nodp["stated_epsilon"] == math.inf
    md = render_markdown({**build_card(run, export, 4).data, "privacy_audit": section})
    assert ("**EXCEEDS the stated epsilon: the guarantee does not hold against this "
            "adversary**") in md
    assert "subtract its noise" in md and "accountant epsilon **inf (no DP)**" in md


def test_an_unreadable_audit_record_is_not_audited_and_says_why(exported_run):
    run, _ = exported_run()
    (run / AUDIT_JSON).write_text('{"format": "something else"}')
    section = audit_section(run, read_run(run)[1])
    assert not section["audited"] and section["status"] == "audit record unreadable"
    assert "fedshield-audit/1" in section["text"]
    with pytest.raises(ConfigError, match="not JSON"):
        AuditRecord.from_json("{")


def test_the_record_round_trips_and_its_digest_ignores_only_where_ledgers_live(tmp_path):
    cfg = audit_cfg(tmp_path)
    record = audit_record(AuditReport("digits", 0, canary=[canary_result(0.1, math.inf)]), cfg)
    assert AuditRecord.from_json(record.to_json()) == record  # inf survives strict JSON
    table = cfg.to_dict()
    moved = {**table, "privacy": {**table["privacy"], "ledger_dir": "/elsewhere"}}
    noisier = {**table, "privacy": {**table["privacy"], "target_epsilon": 1.0}}
    assert mechanism_digest(moved) == mechanism_digest(table) == record.mechanism_digest
    assert mechanism_digest(noisier) != record.mechanism_digest
    assert mechanism_digest({**table, "seed": 1}) != record.mechanism_digest


def test_the_audit_command_refuses_a_folder_that_is_not_a_run(tmp_path):
    from fedshield.cli import app

    out = CliRunner().invoke(app, ["privacy", "audit", "--run-dir", str(tmp_path)])
    assert out.exit_code == 2 and "no summary.json there" in out.output
    out = CliRunner().invoke(app, ["privacy", "audit"])
    assert out.exit_code == 2 and "give a CONFIG, or --run-dir RUN" in out.output
