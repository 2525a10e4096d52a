"""The ledger keeps every event on disk: restarts, other processes, resumes and races lose nothing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedshield.errors import BudgetExhausted, ConfigError
from privacy.accounting import epsilon
from privacy.ledger import Ledger, LedgerCorrupted, ledger_path

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
    other = run_python(f"from privacy.ledger import Ledger; print(Ledger({str(path)!r}, {DELTA}, 'rdp').spent())")
    assert float(other) == pytest.approx(expected)  # a new process
    assert [(e["run_id"], e["round"]) for e in ledger.history] == [("r1", 1), ("r1", 2)]
    assert all(e["timestamp"].endswith("Z") for e in ledger.history)
    assert ledger.to_metrics()["rounds_recorded"] == 2 and ledger.to_metrics()["steps"] == 100


def test_recording_the_same_round_twice_counts_once(tmp_path):
    ledger = Ledger(tmp_path / "l.json", DELTA, "rdp")
    assert ledger.record([EVENT], round=1, run_id="r1") is True
    once = ledger.spent()
    assert ledger.record([EVENT], round=1, run_id="r1") is False
    assert ledger.spent() == once
    assert ledger.record([EVENT], round=1, run_id="r2") is True  # another run is another release
    assert ledger.spent() > once


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
    code = ("import sys; from privacy.ledger import Ledger\n"
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
    assert message.startswith(f"budget exhausted: spent {spent:.2f} of 3.0 (this round would bring it to "
                              f"{after:.2f}); the client refuses to train")
    # A write that slipped past check (e.g. another process spent the budget) is refused too.
    with pytest.raises(BudgetExhausted, match="must not be sent"):
        ledger.record([EVENT], round=refused_at, run_id="r1")
    assert ledger.spent() == spent
