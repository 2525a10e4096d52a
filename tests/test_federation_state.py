"""The apps layer: one federation state and one central-DP mechanism for both strategies, the
run recorder's Protocol, rounds driven by Flower's own ``Strategy.start`` (resume included), and
no module cycle between the apps and their SecAgg+ halves."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from fedshield.server.central_dp import CentralDP
from fedshield.server.checkpoint import load_checkpoint, save_checkpoint
from fedshield.server.federation_state import FederationState, RoundState
from fedshield.server.recording import RecordedStrategy, build_summary, metrics_line
from fedshield.server.secagg import SecAggFedAvg
from fedshield.server.strategy import ShieldStrategy
from fedshield.tasks import task_for
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import Strategy

from fedshield import schema
from tests.config_support import neutral_config
from tests.reply_support import Federation, digits_cfg, honest

ROOT = Path(__file__).resolve().parents[1]


def central_cfg(**central) -> schema.Config:
    return neutral_config({"task": {"name": "digits"}, "seed": 7,
                           "federation": {"num_clients": 10, "fraction_train": 0.3,
                                          "min_clients": 2},
                           "central_dp": {"enabled": True, "noise_multiplier": 1.3,
                                          "clip_norm": 0.5, **central},
                           "aggregation": {"rule": "fedavg", "weighting": "uniform"},
                           "screening": {"max_norm_ratio": 0.0}})


# --- central DP, once ---------------------------------------------------------------------

def test_both_run_modes_release_the_same_noisy_clipped_mean():
    """The plain path clips on the server (aggregate), SecAgg+ clients clip and the server
    releases their sum (release): with the same noise stream both equal an independent
    reference, sum(min(1, C/|u|) u) / (q N) + sigma C / (q N) * N(0, 1)."""
    cfg = central_cfg(reproducible_noise=True)  # seeded noise, so the reference can replay it
    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(6, 500, generator=gen, dtype=torch.float64) * \
        torch.tensor([[0.001], [0.01], [0.05], [1.0], [5.0], [0.005]], dtype=torch.float64)
    rows = deltas.numpy()
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    clipped = rows * np.minimum(1.0, 0.5 / norms)
    expected = 0.3 * 10
    noise = torch.randn(500, generator=torch.Generator().manual_seed(7),
                        dtype=torch.float64).numpy()
    reference = clipped.sum(axis=0) / expected + 1.3 * 0.5 / expected * noise

    plain = CentralDP(cfg).aggregate(deltas)
    summed = CentralDP(cfg).release(torch.from_numpy(clipped.sum(axis=0)))
    # The mechanism clips to C (1 - 1e-12): 1e-12 relative of values <= 1 is far below 1e-9.
    assert np.allclose(plain.update.numpy(), reference, rtol=0, atol=1e-9)
    assert np.allclose(summed.numpy(), reference, rtol=0, atol=1e-9)
    # Row norms ~ scale * sqrt(500): 0.02, 0.22, 1.1, 22, 112, 0.11 against C = 0.5.
    assert plain.info == {"clipped": float((norms > 0.5).sum())} == {"clipped": 3.0}
    assert torch.equal(plain.suspicion, torch.zeros(6, dtype=torch.float64))


def test_central_noise_has_the_calibrated_std_and_is_not_the_seeds():
    cfg = central_cfg()  # secret noise (the default)
    d = 200_000
    released = CentralDP(cfg).release(torch.zeros(d, dtype=torch.float64)).numpy()
    std = 1.3 * 0.5 / 3.0
    # 2e5 Gaussian draws: the sample std's relative error is ~1/sqrt(2d) = 0.16%; 1% is 6 sd.
    assert released.std() == pytest.approx(std, rel=0.01)
    seeded = CentralDP(central_cfg(reproducible_noise=True)).release(
        torch.zeros(d, dtype=torch.float64)).numpy()
    # Independent draws: |corr| ~ 1/sqrt(d) = 0.0022; 0.015 is 6.7 sd.
    assert abs(np.corrcoef(released, seeded)[0, 1]) < 0.015


def test_both_strategies_hold_the_same_mechanism_and_state_its_epsilon_alike(monkeypatch):
    """Both account the sampler's own Poisson rate q (the accountant itself is checked against
    dp_accounting in test_privacy_central)."""
    from fedshield.server import central_dp

    monkeypatch.setattr(central_dp, "user_level_epsilon", lambda *args: args)
    cfg = central_cfg()
    plain, secagg = ShieldStrategy(cfg), SecAggFedAvg(cfg)
    assert isinstance(plain.federation.central, CentralDP)
    assert isinstance(secagg.federation.central, CentralDP)
    assert plain.federation.central.rate == cfg.federation.fraction_train
    assert plain.user_level_epsilon(40) == secagg.user_level_epsilon(40) \
        == (1.3, 0.3, 40, cfg.central_dp.delta, cfg.central_dp.accountant)
    off = ShieldStrategy(digits_cfg(Path("/tmp")))
    assert off.federation.central is None and off.user_level_epsilon(40) is None


def test_central_dp_draws_live_only_in_the_mechanism():
    """Noise, Poisson sampling and the accountant of central DP are called from
    server/central_dp.py only: neither strategy has its own copy."""
    names = {"add_central_noise", "poisson_sample", "sampling_rng", "noise_generator",
             "user_level_epsilon", "clip_updates", "fixed_denominator_mean"}
    for path in (ROOT / "server").glob("*.py"):
        if path.name == "central_dp.py":
            continue
        used = {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}
        assert not used & names, f"{path.name} uses {sorted(used & names)}"


# --- the shared federation state ------------------------------------------------------------

@pytest.mark.parametrize("reproducible", [True, False])
def test_the_federation_state_survives_a_checkpoint(tmp_path, reproducible):
    """Budgets, labels, momentum, reputation and the central noise stream come back from a
    (tamper-evident) checkpoint. Reproducible noise: the next draw is the one the original would
    make. Secret noise: nothing of the stream is saved, and the resumed run draws fresh noise (a
    redone round never repeats a released draw)."""
    cfg = neutral_config({"task": {"name": "digits"},
                          "federation": {"num_clients": 10, "fraction_train": 0.3},
                          "central_dp": {"enabled": True, "reproducible_noise": reproducible},
                          "reputation": {"enabled": True},
                          "aggregation": {"rule": "fedavg", "weighting": "uniform",
                                          "server_momentum": 0.9},
                          "screening": {"max_norm_ratio": 0.0}})
    state = FederationState(cfg)
    state.new_round(sampled=[11, 12])
    state.note_refusal(11, "budget-exhausted", "epsilon 3.1 > 3.0")
    state.note_refusal(12, "invalid-data", "NaN features")
    assert state.identity_problem(12, 4) is None and state.identity_problem(13, 4) is not None
    _, momentum = state.step(torch.ones(3, dtype=torch.float64))
    state.commit_momentum(momentum)
    state.reputation.update(1, [12, 13], [0.9, 0.1])
    state.central.release(torch.zeros(5, dtype=torch.float64))  # advance the noise stream
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, state.state_dict())

    restored = FederationState(cfg)
    restored.load_state_dict(load_checkpoint(tmp_path).state)
    assert restored.exhausted == {11: "epsilon 3.1 > 3.0"}
    assert restored.node_partition == {12: 4}
    assert torch.equal(restored.server_momentum, state.server_momentum)
    assert restored.reputation.scores == state.reputation.scores
    zeros = torch.zeros(1000, dtype=torch.float64)
    again, original = restored.central.release(zeros), state.central.release(zeros)
    if reproducible:
        assert torch.equal(again, original)
    else:
        assert state.state_dict()["dp_generator"] is None
        # independent N(0, s^2) draws: |corr| over 1000 values has std ~0.03; 0.2 is ~6 std
        assert abs(float(torch.corrcoef(torch.stack([again, original]))[0, 1])) < 0.2
    assert restored.eligible([10, 11, 12, 13]) == [10, 12, 13]  # out of budget: not sampled


def test_fixed_size_sampling_is_the_seeded_draw_of_positions(tmp_path):
    """Without central DP the plain cohort is k seeded draws of positions among the sorted
    eligible nodes (reproducible from the seed; no amplification is claimed for it)."""
    cfg = digits_cfg(tmp_path, n=6, federation={"fraction_train": 0.5, "min_clients": 2})
    fed = Federation(cfg)
    strategy = ShieldStrategy(cfg)
    nodes = sorted(fed.grid.get_node_ids())
    for rnd in (1, 2, 9):
        positions = np.random.default_rng([cfg.seed, rnd]).choice(6, size=3, replace=False)
        assert strategy.sample(fed.grid, rnd, 0.5) == sorted(nodes[i] for i in positions)


# --- rounds: Flower's Strategy.start, resumable ---------------------------------------------

def test_flowers_start_drives_a_resumed_segment_with_the_runs_round_numbers(tmp_path):
    """No start() override: Flower's loop runs the remaining rounds of a resumed run, and the
    clients, the sampler and the round records see the run's rounds (4 and 5), not 1 and 2."""
    assert ShieldStrategy.start is Strategy.start
    cfg = digits_cfg(tmp_path, n=6, federation={"fraction_train": 0.5, "min_clients": 2,
                                                "rounds": 5})
    seen: dict[int, list[int]] = {}

    def recording(global_arrays, pid, rnd):
        seen.setdefault(rnd, []).append(pid)
        return honest(global_arrays, pid, rnd)

    fed = Federation(cfg, dict.fromkeys(range(6), recording))
    strategy = ShieldStrategy(cfg)
    strategy.federation.resume_after(3)
    torch.manual_seed(cfg.seed)
    initial = ArrayRecord(task_for(cfg.task).build_model().state_dict())
    records = []

    def evaluate_fn(segment_round, arrays):
        if segment_round:
            rnd = strategy.federation.run_round(segment_round)
            records.append(strategy.round.record(rnd, {"accuracy": 0.5, "loss": 1.0}))

    result = strategy.start(fed.grid, initial, num_rounds=2, train_config=ConfigRecord({"a": 1}),
                            evaluate_fn=evaluate_fn)
    assert sorted(seen) == [4, 5]
    nodes = sorted(fed.grid.get_node_ids())
    for rnd in (4, 5):  # the run's round seeds the cohort, as in an uninterrupted run
        positions = np.random.default_rng([cfg.seed, rnd]).choice(6, size=3, replace=False)
        assert sorted(seen[rnd]) == sorted(fed.grid.node_to_partition[nodes[i]]
                                           for i in positions)
    assert [r["round"] for r in records] == [4, 5]
    assert all(len(r["state"].accepted) == 3 and r["train"]["accepted"] == 3 for r in records)
    assert all(r["seconds"] >= 0 for r in records)
    assert len(result.arrays) and sorted(result.train_metrics_clientapp) == [1, 2]


