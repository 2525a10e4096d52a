"""End to end: nothing is released outside the ledger, a lost ledger is a refusal, and every
stated epsilon names its unit, delta and accountant (a central-DP run never says "privacy off")."""

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from client.dp import train_private
from fedshield.config import PrivacyConfig, TrainConfig
from privacy.central import user_level_epsilon
from privacy.ledger import AlreadyReleased, Ledger
from server.report import ConsoleReporter
from simulations.runner import simulate
from tasks import get_task


def lines_of(summary):
    return [json.loads(x) for x in
            (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def test_a_second_release_of_a_round_with_run_derived_noise_is_refused(tmp_path):
    """The issue's replay: the same round sent twice with other weights reused the noise draw."""
    task = get_task("digits")
    train, _ = task.load()
    cfg = PrivacyConfig(enabled=True, noise_multiplier=1.0, delta=1e-4)
    ledger = Ledger(tmp_path / "c.json", 1e-4, "prv")
    args = dict(total_rounds=2, server_round=1, run_id="run", seed=5)
    train_private(task.build_model(), train, TrainConfig(batch_size=64), cfg, ledger, **args)
    spent = ledger.spent()
    with pytest.raises(AlreadyReleased):
        train_private(task.build_model(), train, TrainConfig(batch_size=64), cfg, ledger, **args)
    assert ledger.spent() == spent and len(ledger.history) == 1


def test_a_deleted_ledger_makes_the_site_refuse_the_next_run(small_cfg, tmp_path):
    """Before: deleting a client's ledger between two runs of a federation restarted its count
    (eps 3.10 -> 1.84). Now that client refuses with ledger-missing; the others train."""
    cfg = small_cfg(federation={"rounds": 1, "min_clients": 1},
                    privacy={"enabled": True, "noise_multiplier": 1.0, "delta": 1e-4,
                             "ledger_scope": "federation"})
    first = simulate(cfg)
    assert len(lines_of(first)[0]["epsilon"]) == 5
    ledger_dir = Path(cfg.privacy.ledger_dir)
    victim = ledger_dir / "t" / "client-partition-3.json"
    victim.unlink()
    second = simulate(cfg)
    (line,) = lines_of(second)
    assert "3" not in line["epsilon"] and len(line["epsilon"]) == 4
    (reason,) = line["refused"].values()
    assert reason.startswith("ledger-missing:") and "Restore" in reason
    assert not victim.exists()  # never silently recreated


def test_central_dp_run_states_user_level_epsilon_with_its_unit_and_sampling(small_cfg):
    cfg = small_cfg(federation={"rounds": 2, "fraction_train": 0.6, "min_clients": 1},
                    central_dp={"enabled": True, "noise_multiplier": 1.0, "clip_norm": 0.5},
                    aggregation={"rule": "fedavg", "weighting": "uniform"},
                    screening={"max_norm_ratio": 0.0})
    summary = simulate(cfg)
    central = summary["privacy"]["central_dp"]
    stated = user_level_epsilon(1.0, 0.6, 2, cfg.central_dp.delta, "prv")
    assert central["user_level_epsilon"] == pytest.approx(stated)
    assert central["unit"] == "user-level, per client, add/remove"
    assert central["sampling"] == "poisson" and central["client_sample_rate"] == 0.6
    assert central["label"] == (f"eps {stated:.2f} (user-level, per client, add/remove, "
                                "delta 1e-05, prv, >= pld)")
    assert lines_of(summary)[-1]["privacy_unit"]["central_epsilon"].startswith("user-level")
    out = io.StringIO()
    reporter = ConsoleReporter.__new__(ConsoleReporter)
    reporter.console = Console(file=out, width=200)
    reporter.end(summary)
    assert "privacy off" not in out.getvalue().lower() and "user-level" in out.getvalue()


def test_sample_level_summary_names_unit_delta_and_accountant(small_cfg):
    cfg = small_cfg(federation={"rounds": 1},
                    privacy={"enabled": True, "noise_multiplier": 1.0, "delta": 1e-4})
    summary = simulate(cfg)
    p = summary["privacy"]
    assert p["unit"] == "sample-level, per client, add/remove"
    assert p["label"] == (f"eps {p['epsilon_max']:.2f} (sample-level, per client, add/remove, "
                          "max over clients, delta 0.0001, prv, >= pld)")
    assert p["noise_multipliers_used"] == [1.0]
    assert lines_of(summary)[0]["privacy_unit"]["epsilon"].startswith("sample-level")
    assert torch.isfinite(torch.tensor(p["epsilon_max"]))
