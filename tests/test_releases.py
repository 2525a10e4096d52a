"""What a client releases besides its DP update (privacy/releases.py, client/releases.py)."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import fedshield.client.app as client_app
import fedshield.client.releases as client_releases
import numpy as np
import pytest
from fedshield.privacy.accounting import epsilon
from fedshield.privacy.ledger import Ledger
from fedshield.privacy.planner import plan_noise
from fedshield.privacy.releases import (
    DP_CLASS_PREFIX,
    OUTSIDE_KEY,
    STATS_NEW_KEY,
    HistogramRelease,
    class_counts_from_metrics,
    gaussian_noise,
    histogram_event,
    merge_class_counts,
    planning_count,
    release_histogram,
    secure_rng,
)
from fedshield.tasks import Split, task_for
from flwr.app import Context, RecordDict

from fedshield import configio, schema
from fedshield.errors import BudgetExhausted, ConfigError
from tests.config_support import neutral_config

EXACT_KEYS = {"examples", "classes-present", "missing-values", "train-loss", "train-seconds",
              "client-seconds"}


# --- the mechanism (pure) -----------------------------------------------------------------

def test_histogram_release_is_a_sensitivity_one_gaussian_with_its_event():
    labels = np.array([0, 0, 1, 2, 2, 2])
    draws = np.array([release_histogram(labels, 4, 3.0, secure_rng()).counts for _ in range(4000)])
    # Mean = the exact histogram, std = sigma x sensitivity 1. 4000 draws: the std of the mean is
    # 3 / sqrt(4000) = 0.047 and of the std estimate ~1.1%; 0.2 and 5% are > 4 of those.
    assert np.abs(draws.mean(0) - [2, 1, 3, 0]).max() < 0.2
    assert np.abs(draws.std(0) / 3.0 - 1).max() < 0.05
    release = release_histogram(labels, 4, 3.0, secure_rng())
    assert release.event == (3.0, 1.0, 1) and release.noise_std == 3.0
    assert release.total == pytest.approx(sum(release.counts))
    with pytest.raises(ConfigError, match="stats_noise_multiplier"):
        histogram_event(0.0)


def test_noise_is_not_derivable_from_anything_the_server_knows():
    """Two releases of the same data draw unrelated noise: no seed is involved."""
    labels = np.repeat(np.arange(10), 1000)
    a = np.array(release_histogram(labels, 10, 1.0, secure_rng()).counts) - 1000
    b = np.array(release_histogram(labels, 10, 1.0, secure_rng()).counts) - 1000
    assert not np.array_equal(a, b)
    big = [gaussian_noise(1.0, (100_000,), secure_rng()) for _ in range(2)]
    # Independent unit normals over 1e5 coordinates: |corr| has std 0.0032; 0.02 is > 6 of those.
    assert abs(np.corrcoef(*big)[0, 1]) < 0.02
    assert np.std(big[0]) == pytest.approx(1.0, rel=0.02)  # sum of 4 halved: still N(0, 1)


def test_planning_count_is_the_rounded_noised_total_at_least_one():
    assert planning_count(287.4) == 287 and planning_count(-5.0) == 1 and planning_count(0.2) == 1
    with pytest.raises(ValueError):
        planning_count(float("nan"))


def test_planner_leaves_room_for_the_release():
    release = histogram_event(10.0)
    sigma = plan_noise(3.0, 1e-5, 0.05, 200, "rdp", (release,))
    alone = plan_noise(3.0, 1e-5, 0.05, 200, "rdp")
    assert sigma > alone  # the release costs something, so training needs a little more noise
    total = epsilon([(sigma, 0.05, 200), release], 1e-5, "rdp")
    assert 3.0 * 0.98 <= total <= 3.0


def test_server_readers_prefer_the_noised_histogram_and_refuse_malformed_values():
    dp = {"dp-class-0": 3.5, "dp-class-1": -1.0, "dp-stats-std": 2.0, "num-examples": 3}
    assert class_counts_from_metrics(dp) == ([3.5, -1.0], 2.0)
    assert class_counts_from_metrics({"class-0": 4.0, "class-1": 1.0}) == ([4.0, 1.0], 0.0)
    assert class_counts_from_metrics({"dp-class-1": 1.0}) is None  # a gap: not a histogram
    assert class_counts_from_metrics({"dp-class-0": float("nan"), "dp-stats-std": 1.0}) is None
    assert class_counts_from_metrics({"num-examples": 5}) is None
    view = merge_class_counts([([3.5, -1.0], 2.0), ([1.5, 4.0], 2.0)])
    assert view.counts == (5.0, 3.0) and view.priors == (5 / 8, 3 / 8)
    assert view.noise_std == pytest.approx(np.sqrt(8)) and view.private
    clipped = merge_class_counts([([3.0, -1.0], 1.0)])
    assert clipped.priors == (1.0, 0.0)  # negative noised counts clip to 0 (post-processing)
    assert not merge_class_counts([([1.0, 2.0], 0.0)]).private
    assert merge_class_counts([]) is None
    assert merge_class_counts([([1.0], 1.0), ([1.0, 2.0], 1.0)]) is None


# --- the client ---------------------------------------------------------------------------

def digits_split(n: int) -> Split:
    train = task_for(schema.TaskConfig(name="digits")).load()[0]
    return train.subset(np.arange(n))


def dp_cfg(tmp: Path, **privacy) -> schema.Config:
    return neutral_config({"task": {"name": "digits"},
                           "federation": {"num_clients": 1, "min_clients": 1},
                           "train": {"lr": 0.1, "batch_size": 16, "max_steps": 2},
                           "privacy": {"enabled": True, "noise_multiplier": 1.0,
                                       "ledger_dir": str(tmp), "ledger_scope": "run", **privacy}})


def fit(cfg: schema.Config, data: Split, rnd: int = 1, run_key: str = "run-a") -> dict:
    task = task_for(cfg.task)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                      state=RecordDict(), run_config=cfg.flat())
    rc = {"num-rounds": 3, "server-round": rnd, "run-key": run_key,
          **configio.flatten({"train": dataclasses.asdict(cfg.train)})}
    weights = task.build_model().state_dict()
    _, metrics = client_app.fit_locally(context, cfg, lambda c, f: (task, data, data.subset([])),
                                        weights, rc)
    return metrics


def client_ledger(cfg: schema.Config, run_key: str = "run-a") -> Ledger:
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                      state=RecordDict(), run_config=cfg.flat())
    return client_app.client_ledger(cfg, context, run_key)


def test_under_dp_one_example_changes_nothing_but_the_dp_outputs(tmp_path, monkeypatch):
    """Given the same released histogram, a dataset and the same one example short give the same
    reply metrics: count, sample rate, steps and epsilon come from the release, not from n.
    289 = 16 x 18 + 1 examples: the exact count would move the sample rate from 1/19 to 1/18."""
    fixed = HistogramRelease(tuple(30.0 + k for k in range(10)), 10.0, 10.0)
    monkeypatch.setattr(client_releases, "release_histogram", lambda *a: fixed)
    data = digits_split(289)
    replies = [fit(dp_cfg(tmp_path / name), d) for name, d in
               (("full", data), ("one-less", data.subset(np.arange(288))))]
    assert replies[0] == replies[1]
    reply = replies[0]
    assert not EXACT_KEYS & set(reply) and not any(k.startswith("class-") for k in reply)
    assert set(reply) <= client_releases.DP_REPLY_KEYS | {k for k in reply if k.startswith("dp-")}
    assert reply["num-examples"] == fixed.planning_count == 345 != len(data)
    assert reply["sample-rate"] == 1 / 22  # ceil(345 / 16) = 22 batches an epoch, not 19
    assert [reply[f"{DP_CLASS_PREFIX}{k}"] for k in range(10)] == list(fixed.counts)


def test_the_release_is_in_the_ledger_once_per_run_and_in_the_reported_epsilon(tmp_path):
    cfg = dp_cfg(tmp_path)
    data = digits_split(200)
    first, second = fit(cfg, data, 1), fit(cfg, data, 2)
    history = client_ledger(cfg).history
    releases = [e for e in history if client_releases.RELEASE_TAG in e["run_id"]]
    training = [e for e in history if e["run_id"] == "run-a"]
    assert len(releases) == 1 and [e["round"] for e in training] == [1, 2]
    sigma = cfg.privacy.stats_noise_multiplier
    assert (releases[0]["noise_multiplier"], releases[0]["sample_rate"], releases[0]["steps"]) \
        == (sigma, 1.0, 1)
    assert first[STATS_NEW_KEY] == 1.0 and second[STATS_NEW_KEY] == 0.0
    # Later rounds resend the same noised values: no fresh draw, no new cost.
    counts = lambda m: [m[f"{DP_CLASS_PREFIX}{k}"] for k in range(10)]  # noqa: E731
    assert counts(first) == counts(second)
    events = [(sigma, 1.0, 1)] + [(1.0, first["sample-rate"], int(first["steps"]))] * 2
    assert second["epsilon"] == pytest.approx(epsilon(events, 1e-5), rel=1e-9)
    assert second["epsilon"] > epsilon(events[1:], 1e-5)


def test_a_lost_release_file_is_a_new_accounted_release_never_a_free_one(tmp_path):
    cfg = dp_cfg(tmp_path)
    fit(cfg, digits_split(200), 1)
    ledger = client_ledger(cfg)
    client_releases.releases_path(ledger).unlink()
    again = fit(cfg, digits_split(200), 2)
    assert again[STATS_NEW_KEY] == 1.0
    assert sum(client_releases.RELEASE_TAG in e["run_id"] for e in ledger.history) == 2


def test_a_release_beyond_the_budget_is_refused_before_anything_leaves(tmp_path):
    cfg = dp_cfg(tmp_path, max_epsilon=0.05)  # the release alone costs ~0.35
    ledger = client_ledger(cfg)
    with pytest.raises(BudgetExhausted):
        client_releases.stats_release(np.zeros(50, dtype=int), 10, cfg.privacy, ledger, "run-a")
    assert ledger.history == [] and not client_releases.releases_path(ledger).exists()


def test_the_opt_in_sends_exact_values_marked_outside_the_guarantee(tmp_path):
    cfg = dp_cfg(tmp_path, release_stats="exact-outside-guarantee")
    data = digits_split(200)
    reply = fit(cfg, data)
    assert reply[OUTSIDE_KEY] == 1.0 and reply["num-examples"] == 200 == reply["examples"]
    assert "train-loss" in reply and not any(k.startswith("dp-") for k in reply)
    assert reply["sample-rate"] == 1 / 13  # planned from the exact count, as it says
    assert not any(client_releases.RELEASE_TAG in e["run_id"] for e in client_ledger(cfg).history)


def test_without_dp_the_reply_is_unchanged(tmp_path):
    cfg = neutral_config({"task": {"name": "digits"},
                          "federation": {"num_clients": 1, "min_clients": 1},
                          "train": {"batch_size": 16, "max_steps": 2},
                          "privacy": {"ledger_dir": str(tmp_path)}})
    data = digits_split(200)
    reply = fit(cfg, data)
    hist = np.bincount(data.y, minlength=10)
    assert reply["num-examples"] == 200 and reply["examples"] == 200.0
    assert [reply[f"class-{k}"] for k in range(10)] == hist.tolist()
    assert {"train-loss", "classes-present", "missing-values", "client-seconds"} <= set(reply)
    assert OUTSIDE_KEY not in reply and not any(k.startswith("dp-") for k in reply)


def test_client_evaluation_under_dp_is_released_through_the_accounted_mechanism():
    # Issue 17: no opt-in needed any more; the releases are DP (tests/test_federated_eval.py).
    base = {"privacy": {"enabled": True, "noise_multiplier": 1.0},
            "federation": {"fraction_evaluate": 0.5}}
    assert neutral_config(base).privacy.release_stats == "dp"
    neutral_config({**base, "privacy": {**base["privacy"],
                                        "release_stats": "exact-outside-guarantee"}})
    neutral_config({"federation": {"fraction_evaluate": 0.5}})  # no DP: nothing to break


# --- the server's views -------------------------------------------------------------------

def test_metrics_line_logs_the_release_once_and_marks_the_opt_in():
    from fedshield.server.federation_state import RoundState
    from fedshield.server.recording import metrics_line

    from fedshield.records import TrainReport

    dp_reply = {"epsilon": 1.0, "delta": 1e-5, "noise-multiplier": 1.0, "clip-norm": 1.0,
                "sample-rate": 0.1, "steps": 10.0, "num-examples": 40, "dp-class-0": 25.5,
                "dp-class-1": 14.0, "dp-stats-noise-multiplier": 10.0, "dp-stats-std": 10.0,
                "dp-stats-new": 1.0}
    exact_reply = {**{k: v for k, v in dp_reply.items() if not k.startswith("dp-")},
                   "class-0": 20.0, "class-1": 20.0, "train-loss": 0.5, OUTSIDE_KEY: 1.0}
    strategy = SimpleNamespace(node_partition={7: 0, 8: 1}, reputation=None,
                               user_level_epsilon=lambda rnd: None)
    report = lambda metrics: TrainReport.from_metrics({}, metrics)  # noqa: E731 (as decoded)
    state = RoundState(reports={7: report(dp_reply), 8: report(exact_reply)})
    record = {"server_eval": {}, "client_eval": {"accuracy": 0.9, OUTSIDE_KEY: 1.0},
              "train": {}, "state": state, "seconds": 1.0}
    line = metrics_line(1, record, strategy).to_dict()  # the line as written
    assert line["dp_events"]["0"]["release"] == {"noise_multiplier": 10.0, "sample_rate": 1.0,
                                                 "steps": 1}
    assert "release" not in line["dp_events"]["1"]
    assert line["class_counts"] == {"0": {"counts": [25.5, 14.0], "noise_std": 10.0},
                                    "1": {"counts": [20.0, 20.0], "noise_std": 0.0}}
    assert {"train_loss", "client_accuracy", "class_counts"} <= set(line["outside_guarantee"])
    state = RoundState(reports={7: report({**dp_reply, STATS_NEW_KEY: 0.0})})
    line = metrics_line(2, {**record, "client_eval": {}, "state": state}, strategy).to_dict()
    assert "release" not in line["dp_events"]["0"] and line["outside_guarantee"] == []


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    from fedshield.simulations.runner import simulate

    tmp = tmp_path_factory.mktemp("releases")
    cfg = neutral_config({"name": "rel", "output_dir": str(tmp / "runs"),
                          "task": {"name": "digits"},
                          "federation": {"num_clients": 3, "rounds": 2},
                          "partition": {"kind": "iid"},
                          "train": {"lr": 0.5, "batch_size": 32, "max_steps": 5},
                          "privacy": {"enabled": True, "noise_multiplier": 1.0,
                                      "stats_noise_multiplier": 10.0,
                                      "ledger_dir": str(tmp / "ledgers")},
                          "deployment": {"handoff": False}})
    return cfg, simulate(cfg)


def test_summary_and_drift_reference_work_from_the_noised_histograms(dp_run, tmp_path):
    from fedshield.deployment.handoff import drift_reference

    cfg, summary = dp_run
    run_dir = Path(summary.run_dir)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(m["train_loss"] is None and m["outside_guarantee"] == [] for m in lines)
    assert all(m["client_seconds"] == {} for m in lines)  # no exact timing leaves either
    assert [sorted(m["class_counts"]) for m in lines] == [["0", "1", "2"]] * 2
    quality = summary.data_quality
    assert quality.clients == 3 and quality.source.startswith("dp-gaussian")
    assert quality.noise_std == pytest.approx(10.0 * np.sqrt(3))
    assert sum(quality.class_priors) == pytest.approx(1.0)
    # The noised total is near the federation's real size (3 x 10 classes of noise std 10: the
    # total's noise std is ~55, so 5 of those is a bound that cannot fail by chance).
    from fedshield.client.data import LOCAL_VAL_FRACTION

    local = len(task_for(cfg.task).load()[0]) * (1 - LOCAL_VAL_FRACTION)  # +- 3 rounding
    assert abs(quality.examples - local) < 5 * 55
    assert summary.privacy.release_stats == "dp"
    assert summary.privacy.stats_noise_multiplier == 10.0
    assert list(summary.privacy.outside_guarantee) == []
    reference = drift_reference(run_dir, cfg, tmp_path, quality)
    assert "dp-gaussian" in reference.source
    expected = np.clip(quality.class_counts, 0, None)
    assert reference.class_priors == pytest.approx(expected / expected.sum())


def test_summary_lists_what_was_sent_outside_the_guarantee():
    from fedshield.server.recording import build_summary

    from fedshield.run_records import MetricsLine

    cfg = neutral_config({"privacy": {"enabled": True, "noise_multiplier": 1.0,
                                      "release_stats": "exact-outside-guarantee"},
                          "federation": {"fraction_evaluate": 1.0}})
    base = {"epsilon": {}, "dp_events": {}, "rejected": {}, "refused": {}, "quarantined": [],
            "accuracy": 0.5, "loss": 1.0, "central_epsilon": None}
    lines = [{**base, "round": 1, "outside_guarantee": ["class_counts", "train_loss"],
              "class_counts": {"0": {"counts": [3.0, 1.0], "noise_std": 0.0}}},
             {**base, "round": 2, "outside_guarantee": ["client_accuracy"],
              "class_counts": {"1": {"counts": [1.0, 3.0], "noise_std": 0.0}}}]
    folder = SimpleNamespace(read_metrics=lambda: [MetricsLine.from_dict(m) for m in lines],
                             path=Path("/tmp/none"))
    summary = build_summary(cfg, folder, SimpleNamespace(node_partition={}, exhausted={}), "", 1.0)
    assert list(summary.privacy.outside_guarantee) == ["class_counts", "client_accuracy",
                                                       "train_loss"]
    assert summary.privacy.release_stats == "exact-outside-guarantee"
    assert summary.privacy.stats_noise_multiplier is None
    quality = summary.data_quality
    assert list(quality.class_counts) == [4.0, 4.0] and "outside" in quality.source


def test_without_dp_the_drift_reference_keeps_the_servers_class_priors(tmp_path):
    from fedshield.deployment.handoff import drift_reference

    cfg = neutral_config({"task": {"name": "digits"}})
    run, out = tmp_path / "run", tmp_path / "out"  # out, not run: the run has no reference
    run.mkdir(), out.mkdir()
    exact = merge_class_counts([([100.0] + [0.0] * 9, 0.0)]).to_dict()
    plain = drift_reference(run, cfg, out)
    assert drift_reference(run, cfg, out, exact).class_priors.tolist() \
        == plain.class_priors.tolist()
    noised = merge_class_counts([([100.0] + [0.0] * 9, 10.0)]).to_dict()
    assert drift_reference(run, cfg, out, noised).class_priors[0] == 1.0