# --- the recorder's Protocol ---------------------------------------------------------------

class Minimal:
    """Only what RecordedStrategy lists."""

    node_partition = {101: 0, 102: 1}
    reputation = None
    exhausted = {102: "spent"}

    def user_level_epsilon(self, rounds):
        return 0.25 * rounds

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_the_recorder_needs_only_its_protocol(tmp_path):
    cfg = digits_cfg(tmp_path)
    for strategy in (ShieldStrategy(cfg), SecAggFedAvg(cfg), Minimal()):
        assert isinstance(strategy, RecordedStrategy)
    state = RoundState(sampled=[101, 102], accepted=[101], refused={102: "budget-exhausted: x"})
    line = metrics_line(3, state.record(3, {"accuracy": 0.5, "loss": 1.0}), Minimal())
    assert line.round == 3 and line.central_epsilon == 0.75 and dict(line.refused) == {
        "1": "budget-exhausted: x"}

    class Folder:
        path = tmp_path

        def read_metrics(self):
            return [line]

    summary = build_summary(cfg, Folder(), Minimal(), "", 1.0)
    assert list(summary.privacy.exhausted_clients) == [1]
    assert summary.final.to_dict() == {"accuracy": 0.5, "loss": 1.0}


# --- no module cycles -------------------------------------------------------------------------

def imports_of(module: str) -> set[str]:
    # fedshield.server.x is server/x.py in the source tree (fedshield/layout.py)
    tree = ast.parse((ROOT / (module.removeprefix("fedshield.").replace(".", "/") + ".py"))
                     .read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("app, lower", [
    ("fedshield.server.app", ["fedshield.server.secagg", "fedshield.server.strategy",
                              "fedshield.server.recording", "fedshield.server.federation_state",
                              "fedshield.server.central_dp"]),
    ("fedshield.client.app", ["fedshield.client.secagg", "fedshield.client.fit"]),
])
def test_the_apps_sit_above_their_modules(app, lower):
    """The apps dispatch; nothing below them imports them back (the old app <-> secagg
    cycles)."""
    for module in lower:
        assert app not in imports_of(module), f"{module} imports {app}"
