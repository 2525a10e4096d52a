"""`fedshield bench simulation` (benchmarks/bench_simulation.py): legs in their own processes on
one federation, the table and JSON, equal results across fedshield legs, failures exit non-zero."""

from __future__ import annotations

import json
import statistics

import pytest
from fedshield.benchmarks.bench_simulation import (
    PRESETS,
    compare,
    federation_config,
    leg_order,
    parse_legs,
    planned_cohorts,
    round_times,
    startup_seconds,
)
from typer.testing import CliRunner

from fedshield.cli import app
from fedshield.errors import ConfigError

SMALL = ["--preset", "digits100", "--clients", "6", "--rounds", "3", "--workers", "2"]


# --- pure parts ----------------------------------------------------------------------------
def test_round_times_and_start_up_come_from_the_metrics_lines_timestamps():
    assert round_times([10.0, 10.5, 11.25]) == [0.5, 0.75]
    # launched at 0, round 1 ended at 12, a steady round takes 2: 10 s of start-up
    assert startup_seconds(0.0, 12.0, 2.0) == 10.0


def test_legs_are_checked_and_the_floor_runs_after_the_cohorts_are_known():
    assert parse_legs("floor, ray,inprocess-3,inprocess-N") == [
        "floor", "ray", "inprocess-3", "inprocess-N"]
    assert leg_order(["floor", "ray", "inprocess-1", "inprocess-N"]) == [
        "inprocess-1", "inprocess-N", "ray", "floor"]
    for bad in ("spark", "inprocess-0", "inprocess-x", "", "ray,ray"):
        with pytest.raises(ConfigError, match="--legs"):
            parse_legs(bad)


def test_a_result_that_depends_on_the_number_of_workers_is_a_mismatch():
    def row(leg, acc, sha, ok=True):
        return {"leg": leg, "ok": ok, "final_accuracy": acc, "model_sha256": sha}

    same = [row("inprocess-1", 0.9, "aa"), row("inprocess-2", 0.9, "aa"), row("ray", 0.5, None)]
    assert compare(same) == ""  # Ray samples other node ids: not compared
    assert "inprocess-2 ended at accuracy 0.9 (weights bb)" in compare(
        [row("inprocess-1", 0.9, "aa"), row("inprocess-2", 0.9, "bb")])  # same accuracy, not bits
    assert compare([row("inprocess-1", 0.9, "aa"), row("inprocess-2", 0.1, "bb", ok=False)]) == ""


def test_presets_are_valid_configs_with_the_issue_s_federations():
    digits = federation_config(PRESETS["digits100"][0], 3, None)
    assert (digits.task.name, digits.federation.num_clients, digits.federation.rounds) == (
        "digits", 100, 3)
    scatter, tanh = (federation_config(f, None, None) for f in PRESETS["mnist1000-dp"])
    for cfg in (scatter, tanh):
        fed = cfg.federation
        assert (fed.num_clients, round(fed.num_clients * fed.fraction_train)) == (1000, 100)
        assert cfg.partition.kind == "dirichlet" and cfg.partition.alpha == 0.5
        assert cfg.privacy.enabled and cfg.privacy.reproducible_noise  # comparable legs
    assert (scatter.task.model, tanh.task.model) == ("scatter_linear", "tanh_cnn")
    assert not federation_config(PRESETS["mnist1000"][0], None, None).privacy.enabled
    with pytest.raises(ConfigError, match="at least 2"):
        federation_config(PRESETS["digits100"][0], 1, None)


def test_the_mnist_dp_presets_pass_the_pre_flight_partition_check():
    """Every client of the 1000-client Dirichlet federation can train with the preset's batch
    (DP-SGD's sample rate batch / examples must be <= 1: batch 32 was refused)."""
    from fedshield.server.preflight import partition_problem, train_sizes

    scatter, tanh = (federation_config(f, None, None) for f in PRESETS["mnist1000-dp"])
    # the same MNIST labels, partitions and batch: the tanh (pixel) task stands for both
    assert (scatter.partition, scatter.train.batch_size, scatter.federation.num_clients) == (
        tanh.partition, tanh.train.batch_size, tanh.federation.num_clients)
    sizes = train_sizes(tanh)
    assert len(sizes) == 1000 and sum(sizes) <= 60_000
    assert partition_problem(sizes, tanh.train.batch_size, private=True) is None
    assert partition_problem(sizes, 32, private=True) is not None  # what the preset had


