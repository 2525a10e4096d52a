"""Client-level DP through a whole federation (sklearn digits, real DP-SGD with Opacus)."""

import json
from pathlib import Path

import pytest
from fedshield.simulations.runner import simulate
from opacus.accountants import PRVAccountant

from tests.config_support import neutral_config


def lines(summary):
    path = Path(summary.run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    cfg = neutral_config({"name": "dp", "output_dir": str(tmp / "runs"), "task": {"name": "digits"},
                          "federation": {"num_clients": 4, "rounds": 3},
                          "partition": {"kind": "iid"}, "train": {"lr": 0.5, "batch_size": 32},
                          "privacy": {"enabled": True, "target_epsilon": 4.0,
                                      "ledger_dir": str(tmp / "ledgers")},
                          "deployment": {"handoff": False}})
    return simulate(cfg)


def test_reported_epsilon_equals_an_independent_opacus_recomputation(dp_run):
    """Every client's epsilon in every round equals a fresh Opacus PRV accountant fed the logged
    (noise multiplier, sample rate, steps) of that client's rounds so far, and of its one class-
    histogram release (privacy/releases.py: logged in the round it was made, the first)."""
    history: dict[str, list] = {}
    for line in lines(dp_run):
        assert set(line["epsilon"]) == set(line["dp_events"]) == {"0", "1", "2", "3"}
        for client, event in line["dp_events"].items():
            assert ("release" in event) == (line["round"] == 1)
            if "release" in event:
                r = event["release"]
                history.setdefault(client, []).append((r["noise_multiplier"], 1.0, 1))
            history.setdefault(client, []).append(
                (event["noise_multiplier"], event["sample_rate"], event["steps"]))
            accountant = PRVAccountant()
            accountant.history = list(history[client])
            expected = accountant.get_epsilon(delta=event["delta"])
            assert line["epsilon"][client] == pytest.approx(expected, rel=1e-6)
    eps = [line["epsilon_max"] for line in lines(dp_run)]
    # cumulative, spends the target
    assert eps == sorted(eps) and eps[-1] == pytest.approx(4.0, rel=0.01)
    assert dp_run.privacy.epsilon_max <= 4.0 + 1e-9
    assert dp_run.privacy.reproducible_noise is False  # secret DP draws by default


def test_clients_at_their_budget_refuse_and_are_no_longer_sampled(small_cfg):
    """A budget that one round fits but not two: clients refuse once the next round would exceed
    it, the server stops sampling them and says so, and no client's epsilon ever exceeds the
    budget. (One round costs 3.01 here; a budget below that is a run that never trains, which
    fails: tests/test_reply_boundary.py.)"""
    budget = 3.5
    # Exact example counts: a client plans its sample rate from its noised count otherwise, and
    # that count's secret noise (std 50 sqrt(10), about 160 examples, against ~300 per client here)
    # can make one round cost more than the budget, so which round refuses would be chance.
    cfg = small_cfg(federation={"rounds": 4, "min_clients": 2},
                    privacy={"enabled": True, "noise_multiplier": 1.0, "max_epsilon": budget,
                             "release_stats": "exact-outside-guarantee"},
                    train={"lr": 0.5, "batch_size": 32})
    summary = simulate(cfg)
    metrics = lines(summary)
    refused = {c: r for m in metrics for c, r in m["refused"].items()}
    assert refused, "no client reached its budget"
    assert all("budget exhausted: spent" in r for r in refused.values())
    assert all(e <= budget for m in metrics for e in m["epsilon"].values())
    assert summary.status == "completed" and metrics[0]["status"] == "aggregated"
    assert set(summary.privacy.exhausted_clients) == {int(c) for c in refused}
    # After refusing, a client is never sampled again.
    first_refusal = {c: min(m["round"] for m in metrics if c in m["refused"]) for c in refused}
    for m in metrics:
        for c, rnd in first_refusal.items():
            if m["round"] > rnd:
                assert c not in m["epsilon"] and c not in m["refused"]
    assert summary.stopped_early or summary.rounds_completed == 4
