"""The planner spends the statistics release as the client does; the delta check and small
clients under the noised count (issue 14 leftovers)."""

import dataclasses
import json

import numpy as np
import pytest
from fedshield.client.dp import dp_compatible, train_private
from fedshield.client.releases import stats_release
from fedshield.privacy.accounting import reported_epsilon
from fedshield.privacy.ledger import Ledger
from fedshield.privacy.planner import plan
from fedshield.privacy.releases import HistogramRelease, release_histogram, secure_rng
from fedshield.tasks import Split, task_for
from typer.testing import CliRunner

from fedshield import schema
from fedshield.commands.privacy import privacy_app
from fedshield.errors import ConfigError

DELTA = 1e-5
ROUNDS, BATCH, EXAMPLES = 2, 32, 400


@pytest.fixture(scope="module")
def digits():
    task = task_for(schema.TaskConfig(name="digits"))
    train, _ = task.load()
    return task, train


def privacy(tmp_path, **kw) -> schema.PrivacyConfig:
    return schema.PrivacyConfig(enabled=True, delta=DELTA, ledger_dir=str(tmp_path), **kw)


def client_run(task, data: Split, privacy_cfg: schema.PrivacyConfig, ledger: Ledger,
               rounds: int = ROUNDS) -> tuple[HistogramRelease, list[dict]]:
    """A DP client's run as client/app.py ``_train_private`` does it: the release once, then
    each round planned from its noised count with its event as an extra."""
    release, _ = stats_release(data.y, task.num_classes, privacy_cfg, ledger, "run")
    train_cfg = schema.TrainConfig(batch_size=BATCH, local_epochs=1, lr=0.05)
    model = dp_compatible(task.build_model())
    metrics = [train_private(model, data, train_cfg, privacy_cfg, ledger, total_rounds=rounds,
                             server_round=r, run_id="run",
                             planning_examples=release.planning_count,
                             extra_events=(release.event,))["metrics"]
               for r in range(1, rounds + 1)]
    return release, metrics


def test_the_plan_includes_the_release_and_states_what_the_ledger_holds():
    """Pure: the planned sigma leaves room for the release, and the stated epsilon is the
    accountant's over training and release together."""
    kw = dict(rounds=10, local_epochs=1, batch_size=50, num_examples=2000, delta=DELTA,
              accountants=("rdp",))
    with_release = plan(target_epsilon=1.5, stats_noise_multiplier=5.0, **kw)
    without = plan(target_epsilon=1.5, **kw)
    sigma = with_release.accountants[0].noise_multiplier
    # The release at sigma 5 alone costs eps 0.79 (rdp): training must be noisier.
    assert sigma > without.accountants[0].noise_multiplier * 1.05
    assert with_release.extra_events == [(5.0, 1.0, 1)]
    truth = reported_epsilon([(sigma, 1 / 40, 400), (5.0, 1.0, 1)], DELTA, "rdp")
    assert with_release.accountants[0].epsilon == pytest.approx(truth, rel=1e-9)
    assert with_release.accountants[0].curve[0][1] == pytest.approx(
        reported_epsilon([(sigma, 1 / 40, 40), (5.0, 1.0, 1)], DELTA, "rdp"), rel=1e-9)


@pytest.mark.slow
def test_the_plans_epsilon_is_the_clients_ledger_epsilon_after_a_run(digits, tmp_path):
    task, train = digits
    data = train.subset(np.arange(EXAMPLES))
    # sigma 5 (eps 0.74 alone) rather than the default 50, whose release moves a composed
    # epsilon by only ~0.2%: below the 1% this test can resolve.
    cfg = privacy(tmp_path / "a", target_epsilon=1.5, stats_noise_multiplier=5.0, accountant="rdp")
    ledger = Ledger.for_client(tmp_path / "a", "fed", 0, DELTA, "rdp")
    release, metrics = client_run(task, data, cfg, ledger)
    # The plan a user makes for this client: its noised count (what the client plans from).
    n = max(release.planning_count, BATCH)
    kw = dict(rounds=ROUNDS, local_epochs=1, batch_size=BATCH, num_examples=n, delta=DELTA,
              accountants=("rdp",))
    planned = plan(target_epsilon=1.5, stats_noise_multiplier=cfg.stats_noise_multiplier,
                   **kw).accountants[0]
    assert metrics[-1]["noise_multiplier"] == pytest.approx(planned.noise_multiplier, rel=1e-9)
    assert ledger.spent() == pytest.approx(planned.epsilon, rel=0.01)
    # A run with that plan's sigma configured directly spends what the plan states, too.
    fixed = dataclasses.replace(cfg, noise_multiplier=planned.noise_multiplier, target_epsilon=0.0,
                                ledger_dir=str(tmp_path / "b"))
    ledger_b = Ledger.for_client(tmp_path / "b", "fed", 0, DELTA, "rdp")
    release_b, _ = client_run(task, data, fixed, ledger_b)
    inverse = plan(noise_multiplier=planned.noise_multiplier,
                   stats_noise_multiplier=fixed.stats_noise_multiplier,
                   **{**kw, "num_examples": max(release_b.planning_count, BATCH)}).accountants[0]
    assert ledger_b.spent() == pytest.approx(inverse.epsilon, rel=0.01)
    # Without the release the plan understates what the client spends (what this test guards).
    ignored = plan(noise_multiplier=planned.noise_multiplier,
                   **{**kw, "num_examples": max(release_b.planning_count, BATCH)}).accountants[0]
    assert ledger_b.spent() > ignored.epsilon * 1.05


