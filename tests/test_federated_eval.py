"""Federated evaluation (issue 17): the distribution over clients, the DP release of each
client's result (noised, accounted in its ledger, planned into its DP-SGD noise), hostile
evaluation replies at the boundary, and an end-to-end digits run with its card."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fedshield.client.app import make_client_app
from fedshield.client.data import load_client_data
from fedshield.client.releases import EVAL_TAG, evaluation_release, planned_events
from fedshield.privacy.accounting import compact, reported_epsilon
from fedshield.privacy.ledger import Ledger
from fedshield.privacy.planner import plan
from fedshield.privacy.releases import (
    EVAL_ACC_STD_KEY,
    EVAL_CLIP_KEY,
    EVAL_COUNT_NEW_KEY,
    EVAL_NOISE_KEY,
    CountRelease,
    evaluation_events,
    release_evaluation,
)
from fedshield.server.evaluation import DP_SOURCE, EXACT_SOURCE, distribution
from fedshield.server.strategy import ShieldStrategy
from fedshield.simulations.grid import InProcessGrid
from fedshield.tasks import task_for
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from typer.testing import CliRunner

from fedshield import schema
from fedshield.commands.privacy import privacy_app
from fedshield.errors import BudgetExhausted
from tests.config_support import neutral_config
from tests.reply_support import Federation, digits_cfg, wire

SIGMA, CLIP, DELTA = 20.0, 4.0, 1e-5


# --- the distribution over clients (pure) ------------------------------------------------------

def test_distribution_mean_worst_worst_decile_and_spread():
    d = distribution([0.9, 0.5, 0.7, 0.8])
    assert (d.mean, d.worst, d.worst_decile) == pytest.approx((0.725, 0.5, 0.5))
    assert d.spread == pytest.approx(math.sqrt(np.var([0.9, 0.5, 0.7, 0.8])))
    # the worst 10% of 15 clients is 2 of them (at least 10%, at least one)
    values = [i / 20 for i in range(15)]
    assert distribution(values).worst_decile == pytest.approx((0.0 + 0.05) / 2)
    # lower is better (a loss): the worst is the largest
    assert distribution([0.2, 1.5, 0.4], higher_is_better=False).worst == 1.5
    with pytest.raises(ValueError, match="no client values"):
        distribution([])


# --- the release (pure) ------------------------------------------------------------------------

def test_the_release_is_noised_at_the_stated_scale_and_clipped_to_its_ranges():
    rng = np.random.default_rng(0)  # the test's draws; clients use the OS CSPRNG (secure_rng)
    n, correct = 1000, 600
    count = CountRelease(float(n), SIGMA)  # the count's own noise aside: divide by exactly n
    draws = [release_evaluation(correct, 300.0, count, CLIP, rng) for _ in range(4000)]
    acc = np.array([d.accuracy for d in draws])
    # correct count noise std sigma sqrt(2) = 28.3 over n = 1000: accuracy std 0.0283; 4000
    # draws estimate a std within ~1.1% (one sigma), so 10% cannot fail by chance
    assert acc.std() * n == pytest.approx(SIGMA * math.sqrt(2), rel=0.1)
    assert abs(acc.mean() - 0.6) < 0.005  # unbiased: 5 standard errors of the mean
    loss = np.array([d.loss for d in draws])
    assert loss.std() * n == pytest.approx(SIGMA * math.sqrt(2) * CLIP, rel=0.1)
    assert {d.num_examples for d in draws} == {n}
    # tiny held-out sets: noise dwarfs the values, which stay in their ranges
    tiny = [release_evaluation(5, 10.0, CountRelease(3.0, SIGMA), CLIP, rng) for _ in range(200)]
    assert all(0 <= d.accuracy <= 1 and 0 <= d.loss <= CLIP for d in tiny)
    assert {d.accuracy for d in tiny} >= {0.0, 1.0}  # clipped at both ends


# --- accounting on the client ------------------------------------------------------------------

def privacy_cfg(tmp_path, **kw) -> schema.PrivacyConfig:
    return schema.PrivacyConfig(enabled=True, noise_multiplier=1.0, delta=DELTA,
                                accountant="rdp", ledger_dir=str(tmp_path),
                                eval_noise_multiplier=SIGMA, eval_loss_clip=CLIP, **kw)


def test_each_evaluation_is_a_ledger_event_composed_by_the_same_accountant(tmp_path):
    cfg = privacy_cfg(tmp_path)
    ledger = Ledger.for_client(tmp_path, "fed", 0, DELTA, "rdp")
    ledger.record([(1.0, 0.1, 10)], round=1, run_id="run")  # a round of training
    trained = ledger.spent()
    first, new, eps = evaluation_release(50, 20.0, 80, cfg, ledger, "run", 1)
    assert new and eps > trained  # the count and the evaluation: two new events
    assert ledger.events()[1:] == [(SIGMA, 1.0, 1), (SIGMA, 1.0, 1)]
    assert eps == pytest.approx(reported_epsilon([(1.0, 0.1, 10), (SIGMA, 1.0, 2)], DELTA, "rdp"))
    second, new, eps2 = evaluation_release(50, 20.0, 80, cfg, ledger, "run", 2)
    # the count is resent (post-processing, free): one more event only
    assert not new and len(ledger.events()) == 4 and eps2 > eps
    assert second.num_examples == first.num_examples
    # a fresh accountant over the recorded events states the same epsilon
    assert ledger.spent() == pytest.approx(reported_epsilon(ledger.events(), DELTA, "rdp"))
    assert all(e["run_id"] == f"run/{EVAL_TAG}" for e in ledger.history[1:])


def test_an_evaluation_over_budget_is_refused_before_anything_is_recorded(tmp_path):
    cfg = privacy_cfg(tmp_path)
    ledger = Ledger.for_client(tmp_path, "fed", 0, DELTA, "rdp", max_epsilon=0.05)
    with pytest.raises(BudgetExhausted, match="budget exhausted"):
        evaluation_release(50, 20.0, 80, cfg, ledger, "run", 1)
    assert ledger.events() == []


# --- through the real ClientApp and strategy -------------------------------------------------

def eval_cfg(tmp_path, **privacy) -> schema.Config:
    return neutral_config({"name": "fedeval", "seed": 0, "output_dir": str(tmp_path / "runs"),
                           "task": {"name": "digits"},
                           "federation": {"num_clients": 3, "min_clients": 1,
                                          "fraction_evaluate": 1.0},
                           "partition": {"kind": "iid"},
                           "privacy": {"enabled": True, "noise_multiplier": 1.0,
                                       "accountant": "rdp",
                                       "ledger_dir": str(tmp_path / "ledgers"), **privacy}})


def evaluate_round(cfg: schema.Config, grid, rnd: int = 1):
    """configure_evaluate -> the clients -> (Flower's serialisation) -> aggregate_evaluate."""
    torch_model = task_for(cfg.task).build_model()
    strategy = ShieldStrategy(cfg)
    sent = strategy.configure_evaluate(rnd, ArrayRecord(torch_model.state_dict()),
                                       ConfigRecord({"run-key": "r1", "num-rounds": 2}), grid)
    replies = [wire(r) for r in grid.send_and_receive(list(sent))]
    return strategy, strategy.aggregate_evaluate(rnd, replies)


def test_dp_clients_release_noised_accounted_values_and_refuse_past_their_budget(tmp_path):
    cfg = eval_cfg(tmp_path)
    apps = {pid: make_client_app(load_client_data) for pid in range(3)}
    # partition 2's site caps its budget below one evaluation's cost
    nodes = {p: {"partition-id": p, "num-partitions": 3} for p in range(3)}
    nodes[2]["max-epsilon"] = 0.05
    strategy, metrics = evaluate_round(cfg, InProcessGrid(apps, cfg.flat(), cfg.seed, nodes))
    e = strategy.round.evaluation
    assert e.source == DP_SOURCE and sorted(e.accuracy) == ["0", "1"]
    assert e.refused["2"].startswith("budget-exhausted") and not e.rejected
    assert metrics["num-clients"] == 2 and e.noise_std > 0 and e.noise_multiplier == SIGMA
    assert e.events["0"] == e.events["1"] and len(e.events["0"]) == 2  # count + evaluation
    for pid in ("0", "1"):
        ledger = Ledger.for_client(tmp_path / "ledgers", "fedeval/runs/r1", f"partition-{pid}",
                                   DELTA, "rdp")
        assert ledger.events() == [(SIGMA, 1.0, 1)] * 2  # the count and the evaluation
        assert compact(ledger.events()) == [(SIGMA, 1.0, 2)]
        assert e.epsilon[pid] == pytest.approx(ledger.spent())
        # the count the server sees is the released one (the sidecar's), never the exact one
        sidecar = json.loads(ledger.path.with_name(f"releases-{ledger.path.stem}.json")
                             .read_text())
        released = sidecar["r1/eval-count"]["count"]
        assert e.num_examples[pid] == max(1, round(released))
    none = Ledger.for_client(tmp_path / "ledgers", "fedeval/runs/r1", "partition-2", DELTA,
                             "rdp", max_epsilon=0.05)
    assert none.events() == []  # the refusing client spent (and sent) nothing


def test_without_dp_the_values_are_exact_and_labelled(tmp_path):
    cfg = eval_cfg(tmp_path, enabled=False, noise_multiplier=0.0)
    apps = {pid: make_client_app(load_client_data) for pid in range(3)}
    strategy, metrics = evaluate_round(cfg, InProcessGrid(apps, cfg.flat(), cfg.seed))
    e = strategy.round.evaluation
    assert e.source == EXACT_SOURCE and e.noise_std is None and not e.events
    _, _, val = load_client_data(
        SimpleNamespace(node_config={"partition-id": 0, "num-partitions": 3}), cfg)
    assert e.num_examples["0"] == len(val)  # exact: there is no guarantee to break
    assert metrics["accuracy"] == pytest.approx(np.average(
        list(e.accuracy.values()), weights=[e.num_examples[k] for k in e.accuracy]))


# --- hostile evaluation replies ---------------------------------------------------------------

def dp_eval_metrics(pid: int) -> dict[str, float]:
    return {"num-examples": 40.0 + pid, "partition-id": pid, "epsilon": 0.5,
            EVAL_NOISE_KEY: SIGMA, EVAL_CLIP_KEY: CLIP, EVAL_ACC_STD_KEY: 0.7,
            EVAL_COUNT_NEW_KEY: 1.0, "accuracy": 0.5 + 0.05 * pid, "loss": 1.0}


def eval_reply(**edits):
    def behaviour(g, pid, rnd):
        m = {**dp_eval_metrics(pid), **{k.replace("_", "-"): v for k, v in edits.items()}}
        m = {k: v for k, v in m.items() if v is not None}
        if any(isinstance(v, str) for v in m.values()):  # a string needs a ConfigRecord
            return RecordDict({"metrics": ConfigRecord(m)})
        return RecordDict({"metrics": MetricRecord(m)})
    return behaviour


HOSTILE_EVAL = {
    "nan-accuracy": (eval_reply(accuracy=float("nan")), "non-finite"),
    "negative-count": (eval_reply(num_examples=-5.0), "out-of-range:num-examples"),
    "zero-count": (eval_reply(num_examples=0.0), "out-of-range:num-examples"),
    "accuracy-list": (eval_reply(accuracy=[0.1, 0.9]), "malformed:accuracy"),
    "accuracy-above-1": (eval_reply(accuracy=3.0), "out-of-range:accuracy"),
    "negative-loss": (eval_reply(loss=-1.0), "out-of-range:loss"),
    "loss-above-clip": (eval_reply(loss=CLIP * 2), "out-of-range:loss"),
    "exact-under-dp": (eval_reply(**{EVAL_NOISE_KEY: None, EVAL_ACC_STD_KEY: None}),
                       "not-private"),
    "other-noise": (eval_reply(**{EVAL_NOISE_KEY: 0.001}), "dp-mismatch"),
    "nan-noise-std": (eval_reply(**{EVAL_ACC_STD_KEY: float("nan")}), "not-private"),
    "metrics-as-text": (eval_reply(accuracy="high"), "malformed:metrics"),
    "no-metrics": (lambda g, pid, rnd: RecordDict({}), "malformed:metrics"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_EVAL))
def test_a_hostile_evaluation_reply_is_rejected_and_the_round_goes_on(tmp_path, case):
    behaviour, code = HOSTILE_EVAL[case]
    cfg = digits_cfg(tmp_path, n=4, federation={"fraction_evaluate": 1.0},
                     privacy={"enabled": True, "noise_multiplier": 1.0})
    honest = eval_reply()
    fed = Federation(cfg, {0: behaviour, 1: honest, 2: honest, 3: honest})
    strategy, metrics = evaluate_round(cfg, fed.grid)
    e = strategy.round.evaluation
    assert list(e.rejected) == ["0"] and e.rejected["0"].startswith(code), e.rejected
    assert sorted(e.accuracy) == ["1", "2", "3"] and metrics["num-clients"] == 3
    assert e.mean == pytest.approx(np.mean([0.55, 0.6, 0.65]))


# --- the plan counts it as the client does ---------------------------------------------------

def test_the_plan_counts_the_evaluation_releases_as_the_client_does():
    kw = dict(rounds=4, local_epochs=1, batch_size=50, num_examples=2000, delta=DELTA,
              accountants=("rdp",), stats_noise_multiplier=50.0)
    with_eval = plan(target_epsilon=3.0, eval_noise_multiplier=10.0, **kw)
    without = plan(target_epsilon=3.0, **kw)
    sigma = with_eval.accountants[0].noise_multiplier
    assert sigma > without.accountants[0].noise_multiplier * 1.01
    client = planned_events(schema.PrivacyConfig(enabled=True, eval_noise_multiplier=10.0), 1.0,
                            4, None)
    assert client == evaluation_events(10.0, 4)
    assert with_eval.extra_events == [(50.0, 1.0, 1), *client]
    # the ledger after the run: 4 rounds of training, the histogram, the count, 4 evaluations
    ledger = [*[(sigma, 1 / 40, 40)] * 4, (50.0, 1.0, 1), (10.0, 1.0, 1), *[(10.0, 1.0, 1)] * 4]
    assert with_eval.accountants[0].epsilon == pytest.approx(
        reported_epsilon(ledger, DELTA, "rdp"), rel=1e-9)
    assert with_eval.accountants[0].epsilon <= 3.0
    # after round 1: one round of training, the histogram, the count and one evaluation
    assert with_eval.accountants[0].curve[0][1] == pytest.approx(
        reported_epsilon(ledger[:1] + ledger[4:7], DELTA, "rdp"), rel=1e-9)
    # the opt-in to exact values plans nothing for evaluation (it is outside the guarantee)
    exact = schema.PrivacyConfig(enabled=True, release_stats="exact-outside-guarantee")
    assert planned_events(exact, 1.0, 4, None) == ()
    assert planned_events(schema.PrivacyConfig(enabled=True), 0.0, 4, None) == ()


def test_the_plan_command_counts_evaluation_unless_told_not_to():
    # the drift reference's release left out (tests/test_client_reference.py covers it)
    args = ["plan", "--noise-multiplier", "1.0", "--rounds", "5", "--batch-size", "50",
            "--num-examples", "2000", "--accountant", "rdp", "--no-release-reference", "--json"]
    runner = CliRunner()
    on, off = (runner.invoke(privacy_app, [*args, *flag]) for flag in ([], ["--no-evaluate"]))
    assert on.exit_code == 0 and off.exit_code == 0, on.output + off.output
    on_plan, off_plan = json.loads(on.output), json.loads(off.output)
    assert on_plan["extra_events"] == [[50.0, 1.0, 1], [SIGMA, 1.0, 1], [SIGMA, 1.0, 5]]
    assert off_plan["extra_events"] == [[50.0, 1.0, 1]]
    assert off_plan["eval_noise_multiplier"] is None
    assert on_plan["accountants"][0]["epsilon"] > off_plan["accountants"][0]["epsilon"]


# --- end to end -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_dp_digits_run_evaluates_every_round_within_its_planned_budget(tmp_path):
    from fedshield.deployment.card import build_card
    from fedshield.deployment.export import export_model
    from fedshield.simulations.runner import simulate
    from fedshield.tasks import get_task

    from tests.deploy_support import trained_state

    target = 2.0
    cfg = neutral_config({"name": "e2e", "output_dir": str(tmp_path / "runs"),
                          "task": {"name": "digits"},
                          "federation": {"num_clients": 3, "rounds": 2, "fraction_evaluate": 1.0},
                          "partition": {"kind": "iid"},
                          "train": {"lr": 0.5, "batch_size": 32, "max_steps": 4},
                          "privacy": {"enabled": True, "target_epsilon": target,
                                      "max_epsilon": target, "accountant": "rdp",
                                      "ledger_dir": str(tmp_path / "ledgers")},
                          "deployment": {"handoff": False}})
    summary = simulate(cfg)
    run = Path(summary.run_dir)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(m["evaluation"]["accuracy"]) for m in lines] == [["0", "1", "2"]] * 2
    assert all(m["evaluation"]["source"] == DP_SOURCE and not m["evaluation"]["refused"]
               for m in lines)
    for pid in ("0", "1", "2"):
        ledger = Ledger.for_client(tmp_path / "ledgers", f"e2e/runs/{run.name}",
                                   f"partition-{pid}", DELTA, "rdp", max_epsilon=target)
        spent = ledger.spent()
        # planned with room for every evaluation: within the target, and close to it
        assert target * 0.99 <= spent <= target
        assert summary.privacy.epsilon_by_client[pid] == pytest.approx(spent)
        trained = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger.history
                   if not e["run_id"].endswith(EVAL_TAG)]
        assert len(trained) == len(ledger.history) - 3  # the count and two evaluations
        assert reported_epsilon(trained, DELTA, "rdp") < spent
    assert summary.evaluation is not None and summary.evaluation.round == 2
    # the card shows the final round's distribution
    export = export_model(get_task("digits"),
                          {f"_module.{k}": v for k, v in trained_state("digits").items()},
                          run / "export", {"run": run.name, "rounds": 2})
    card = build_card(run, export, explain_examples=4)
    section = card.data["federated_evaluation"]
    assert section["evaluated"] and section["round"] == 2 and len(section["per_round"]) == 2
    assert "## Federated evaluation" in card.md_path.read_text()
