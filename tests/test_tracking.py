"""MLflow tracking of runs and grids (deployment/tracking.py), read back through MlflowClient, and
the legible security outputs: partition ids beside node ids, attacker detection per grid cell,
the heatmap's units."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
from fedshield.deployment import tracking
from fedshield.server.report import ConsoleReporter, node_label, partition_labels
from fedshield.simulations.runner import simulate
from fedshield.simulations.sweeps import plot_heatmap, robustness_matrix, sweep_row, write_table
from rich.console import Console

from fedshield.run_records import (
    AttackReport,
    MetricsLine,
    RobustnessSummary,
    RunSummary,
    read_metrics,
    read_summary,
)

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # after the skip: a base install has no MLflow


def _uri(path) -> str:
    return f"sqlite:///{path / 'mlflow.db'}"


class _Notes(logging.Handler):
    """Collects the warnings of Flower's logger (it does not propagate to pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def notes():
    handler = _Notes()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    tracking._warned.clear()  # "once per process": each test starts with nothing noted
    yield handler.messages
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A 3-round digits run tracked in its own store (DP off, no hand-off)."""
    from tests.config_support import neutral_config

    tmp = tmp_path_factory.mktemp("tracked")
    cfg = neutral_config({"name": "tracked", "output_dir": str(tmp / "runs"),
                          "task": {"name": "digits"},
                          "federation": {"num_clients": 3, "rounds": 3},
                          "train": {"lr": 0.1, "batch_size": 16},
                          "privacy": {"ledger_dir": str(tmp / "ledgers")},
                          "deployment": {"handoff": False},
                          "tracking": {"enabled": True, "uri": _uri(tmp)}})
    summary = simulate(cfg)
    return cfg, summary, MlflowClient(tracking_uri=_uri(tmp))


def test_a_run_has_a_metric_history_per_round_params_and_artifacts(tracked):
    cfg, summary, client = tracked
    run_id = summary.post_run["tracking"]["run_id"]
    assert read_summary(summary.run_dir).post_run["tracking"]["run_id"] == run_id  # on disk too
    lines = read_metrics(summary.run_dir)
    history = client.get_metric_history(run_id, "accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx([m.accuracy for m in lines])
    # each point at the time its round was recorded (ms), not when the run was logged
    assert [m.timestamp for m in history] == [int(m.timestamp * 1000) for m in lines]
    for key in ("loss", "accepted", "rejected", "quarantined", "seconds"):
        assert len(client.get_metric_history(run_id, key)) == 3, key
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["federation.rounds"] == "3"
    assert run.data.params["task.name"] == "digits"
    assert run.data.params == tracking.config_params(cfg)  # the whole resolved config
    assert run.data.tags["epsilon.unit"] == "no DP"
    assert run.data.tags["mlflow.runName"] == "tracked"
    assert run.data.metrics["final_accuracy"] == pytest.approx(summary.final_accuracy)
    logged = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "metrics.jsonl", "config.toml", "accuracy.png"} <= logged


def test_every_line_and_the_summary_map_node_ids_to_partition_ids(tracked):
    _, summary, _ = tracked
    for line in read_metrics(summary.run_dir):
        # every sampled node is named by the line (in its counts): all 3 map to their partition
        assert sorted(line.node_partitions.values()) == [0, 1, 2]
        assert all(int(n) > 2 for n in line.node_partitions)  # 63-bit node ids, not partitions
    assert read_summary(summary.run_dir).node_partitions == line.node_partitions


def test_a_param_longer_than_the_limit_is_cut_with_a_marker():
    long = "x" * 600
    cut = tracking.truncate(long)
    assert len(cut) == tracking.PARAM_LIMIT and cut.endswith(tracking.TRUNCATED)
    assert cut.startswith("x" * 100)
    assert tracking.truncate("short") == "short"


def test_a_store_failure_warns_once_and_never_raises(tracked, tmp_path, notes):
    cfg, summary, _ = tracked
    bad = tmp_path / "not-a-db.db"
    bad.write_text("this is not an sqlite database\n" * 50)
    broken = replace(cfg, tracking=replace(cfg.tracking, uri=f"sqlite:///{bad}"))
    first = tracking.track_run(summary.run_dir, broken)
    second = tracking.track_run(summary.run_dir, broken)
    assert "error" in first and "error" in second
    failures = [m for m in notes if "MLflow tracking" in m]
    assert len(failures) == 1, notes
    assert "tracking.enabled = false" in failures[0] and str(summary.run_dir) in failures[0]


def test_without_mlflow_a_run_notes_it_once(tracked, monkeypatch, notes):
    cfg, summary, _ = tracked
    monkeypatch.setattr(tracking, "mlflow_installed", lambda: False)
    assert tracking.track_run(summary.run_dir, cfg) == {"skipped": tracking.NO_MLFLOW}
    tracking.track_run(summary.run_dir, cfg)
    assert sum("not installed" in m for m in notes) == 1
    off = replace(cfg, tracking=replace(cfg.tracking, enabled=False))
    assert tracking.track_run(summary.run_dir, off) == {}  # off: nothing, not even a note


def test_a_grid_is_one_parent_run_with_its_cells_as_children(small_cfg, tmp_path):
    uri = _uri(tmp_path)
    base = small_cfg(federation={"rounds": 2, "num_clients": 5},
                     reputation={"enabled": True, "patience": 1},
                     tracking={"enabled": True, "uri": uri})
    result = robustness_matrix(base, ["fedavg"], ["none", "sign_flip"], [0.4], ["iid"],
                               tmp_path / "rob")
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("fedshield").experiment_id])
    parents = [r for r in runs if r.data.tags.get("fedshield.grid") == "robustness"]
    assert len(parents) == 1
    parent = parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == 2 and len(runs) == 3
    assert {r.data.tags["fedshield.attack"] for r in children} == {"none", "sign_flip"}
    attacked = next(r for r in children if r.data.tags["fedshield.attack"] == "sign_flip")
    row = next(r for r in result["rows"] if r["attack"] == "sign_flip")
    # the attack report (written after the run) reached the child run too
    assert attacked.data.metrics["true_quarantine_rate"] == pytest.approx(
        row["true_quarantine_rate"])
    assert {"robustness.csv", "robustness.md", "robustness_heatmap.png"} <= {
        a.path for a in client.list_artifacts(parent)}
    # the table: one column per fact (no config-name duplicates), attacker detection per cell
    rows = json.loads((tmp_path / "rob" / "robustness.json").read_text())
    assert not any(k.startswith(("aggregation.", "attack.", "partition.")) for r in rows for k in r)
    clean = next(r for r in rows if r["attack"] == "none")
    assert clean["true_quarantine_rate"] is None and 0 <= clean["false_quarantine_rate"] <= 1
    assert 0 <= row["true_quarantine_rate"] <= 1 and 0 <= row["false_quarantine_rate"] <= 1
    table = (tmp_path / "rob" / "robustness.md").read_text()
    assert "true_quarantine_rate" in table and "epsilon_max" not in table  # empty: left out


def test_the_registered_version_links_to_the_tracked_run(small_cfg, tmp_path):
    uri = _uri(tmp_path)
    cfg = small_cfg(federation={"rounds": 2, "num_clients": 3},
                    deployment={"handoff": True, "registry_uri": uri, "model_name": "trk",
                                "quantize": False, "explain_examples": 4},
                    tracking={"enabled": True})  # uri "": the registry's store
    summary = simulate(cfg)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("trk", summary.handoff.version)
    assert version.run_id == summary.post_run["tracking"]["run_id"]
    assert len(client.get_metric_history(version.run_id, "accuracy")) == 2
    run = client.get_run(version.run_id)
    assert run.data.tags["fedshield.registered_model"] == f"trk/{summary.handoff.version}"
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "export")}
    assert "export/model_card.md" in artifacts


# --- legible security outputs (no run needed) -----------------------------------------------------
def test_nodes_are_named_with_their_partition():
    assert node_label(8812, {8812: 3}) == "node 8812 (partition 3)"
    assert node_label(8812, {}) == "node 8812"
    assert partition_labels([3, 5], {"8812": 3, "5": 5}) == "3 (node 8812), 5"


def test_the_console_shows_quarantined_partitions_with_their_node_ids():
    console = Console(record=True, width=200)
    reporter = ConsoleReporter(console)
    reporter.round(MetricsLine(round=2, accuracy=0.5, sampled=4, accepted=3,
                               newly_quarantined=(3,), quarantined=(3,),
                               node_partitions={"8812": 3, "77": 1}), 5)
    assert "quarantined partition 3 (node 8812)" in console.export_text()
    reporter.attack(AttackReport(byzantine_ids=(3, 4), quarantined=(1, 3), detection_rate=0.5,
                                 false_quarantine_rate=1 / 3), {"8812": 3, "77": 1, "99": 4})
    text = console.export_text()
    assert "3 (node 8812), 4 (node 99)" in text  # the attackers
    assert "3 (node 8812) (50% of the attackers)" in text
    assert "1 (node 77) (33% of the honest clients)" in text


def test_a_clean_cell_counts_every_quarantined_client_as_a_false_quarantine():
    summary = RunSummary(status="completed", num_clients=4,
                         robustness=RobustnessSummary(quarantined=(2,)),
                         node_partitions={"8812": 2})
    row = sweep_row({}, summary)
    assert row["true_quarantine_rate"] is None and row["false_quarantine_rate"] == 0.25
    assert row["quarantined_ids"] == "2 (node 8812)"
    attacked = RunSummary(status="completed", num_clients=4, attack_report=AttackReport(
        byzantine_ids=(0,), quarantined=(0,), detection_rate=1.0, false_quarantine_rate=0.0))
    assert sweep_row({}, attacked)["true_quarantine_rate"] == 1.0


def test_the_markdown_table_leaves_out_empty_columns(tmp_path):
    write_table([{"a": 1, "empty": None, "run_dir": "x"}, {"a": 2, "empty": None}], tmp_path, "t")
    header = (tmp_path / "t.md").read_text().splitlines()[0]
    assert header == "| a |"
    assert "empty" in (tmp_path / "t.csv").read_text()  # scripts still get every column


def test_heatmap_cells_and_colour_bar_are_in_the_same_unit(tmp_path):
    rows = [{"rule": "fedavg", "partition": "iid", "attack": "none", "byzantine_fraction": 0.0,
             "final_accuracy": 0.9123},
            {"rule": "fedavg", "partition": "iid", "attack": "alie", "byzantine_fraction": 0.2,
             "final_accuracy": 0.25},
            {"rule": "median", "partition": "iid", "attack": "alie", "byzantine_fraction": 0.2,
             "final_accuracy": None}]  # a failed cell: blank, not a crash
    drawn = plot_heatmap(rows, tmp_path / "h.png")
    assert drawn["clim"] == (0.0, 100.0) and "%" in drawn["bar_label"]
    assert drawn["cells"] == ["91.2", "25.0"]
    assert (tmp_path / "h.png").stat().st_size > 0


def test_post_run_hooks_run_report_then_tracking_whatever_the_registration_order(
        monkeypatch, tmp_path, notes):
    from fedshield.server import hooks

    monkeypatch.setattr(hooks, "_HOOKS", {})
    monkeypatch.setattr(hooks, "_NOTED", set())
    ran: list[str] = []
    hooks.register_post_run(hooks.TRACKING, lambda d, c: ran.append("tracking") or {"id": 1})
    hooks.register_post_run("extra", lambda d, c: ran.append("extra") or {})
    hooks.register_post_run(hooks.REPORT, lambda d, c: ran.append("report") or {})
    hooks.register_post_run(hooks.HANDOFF, lambda d, c: ran.append("handoff") or {})
    hooks.mark_unavailable("absent", "not installed here")
    out = hooks.run_after_handoff(tmp_path, None)
    assert ran == ["report", "tracking", "extra"]  # the hand-off runs before, on its own
    assert out["tracking"] == {"id": 1} and out["absent"] == {"skipped": "not installed here"}
    hooks.run_after_handoff(tmp_path, None)
    assert sum("not installed here" in m for m in notes) == 1  # noted once per process