def test_bad_options_exit_2_before_any_leg_runs(tmp_path):
    for args in (["--legs", "inprocess-1,spark"], ["--preset", "cifar"],
                 ["--set", "federation.rounds=0"]):
        result = CliRunner().invoke(app, ["bench", "simulation", *args,
                                          "--out", str(tmp_path / "b")])
        assert result.exit_code == 2, (args, result.output)
    assert not (tmp_path / "b").exists()


# --- end to end: the legs in their own processes ---------------------------------------------
@pytest.fixture(scope="module")
def small_bench(tmp_path_factory):
    """One invocation: in-process 1 and 2 workers, the floor, and a Ray leg pointed at a port
    where no head listens (it fails at once, so the command must exit non-zero); 3 of the 6
    clients train each round."""
    out = tmp_path_factory.mktemp("bench-sim")
    result = CliRunner().invoke(app, [
        "bench", "simulation", *SMALL, "--legs", "inprocess-1,inprocess-2,ray,floor",
        "--set", 'federation.ray_address="127.0.0.1:1"', "--set", "federation.fraction_train=0.5",
        "--out", str(out)])
    return result, out


def test_each_leg_reports_start_up_round_time_memory_and_accuracy(small_bench):
    result, out = small_bench
    data = json.loads((out / "results.json").read_text())
    assert data["benchmark"] == "simulation" and data["workers"] == 2
    assert data["threads_per_client_step"] >= 1 and "load_average_1_5_15" in data
    rows = {r["leg"]: r for r in data["rows"]}
    assert list(rows) == ["inprocess-1", "inprocess-2", "ray", "floor"]
    for leg in ("inprocess-1", "inprocess-2", "floor"):
        r = rows[leg]
        assert r["ok"], r
        assert r["startup_s"] > 0 and r["round_s"] > 0 and len(r["rounds_s"]) == 2
        assert r["round_s"] == statistics.median(r["rounds_s"])  # rounds 2..R
        assert r["peak_rss_mb"] > 50 and 0 < r["peak_pss_mb"] <= r["peak_rss_mb"]
        assert r["floor_ratio"] == r["round_s"] / rows["floor"]["round_s"]
    # the two workers are in the tree of inprocess-2's process (and counted in its memory)
    assert rows["inprocess-2"]["processes"] >= 3 and rows["inprocess-1"]["processes"] == 1
    assert rows["floor"]["final_accuracy"] is None and rows["floor"]["cohorts_from"] == (
        "inprocess leg")
    table = (out / "results.md").read_text()
    assert "| digits100 | inprocess-2 |" in table and "| digits100 | floor |" in table
    assert f"`{data['command']}`" in table


def test_the_floor_trains_the_cohorts_the_server_sampled(small_bench):
    _, out = small_bench
    recorded = json.loads((out / "legs" / "digits100-cohorts.json").read_text())
    assert [len(c) for c in recorded] == [3, 3, 3] and len({tuple(c) for c in recorded}) > 1
    # the floor's fallback without an in-process leg reproduces the server's sampling
    cfg = federation_config(PRESETS["digits100"][0], 3, 6, ["federation.fraction_train=0.5"])
    assert planned_cohorts(cfg) == recorded


def test_fedshield_legs_end_bit_for_bit_equal(small_bench):
    _, out = small_bench
    data = json.loads((out / "results.json").read_text())
    one, two = (r for r in data["rows"] if r["leg"] in ("inprocess-1", "inprocess-2"))
    assert one["model_sha256"] and one["model_sha256"] == two["model_sha256"]
    assert one["final_accuracy"] == two["final_accuracy"] > 0.3  # 10 classes: above chance
    assert data["accuracy_mismatch"] == {}
    assert one["speedup_vs_1"] == 1.0


def test_a_failing_leg_is_a_row_saying_why_and_the_command_exits_non_zero(small_bench):
    result, out = small_bench
    assert result.exit_code == 1, result.output
    ray = next(r for r in json.loads((out / "results.json").read_text())["rows"]
               if r["leg"] == "ray")
    assert not ray["ok"] and "no Ray head answers" in ray["error"] and "127.0.0.1:1" in ray[
        "error"]
    assert "| digits100 | ray | FAILED: RunFailed: no Ray head answers" in (
        out / "results.md").read_text()


@pytest.mark.slow
def test_the_ray_leg_runs_the_same_federation_on_flower_s_ray_engine(tmp_path):
    result = CliRunner().invoke(app, ["bench", "simulation", *SMALL, "--rounds", "2",
                                      "--legs", "ray", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (ray,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert ray["ok"] and ray["final_accuracy"] > 0.3
    assert ray["processes"] > 2  # Ray's raylet, GCS and actors are in the leg's tree
