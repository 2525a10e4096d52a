"""The ledger keeps every event on disk: restarts, other processes, resumes and races lose
nothing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fedshield.privacy.accounting import epsilon
from fedshield.privacy.ledger import (
    AlreadyReleased,
    Ledger,
    LedgerCorrupted,
    LedgerMissing,
    ledger_path,
)

from fedshield.errors import BudgetExhausted, ConfigError
from tests.config_support import neutral_config

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
EVENT = (1.0, 0.02, 50)


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_survives_a_restart_and_a_new_process(tmp_path):
    path = ledger_path(tmp_path, "fed-A", 3)
    ledger = Ledger(path, DELTA, "rdp")
    ledger.record([EVENT], round=1, run_id="r1")
    ledger.record([EVENT], round=2, run_id="r1")
    expected = epsilon([EVENT, EVENT], DELTA, "rdp")
    assert ledger.spent() == pytest.approx(expected)
    assert Ledger(path, DELTA, "rdp").spent() == pytest.approx(expected)  # a new object
    other = run_python(f"from fedshield.privacy.ledger import Ledger; print(Ledger({str(path)!r}, "
                       f"{DELTA}, 'rdp').spent())")
    assert float(other) == pytest.approx(expected)  # a new process
    assert [(e["run_id"], e["round"]) for e in ledger.history] == [("r1", 1), ("r1", 2)]
    assert all(e["timestamp"].endswith("Z") for e in ledger.history)
    assert ledger.to_metrics()["rounds_recorded"] == 2 and ledger.to_metrics()["steps"] == 100


def test_a_second_release_of_a_round_is_refused_or_recorded_never_dropped(tmp_path):
    ledger = Ledger(tmp_path / "l.json", DELTA, "rdp")
    assert ledger.record([EVENT], round=1, run_id="r1") == 0
    once = ledger.spent()
    # Noise derived from the run would repeat: the second release is refused, before and after.
    with pytest.raises(AlreadyReleased, match="refuses") as info:
        ledger.check([EVENT], run_id="r1", round=1)
    assert info.value.code == "already-released"
    with pytest.raises(AlreadyReleased):
        ledger.record([EVENT], round=1, run_id="r1")
    assert ledger.spent() == once
    # Fresh noise: the second release is a new event and counts.
    assert ledger.record([EVENT], round=1, run_id="r1", repeat_ok=True) == 1
    assert ledger.spent() == pytest.approx(epsilon([EVENT, EVENT], DELTA, "rdp"))
    assert ledger.releases("r1", 1) == 2
    assert ledger.record([EVENT], round=1, run_id="r2") == 0  # another run is another release


def test_a_resume_with_a_changed_schedule_cannot_under_count(tmp_path):
    """The issue's case: round 2 redone at another sigma was dropped (3.42 spent, 3.23 recorded)."""
    ledger = Ledger(tmp_path / "l.json", DELTA, "rdp")
    ledger.record([(1.0, 0.02, 50)], round=1, run_id="r")
    ledger.record([(1.0, 0.02, 50)], round=2, run_id="r")
    ledger.record([(0.8, 0.02, 50)], round=2, run_id="r", repeat_ok=True)  # the resumed redo
    released = [(1.0, 0.02, 50), (1.0, 0.02, 50), (0.8, 0.02, 50)]
    assert ledger.spent() == pytest.approx(epsilon(released, DELTA, "rdp"))
    assert ledger.spent() > epsilon(released[:2], DELTA, "rdp")


def test_a_corrupt_file_is_an_error_never_a_reset(tmp_path):
    path = tmp_path / "l.json"
    Ledger(path, DELTA, "rdp").record([EVENT], round=1, run_id="r1")
    path.write_text(path.read_text()[:-20])
    with pytest.raises(LedgerCorrupted, match="will not reset it"):
        Ledger(path, DELTA, "rdp")
    path.write_text(json.dumps({"format": "fedshield-privacy-ledger", "version": 1, "delta": DELTA,
                                "accountant": "rdp", "events": [{"noise_multiplier": -1}]}))
    with pytest.raises(LedgerCorrupted):
        Ledger(path, DELTA, "rdp").spent()
    assert "-1" in path.read_text()  # untouched


def test_reopening_with_another_delta_or_accountant_is_refused(tmp_path):
    path = tmp_path / "l.json"
    Ledger(path, DELTA, "rdp").record([EVENT], round=1, run_id="r1")
    with pytest.raises(ConfigError, match="created with delta"):
        Ledger(path, 1e-6, "rdp")
    with pytest.raises(ConfigError, match="accountant"):
        Ledger(path, DELTA, "gdp")