def test_the_plan_command_states_the_release_and_can_leave_it_out():
    # the class-histogram release alone (evaluation's: tests/test_federated_eval.py; the drift
    # reference's: tests/test_client_reference.py)
    args = ["plan", "--noise-multiplier", "1.0", "--rounds", "5", "--batch-size", "50",
            "--num-examples", "2000", "--accountant", "rdp", "--no-evaluate",
            "--no-release-reference", "--json"]
    runner = CliRunner()
    dp = runner.invoke(privacy_app, [*args, "--stats-noise-multiplier", "5"])
    exact = runner.invoke(privacy_app, [*args, "--release-stats", "exact-outside-guarantee"])
    assert dp.exit_code == 0 and exact.exit_code == 0, dp.output + exact.output
    with_release, without = json.loads(dp.output), json.loads(exact.output)
    assert with_release["extra_events"] == [[5.0, 1.0, 1]] and without["extra_events"] == []
    assert with_release["accountants"][0]["epsilon"] > without["accountants"][0]["epsilon"]
    table = runner.invoke(privacy_app, args[:-1])
    assert table.exit_code == 0 and "class-histogram release (sigma 50" in table.output
    bad = runner.invoke(privacy_app, [*args, "--release-stats", "none"])
    assert bad.exit_code == 2 and "choose one of dp, exact-outside-guarantee" in bad.output


# --- check_delta: the exact count -------------------------------------------------------------

def test_the_delta_check_uses_the_exact_count_not_the_noised_one(digits, tmp_path):
    task, train = digits
    train_cfg = schema.TrainConfig(batch_size=BATCH, local_epochs=1, max_steps=1)
    cfg = dataclasses.replace(privacy(tmp_path, noise_multiplier=1.0), delta=1e-2)
    ledger = Ledger.for_client(tmp_path, "fed", 0, 1e-2, "rdp")
    # 200 real examples: delta 1e-2 >= 1/200 is refused although the noised count (50) would pass.
    with pytest.raises(ConfigError, match="not below 1/n for this client's exact") as refused:
        train_private(dp_compatible(task.build_model()), train.subset(np.arange(200)), train_cfg,
                      cfg, ledger, total_rounds=1, server_round=1, run_id="r",
                      planning_examples=50)
    # Flower sends a ClientApp's exception text to the server: it must not carry the count.
    assert "200" not in str(refused.value) and "0.005" not in str(refused.value)
    assert ledger.events() == []  # refused before anything was spent
    # 50 real examples: delta 1e-2 < 1/50 trains although the noised count (500) would refuse.
    out = train_private(dp_compatible(task.build_model()), train.subset(np.arange(50)), train_cfg,
                        cfg, ledger, total_rounds=1, server_round=1, run_id="r",
                        planning_examples=500)
    assert out["metrics"]["sample_rate"] == 1 / 16  # still planned from the noised count


# --- a 100-example client --------------------------------------------------------------------

@pytest.mark.parametrize("noised_count,rate", [(1, 1.0), (40, 1.0), (100, 0.5), (600, 0.1)])
def test_a_100_example_client_is_accounted_at_the_rate_it_samples(digits, tmp_path, noised_count,
                                                                  rate):
    """Whatever its noised count, a small client's accounted event is the Poisson rate its loader
    really uses (q = 1 when the count is below a batch), and the ledger's epsilon is a fresh
    accountant's over those events."""
    task, train = digits
    data = train.subset(np.arange(100))
    train_cfg = schema.TrainConfig(batch_size=64, local_epochs=1, lr=0.05)
    cfg = privacy(tmp_path, noise_multiplier=1.0, accountant="rdp")
    ledger = Ledger.for_client(tmp_path, "fed", 0, DELTA, "rdp")
    out = train_private(dp_compatible(task.build_model()), data, train_cfg, cfg, ledger,
                        total_rounds=1, server_round=1, run_id="r",
                        planning_examples=noised_count)
    m = out["metrics"]
    assert m["sample_rate"] == rate and m["steps"] == round(1 / rate)
    assert ledger.events() == [(1.0, rate, round(1 / rate))]
    assert m["epsilon"] == pytest.approx(reported_epsilon(ledger.events(), DELTA, "rdp"), rel=1e-9)


def test_a_small_clients_noised_count_is_a_weight_of_at_least_one():
    labels = np.repeat(np.arange(10), 10)  # 100 examples, 10 classes, default sigma 50
    counts = np.array([release_histogram(labels, 10, 50.0, secure_rng()).planning_count
                       for _ in range(4000)])
    assert counts.min() >= 1
    # The noised total has std 50 sqrt(10) = 158: P[total < 64] = Phi(-0.23) = 0.41. 4000 draws
    # give that fraction with std 0.008; 0.05 is > 6 of those.
    assert abs(np.mean(counts < 64) - 0.41) < 0.05
