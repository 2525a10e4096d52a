"""End to end: nothing is released outside the ledger, a lost ledger is a refusal, and every
stated epsilon names its unit, delta and accountant (a central-DP run never says "privacy off")."""

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
from fedshield.client.dp import train_private
from fedshield.privacy.central import user_level_epsilon
from fedshield.privacy.ledger import AlreadyReleased, Ledger
from fedshield.server.report import ConsoleReporter
from fedshield.simulations.runner import simulate
from fedshield.tasks import get_task
from rich.console import Console

from fedshield.schema import PrivacyConfig, TrainConfig


def lines_of(summary):
    return [json.loads(x) for x in
            (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]


# privacy.reproducible_noise comes with the OS-CSPRNG noise of client/dp.py; without that key the
# noise is derived from the run, as with the opt-in.
HAS_FRESH_NOISE = "reproducible_noise" in {f.name for f in dataclasses.fields(PrivacyConfig)}


def _two_releases(tmp_path, **privacy):
    task = get_task("digits")
    train, _ = task.load()
    cfg = PrivacyConfig(enabled=True, noise_multiplier=1.0, delta=1e-4, **privacy)
    ledger = Ledger(tmp_path / "c.json", 1e-4, "prv")
    args = dict(total_rounds=2, server_round=1, run_id="run", seed=5)
    train_private(task.build_model(), train, TrainConfig(batch_size=64), cfg, ledger, **args)
    spent = ledger.spent()
    return ledger, spent, lambda: train_private(task.build_model(), train,
                                                TrainConfig(batch_size=64), cfg, ledger, **args)


def test_a_second_release_of_a_round_with_run_derived_noise_is_refused(tmp_path):
    """The issue's replay: the same round sent twice with other weights reused the noise draw."""
    opt_in = {"reproducible_noise": True} if HAS_FRESH_NOISE else {}
    ledger, spent, again = _two_releases(tmp_path, **opt_in)
    with pytest.raises(AlreadyReleased):
        again()
    assert ledger.spent() == spent and len(ledger.history) == 1


@pytest.mark.skipif(not HAS_FRESH_NOISE, reason="needs privacy.reproducible_noise (fresh noise)")
def test_a_second_release_with_fresh_noise_is_a_new_ledger_event(tmp_path):
    ledger, spent, again = _two_releases(tmp_path, reproducible_noise=False)
    again()
    assert [e["release"] for e in ledger.history] == [0, 1] and ledger.spent() > spent


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
    central = summary.privacy.central_dp
    stated = user_level_epsilon(1.0, 0.6, 2, cfg.central_dp.delta, "prv")
    assert central.user_level_epsilon == pytest.approx(stated)
    assert central.unit == "user-level, per client, add/remove"
    assert central.sampling == "poisson" and central.client_sample_rate == 0.6
    assert central.label == (f"eps {stated:.2f} (user-level, per client, add/remove, "
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
    p = summary.privacy
    assert p.unit == "sample-level, per client, add/remove"
    assert p.label == (f"eps {p.epsilon_max:.2f} (sample-level, per client, add/remove, "
                       "max over clients, delta 0.0001, prv, >= pld)")
    assert list(p.noise_multipliers_used) == [1.0]
    assert lines_of(summary)[0]["privacy_unit"]["epsilon"].startswith("sample-level")
    assert torch.isfinite(torch.tensor(p.epsilon_max))


def test_an_empty_poisson_cohort_skips_the_round_and_is_never_topped_up(small_cfg):
    cfg = small_cfg(federation={"rounds": 4, "fraction_train": 0.1, "min_clients": 2},
                    # seeded sampling: a secret cohort could be empty in every round (p ~ 0.1)
                    central_dp={"enabled": True, "noise_multiplier": 1.0,
                                "reproducible_noise": True},
                    aggregation={"rule": "fedavg", "weighting": "uniform"},
                    screening={"max_norm_ratio": 0.0})
    summary = simulate(cfg)
    assert summary.status == "completed"
    lines = lines_of(summary)
    assert len(lines) == 4 and all(m["sampled"] == m["accepted"] for m in lines)
    # min_clients = 2 would have raised the rate to 0.4; Poisson at 0.1 mostly samples 0 or 1
    assert sum(m["sampled"] for m in lines) < 8
    assert summary.privacy.central_dp.user_level_epsilon == pytest.approx(
        user_level_epsilon(1.0, 0.1, 4, 1e-5, "prv"))


def test_the_sweep_table_shows_the_noise_actually_used(small_cfg, tmp_path):
    from fedshield.simulations.sweeps import privacy_sweep

    base = small_cfg(federation={"rounds": 1}, privacy={"delta": 1e-4})
    rows = privacy_sweep(base, [8.0, float("inf")], [0], tmp_path / "sweep")
    private, public = rows
    # each client plans its own sigma for its data size: all of them are listed
    assert all(float(x) > 0.3 for x in private["noise_multiplier_used"].split(","))
    assert private["epsilon_label"].startswith(f"eps {private['epsilon_max']:.2f} (sample-level")
    assert public["noise_multiplier_used"] is None and public["epsilon_label"] is None
    table = (tmp_path / "sweep" / "privacy_sweep.md").read_text()
    assert "noise_multiplier_used" in table and private["noise_multiplier_used"] in table