def test_concurrent_writers_lose_no_event(tmp_path):
    path = tmp_path / "shared.json"
    code = ("import sys; from fedshield.privacy.ledger import Ledger\n"
            f"ledger = Ledger({str(path)!r}, {DELTA}, 'rdp')\n"
            "for r in range(25):\n"
            "    ledger.record([(1.0, 0.02, 1)], round=r, run_id=sys.argv[1])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, name], cwd=ROOT) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    history = Ledger(path, DELTA, "rdp").history
    assert sorted((e["run_id"], e["round"]) for e in history) == sorted(
        (name, r) for name in ("a", "b") for r in range(25))


def test_a_client_at_its_budget_refuses_and_never_exceeds_it(tmp_path):
    budget = 3.0
    ledger = Ledger(tmp_path / "l.json", DELTA, "rdp", max_epsilon=budget)
    refused_at = None
    for r in range(1, 100):
        try:
            ledger.check([EVENT])
        except BudgetExhausted as exc:
            refused_at = r
            message = str(exc)
            break
        ledger.record([EVENT], round=r, run_id="r1")
        assert ledger.spent() <= budget
    assert refused_at is not None and refused_at > 2
    spent = ledger.spent()
    after = epsilon(ledger.events() + [EVENT], DELTA, "rdp")
    assert after > budget >= spent
    assert message.startswith(f"budget exhausted: spent {spent:.2f} of 3.0 (this round would bring "
                              f"it to {after:.2f}); the client refuses to train")
    # A write that slipped past check (e.g. another process spent the budget) is refused too.
    with pytest.raises(BudgetExhausted, match="must not be sent"):
        ledger.record([EVENT], round=refused_at, run_id="r1")
    assert ledger.spent() == spent


# -- a lost ledger is a refusal; a site's budget is its data's ----------------------------------

def _two_runs(ledger_dir: Path, federation: str = "fed", site: str = "site:1",
              cap: float = 0.0) -> Ledger:
    ledger = Ledger.for_client(ledger_dir, federation, "site-1", DELTA, "rdp", cap, site=site)
    for run in ("run-1", "run-2"):
        for r in (1, 2):
            ledger.record([EVENT], round=r, run_id=run)
    return ledger


def test_a_deleted_ledger_is_a_refusal_never_a_reset(tmp_path):
    ledger = _two_runs(tmp_path)
    full = ledger.spent()
    ledger.path.unlink()
    # Before the manifest the reopened ledger said 0 and the next run spent from scratch.
    with pytest.raises(LedgerMissing, match="Restore it from the backup") as info:
        Ledger.for_client(tmp_path, "fed", "site-1", DELTA, "rdp", site="site:1")
    assert info.value.code == "ledger-missing" and full > 0


@pytest.mark.parametrize("damage", ["truncate", "alter", "reorder"])
def test_a_truncated_or_altered_ledger_is_refused(tmp_path, damage):
    ledger = _two_runs(tmp_path)
    doc = json.loads(ledger.path.read_text())
    if damage == "truncate":  # still a valid ledger file, one event short
        doc["events"] = doc["events"][:-1]
    elif damage == "alter":
        doc["events"][0]["noise_multiplier"] = 50.0
    else:
        doc["events"].reverse()
    ledger.path.write_text(json.dumps(doc))
    with pytest.raises(LedgerMissing, match="truncated or altered"):
        Ledger.for_client(tmp_path, "fed", "site-1", DELTA, "rdp", site="site:1")


def test_a_torn_write_after_the_ledger_but_before_the_manifest_is_accepted(tmp_path):
    ledger = _two_runs(tmp_path)
    manifest = (tmp_path / "site-manifest.json").read_text()
    ledger.record([EVENT], round=3, run_id="run-2")
    (tmp_path / "site-manifest.json").write_text(manifest)  # the manifest lags one event
    reopened = Ledger.for_client(tmp_path, "fed", "site-1", DELTA, "rdp", site="site:1")
    assert len(reopened.history) == 5


def test_round_two_of_a_run_the_ledger_never_saw_is_refused(tmp_path):
    ledger = Ledger.for_client(tmp_path, "fed", "site-1", DELTA, "rdp")
    ledger.require_run_history("run-1", 1)  # round 1: nothing to have seen yet
    ledger.record([EVENT], round=1, run_id="run-1")
    ledger.require_run_history("run-1", 2)
    with pytest.raises(LedgerMissing, match="holds no event of that run"):
        ledger.require_run_history("run-2", 3)


def test_renaming_the_federation_cannot_reset_a_sites_budget(tmp_path):
    """The issue's case: a site capped at 2.0 spent 2.67 over two federation names."""
    cap = 2.0
    spent_by = {}
    for federation in ("fed-A", "fed-A-renamed", "fed-B"):
        ledger = Ledger.for_client(tmp_path, federation, "site-1", DELTA, "rdp", cap, site="site:1")
        for r in range(1, 100):
            try:
                ledger.check([EVENT], run_id=federation, round=r)
            except BudgetExhausted:
                break
            ledger.record([EVENT], round=r, run_id=federation)
            assert ledger.site_spent() <= cap
        spent_by[federation] = ledger.spent()
    assert spent_by["fed-A"] > 1.5 and spent_by["fed-A-renamed"] == spent_by["fed-B"] == 0
    total = epsilon([EVENT] * sum(len(Ledger.for_client(tmp_path, f, "site-1", DELTA, "rdp",
                                                        site="site:1").history)
                                  for f in spent_by), DELTA, "rdp")
    assert total <= cap
    # Another site in the same ledger directory keeps its own budget.
    other = Ledger.for_client(tmp_path, "fed-A", "site-2", DELTA, "rdp", cap, site="site:2")
    assert other.check([EVENT]) == pytest.approx(epsilon([EVENT], DELTA, "rdp"))


def test_a_deleted_ledger_of_another_federation_still_blocks_the_site(tmp_path):
    _two_runs(tmp_path, "fed-A")
    (tmp_path / "fed-A" / "client-site-1.json").unlink()
    ledger = Ledger.for_client(tmp_path, "fed-B", "site-1", DELTA, "rdp", 5.0, site="site:1")
    with pytest.raises(LedgerMissing, match="site 'site:1'"):
        ledger.check([EVENT])


def test_the_site_key_comes_from_the_node_never_the_federation_name(tmp_path):
    from fedshield.client.app import client_ledger
    from flwr.app import Context, RecordDict

    node = {"site-id": "hospital-7", "data-path": str(tmp_path / "d.csv"),
            "ledger-dir": str(tmp_path / "ledgers"), "max-epsilon": 5.0}
    ledgers = []
    for name in ("fed-A", "fed-renamed"):
        cfg = neutral_config({"name": name, "privacy": {"enabled": True, "noise_multiplier": 1.0,
                                                         "accountant": "rdp"}})
        ctx = Context(run_id=1, node_id=9, node_config=node, state=RecordDict(), run_config={})
        ledgers.append(client_ledger(cfg, ctx, "run-1", 1))
    assert ledgers[0].path != ledgers[1].path
    assert ledgers[0].site == ledgers[1].site == "site:hospital-7"
    ledgers[0].record([EVENT], round=1, run_id="run-1")
    assert ledgers[1].site_spent() == pytest.approx(epsilon([EVENT], DELTA, "rdp"))


def test_cli_shows_a_sites_spend_per_federation_and_in_total(tmp_path):
    from typer.testing import CliRunner

    from fedshield.commands.privacy import privacy_app

    for federation in ("fed-A", "fed-B"):
        Ledger.for_client(tmp_path, federation, "site-1", DELTA, "rdp", site="site:1").record(
            [EVENT], round=1, run_id="r")
    runner = CliRunner()
    doc = json.loads(runner.invoke(privacy_app, ["ledger", "--ledger-dir", str(tmp_path),
                                                 "--json"]).stdout)
    (site,) = doc["sites"]
    assert site["site"] == "site:1" and [r["federation"] for r in site["ledgers"]] == [
        "fed-A", "fed-B"]
    assert site["ledgers"][0]["epsilon"] == pytest.approx(epsilon([EVENT], DELTA, "rdp"))
    assert site["total_epsilon"] == pytest.approx(epsilon([EVENT, EVENT], DELTA, "rdp"))
    assert site["total_epsilon_pld"] <= site["total_epsilon"] and doc["unit"].startswith("sample")
    table = runner.invoke(privacy_app, ["ledger", "--ledger-dir", str(tmp_path)])
    assert table.exit_code == 0 and "total" in table.output and "fed-B" in table.output
    (tmp_path / "fed-B" / "client-site-1.json").unlink()
    damaged = runner.invoke(privacy_app, ["ledger", "--ledger-dir", str(tmp_path), "--json"])
    assert damaged.exit_code == 1 and "deleted" in damaged.stdout
    missing = runner.invoke(privacy_app, ["ledger", "--ledger-dir", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not a directory" in missing.output


def test_the_servers_count_of_releases_tells_a_missed_round_from_a_lost_ledger(tmp_path):
    """A site offline for round 1 of a full-participation run is asked for round 2 with
    ``released-rounds`` 0: it trains (the old rule refused it as "ledger deleted", locking it
    out of the rest of the run). A ledger holding fewer of the run's rounds than the server
    received is refused: deleted, truncated or replaced."""
    ledger = Ledger.for_client(tmp_path, "fed", "site-1", DELTA, "rdp")
    ledger.require_run_history("run-1", 2, released=0)  # missed round 1
    ledger.record([EVENT], round=2, run_id="run-1")
    ledger.require_run_history("run-1", 3, released=1)
    with pytest.raises(LedgerMissing, match="received this client's DP releases in 2 round"):
        ledger.require_run_history("run-1", 4, released=2)
    with pytest.raises(LedgerMissing, match="holds no event of that run"):
        ledger.require_run_history("run-2", 2)  # a server that does not say: the old rule
