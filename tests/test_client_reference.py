"""Drift references built from the clients under DP (privacy/reference.py, client/reference.py,
server/reference.py, deployment/handoff.py): accounted, resent on resume, decoded strictly, on
the card with their distance from the truth."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fedshield.client.app import make_client_app
from fedshield.client.data import load_client_data
from fedshield.client.releases import REFERENCE_TAG, kept_reference, reference_release
from fedshield.deployment.handoff import drift_reference, reference_view
from fedshield.deployment.reference_stats import CLIENTS_DP, merge_histograms
from fedshield.privacy.accounting import reported_epsilon
from fedshield.privacy.ledger import Ledger
from fedshield.privacy.planner import plan
from fedshield.privacy.reference import (
    CLIENT_REFERENCE_JSON,
    TRUTH_JSON,
    ClientReference,
    normalise,
    public_edges,
    release_reference,
    total_variation,
)
from fedshield.server.app import build_server_app
from fedshield.server.outputs import RunFolder
from fedshield.server.reference import collect_reference
from fedshield.simulations.grid import InProcessGrid
from fedshield.simulations.reference_truth import pooled_truth
from fedshield.simulations.runner import simulate
from fedshield.tasks import Split, get_task
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedshield.errors import BudgetExhausted
from fedshield.records import ReferenceReport, Rejected, decode_reference_reply
from tests.config_support import neutral_config

SIGMA = 1.0  # small noise: the mechanism is under test here, not the default's cost
SHIFTED = list(range(32))  # digits' top four pixel rows (pixel_0_0 .. pixel_3_7)


def dp_config(tmp: Path, **deployment) -> object:
    return neutral_config({
        "task": {"name": "digits"}, "output_dir": str(tmp / "runs"),
        "federation": {"num_clients": 3, "rounds": 1}, "partition": {"kind": "iid"},
        "train": {"lr": 0.5, "batch_size": 32, "max_steps": 3},
        "privacy": {"enabled": True, "noise_multiplier": 1.0,
                    "reference_noise_multiplier": SIGMA, "ledger_dir": str(tmp / "ledgers")},
        "deployment": {"handoff": True, "reference_source": "clients", "quantize": False,
                       "explain_examples": 4, "registry_uri": f"sqlite:///{tmp}/registry.db",
                       **deployment}})


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """One DP run of 3 digits clients with the hand-off (the card is written)."""
    tmp = tmp_path_factory.mktemp("client-reference")
    cfg = dp_config(tmp)
    return cfg, simulate(cfg), tmp


def client_ledgers(tmp: Path, cfg) -> list[Ledger]:
    paths = sorted((tmp / "ledgers").rglob("client-*.json"))
    assert len(paths) == cfg.federation.num_clients
    return [Ledger(p, cfg.privacy.delta, cfg.privacy.accountant, root=tmp / "ledgers")
            for p in paths]


@pytest.mark.slow
def test_the_card_shows_the_clients_dp_reference_and_its_distance(dp_run):
    cfg, summary, _ = dp_run
    run = Path(summary.run_dir)
    card = json.loads((run / "export" / "model_card.json").read_text())
    assert card["drift_reference"] == CLIENTS_DP == "clients (DP)"
    distance = card["drift_reference_details"]["distance"]
    # 3 clients, noise std sqrt(3) x 1 x sqrt(65) = 14 per summed bin over ~1290 examples: the
    # noise explains a mean TV of about 0.5 x 10 x 0.8 x 14 / 1290 = 0.043; 0.15 cannot fail.
    assert 0.0 < distance["features_mean"] < 0.15 and 0.0 <= distance["labels"] < 0.15
    assert set(distance["per_feature"]) == set(get_task("digits").feature_names)
    markdown = (run / "export" / "model_card.md").read_text()
    assert "Drift reference: clients (DP)." in markdown
    assert f"mean total variation {distance['features_mean']:.3f} per feature" in markdown
    served = json.loads((run / "export" / "reference.json").read_text())
    assert served["source"] == "clients (DP)" and served["distance"] == distance


@pytest.mark.slow
def test_a_real_federation_says_the_distance_is_unknown(dp_run, tmp_path):
    cfg, summary, _ = dp_run
    run = tmp_path / "run"
    run.mkdir()
    (run / CLIENT_REFERENCE_JSON).write_text(
        (Path(summary.run_dir) / CLIENT_REFERENCE_JSON).read_text())  # no reference_truth.json
    reference = drift_reference(run, cfg, tmp_path)
    assert reference.source == "clients (DP)" and reference.distance is None
    assert reference_view(reference)["distance"] == "unknown"


@pytest.mark.slow
def test_the_release_is_in_each_clients_ledger_and_its_epsilon(dp_run):
    cfg, summary, tmp = dp_run
    for ledger in client_ledgers(tmp, cfg):
        history = ledger.history
        tagged = [e for e in history if REFERENCE_TAG in e["run_id"]]
        assert [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in tagged] \
            == [(SIGMA, 1.0, 1)]
        events = ledger.events()
        without = [ev for e, ev in zip(history, events, strict=True)
                   if REFERENCE_TAG not in e["run_id"]]
        fresh = reported_epsilon(events, cfg.privacy.delta, cfg.privacy.accountant)
        assert ledger.spent() == pytest.approx(fresh, rel=1e-9)
        assert fresh > reported_epsilon(without, cfg.privacy.delta, cfg.privacy.accountant)
    # what every client reported (and the summary states) includes the release
    spent = sorted(ledger.spent() for ledger in client_ledgers(tmp, cfg))
    assert sorted(summary.privacy.epsilon_by_client.values()) == pytest.approx(spent, rel=1e-6)


@pytest.mark.slow
def test_a_resumed_run_resends_the_kept_release_without_paying_again(dp_run):
    cfg, summary, tmp = dp_run
    run = Path(summary.run_dir)
    before = json.loads((run / CLIENT_REFERENCE_JSON).read_text())
    events = [len(ledger.history) for ledger in client_ledgers(tmp, cfg)]
    assert sorted(before["parts"]) == ["0", "1", "2"]
    simulate(replace(cfg, resume=str(run),
                     deployment=replace(cfg.deployment, handoff=False)))
    after = json.loads((run / CLIENT_REFERENCE_JSON).read_text())
    assert after["parts"] == before["parts"]  # the same noised values, not a fresh draw
    assert [len(ledger.history) for ledger in client_ledgers(tmp, cfg)] == events


def _shifted_loader(context, cfg):
    task, train, val = load_client_data(context, cfg)
    if int(context.node_config["partition-id"]) != 0:
        return task, train, val
    x = train.x.copy()
    x[:, SHIFTED] = 1.0 - x[:, SHIFTED]  # client 0's top half inverted
    return task, Split(x, train.y), val


@pytest.mark.slow
def test_one_clients_shifted_data_shows_in_the_reference_features_it_shifts(dp_run, tmp_path):
    cfg, summary, _ = dp_run
    cfg = replace(cfg, output_dir=str(tmp_path / "runs"),
                  privacy=replace(cfg.privacy, ledger_dir=str(tmp_path / "ledgers")),
                  deployment=replace(cfg.deployment, handoff=False))
    apps = {pid: make_client_app(_shifted_loader) for pid in range(3)}
    grid = InProcessGrid(apps, cfg.flat(), cfg.seed)
    run = tmp_path / "shifted"
    run.mkdir()
    build_server_app(None, str(run))(grid, Context(run_id=grid.run_id, node_id=0, node_config={},
                                                   state=RecordDict(), run_config=cfg.flat()))
    truth = pooled_truth(cfg)  # the unshifted pooled training data
    truth_features = normalise(np.asarray(truth["feature_counts"]))

    def tv(run_dir: Path) -> np.ndarray:
        record = ClientReference.from_dict(json.loads((run_dir / CLIENT_REFERENCE_JSON)
                                                      .read_text()))
        merged = merge_histograms(list(record.parts.values()), record.edges,
                                  record.feature_names, (64,))
        return total_variation(merged.probs, truth_features)

    honest, shifted = tv(Path(summary.run_dir)), tv(run)
    others = [j for j in range(64) if j not in SHIFTED]
    # A third of the data moved in the shifted features (background 0 -> 1: far bins); the
    # noise alone is ~0.04 per feature (see the card test), the same in both runs.
    assert shifted[SHIFTED].mean() > honest[SHIFTED].mean() + 0.1
    assert abs(shifted[others].mean() - honest[others].mean()) < 0.03


def test_budget_exceeded_refuses_the_release_and_keeps_nothing(tmp_path):
    cfg = dp_config(tmp_path)
    ledger = Ledger.for_client(tmp_path / "ledgers", "fed", 0, 1e-5, "prv", max_epsilon=1.0)
    task = get_task("digits")
    train = task.load()[0].subset(np.arange(100))
    edges = public_edges(task.load()[1].x, (64,), 10)
    with pytest.raises(BudgetExhausted, match="budget"):  # sigma 1 alone spends ~4.4
        reference_release(train.x.astype(np.float64), train.y, 10, edges, cfg.privacy, ledger,
                          "run-a")
    assert ledger.history == [] and kept_reference(ledger, "run-a", (64, 10), 10) is None
    ok = replace(cfg.privacy, reference_noise_multiplier=50.0)  # eps 0.07
    made, new = reference_release(train.x.astype(np.float64), train.y, 10, edges, ok, ledger,
                                  "run-a")
    again, new_again = reference_release(train.x.astype(np.float64), train.y, 10, edges, ok,
                                         ledger, "run-a")
    assert new and not new_again and len(ledger.history) == 1
    assert np.array_equal(again.feature_counts, made.feature_counts)


def _reply(content: RecordDict) -> Message:
    sent = Message(RecordDict(), dst_node_id=7, message_type="query")
    return Message(content, reply_to=sent)


def _content(features, classes, metrics) -> RecordDict:
    return RecordDict({"reference": ArrayRecord({"feature-counts": Array(features),
                                                 "class-counts": Array(classes)}),
                       "metrics": MetricRecord(metrics)})


@pytest.mark.parametrize(("features", "classes", "metrics", "code"), [
    (np.zeros((9, 10)), np.zeros(10), {"noise-multiplier": 1.0, "noise-std": 1.0},
     "shape-mismatch"),
    (np.full((64, 10), np.nan), np.zeros(10), {"noise-multiplier": 1.0, "noise-std": 1.0},
     "non-finite"),
    (np.zeros((64, 10)), np.zeros(10), {"noise-multiplier": 1.0}, "malformed:reference"),
    (np.zeros((64, 10)), np.zeros(10), {"noise-multiplier": 1.0, "noise-std": 0.0},
     "malformed:reference"),
    (np.zeros((64, 10), dtype=np.int64), np.zeros(10), {"noise-multiplier": 0.0,
                                                        "noise-std": 0.0}, "dtype"),
    (np.zeros((64, 10)), np.zeros(3), {"noise-multiplier": 0.0, "noise-std": 0.0},
     "shape-mismatch"),
])
def test_a_malformed_reference_reply_is_rejected_with_its_reason(features, classes, metrics, code,
                                                                 monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):  # a server-built message needs them
        monkeypatch.setattr(TaskIdentity, name, 1)
    decoded = decode_reference_reply(_reply(_content(features, classes, metrics)), (64, 10), 10)
    assert isinstance(decoded, Rejected) and decoded.code == code, decoded
    good = decode_reference_reply(_reply(_content(np.zeros((64, 10)), np.zeros(10),
                                                  {"noise-multiplier": 1.0, "noise-std": 8.0})),
                                  (64, 10), 10)
    assert isinstance(good, ReferenceReport) and good.noise_std == 8.0


def test_a_malformed_reply_is_left_out_and_the_others_are_merged(tmp_path):
    cfg = neutral_config({"task": {"name": "digits"}, "federation": {"num_clients": 3},
                          "partition": {"kind": "iid"},
                          "deployment": {"reference_source": "clients"}})
    liar = ClientApp()

    @liar.query()
    def lie(msg, context):
        return Message(_content(np.full((64, 10), np.inf), np.zeros(10),
                                {"noise-multiplier": 0.0, "noise-std": 0.0}), reply_to=msg)

    apps = {0: liar, 1: make_client_app(), 2: make_client_app()}
    grid = InProcessGrid(apps, cfg.flat(), cfg.seed)
    record = collect_reference(grid, cfg, RunFolder(tmp_path), grid.node_to_partition)
    assert sorted(record.parts) == ["1", "2"] and list(record.rejected) == ["0"]
    assert record.rejected["0"].startswith("non-finite")
    # Without DP the clients count exactly: the merge is their pooled data.
    truth = pooled_truth(cfg)
    exact = np.sum([p.class_counts for p in record.parts.values()], axis=0)
    assert exact.sum() < np.sum(truth["label_counts"])  # two of three clients
    assert (tmp_path / CLIENT_REFERENCE_JSON).is_file() and not (tmp_path / TRUTH_JSON).exists()


def test_the_planner_counts_the_release_like_the_client():
    common = {"rounds": 8, "local_epochs": 1, "batch_size": 256, "num_examples": 5400,
              "delta": 1e-5, "target_epsilon": 3.0, "accountants": ("prv",),
              "curve_rounds": [8], "stats_noise_multiplier": 50.0}
    without = plan(**common)
    with_reference = plan(**common, reference_noise_multiplier=20.0)
    assert with_reference.extra_events == [(50.0, 1.0, 1), (20.0, 1.0, 1)]
    # both spend the target; the release leaves less for training, so its noise is larger
    assert with_reference.accountants[0].epsilon == pytest.approx(3.0, rel=3e-3)
    assert with_reference.accountants[0].noise_multiplier > without.accountants[0].noise_multiplier


def test_the_plan_command_counts_the_reference_release_by_default():
    from typer.testing import CliRunner

    from fedshield.commands.privacy import privacy_app

    # federated evaluation's releases left out (tests/test_federated_eval.py covers them)
    args = ["plan", "--noise-multiplier", "1.0", "--rounds", "5", "--batch-size", "50",
            "--num-examples", "2000", "--accountant", "rdp", "--no-evaluate"]
    runner = CliRunner()
    default = runner.invoke(privacy_app, [*args, "--json"])
    off = runner.invoke(privacy_app, [*args, "--no-release-reference", "--json"])
    assert default.exit_code == 0 and off.exit_code == 0, default.output + off.output
    assert json.loads(default.output)["extra_events"] == [[50.0, 1.0, 1], [20.0, 1.0, 1]]
    assert json.loads(off.output)["extra_events"] == [[50.0, 1.0, 1]]
    table = runner.invoke(privacy_app, args)
    assert table.exit_code == 0 and "drift-reference release (sigma 20" in table.output


def test_exact_counts_without_noise_and_the_noise_std_under_dp():
    task = get_task("digits")
    train = task.load()[0]
    edges = public_edges(task.load()[1].x, (64,), 10)
    exact = release_reference(train.x.astype(np.float64), train.y, 10, edges, 0.0,
                              np.random.default_rng(0))
    assert not exact.private and exact.feature_counts.sum(1).tolist() == [len(train)] * 64
    noised = release_reference(train.x.astype(np.float64), train.y, 10, edges, 2.0,
                               np.random.default_rng(0))
    assert noised.private and noised.noise_std == pytest.approx(2.0 * np.sqrt(65))
    assert noised.event == (2.0, 1.0, 1)


@pytest.mark.parametrize(("section", "code"), [
    ({"privacy": {"enabled": True, "noise_multiplier": 1.0}}, "no-reference-release"),
    ({"central_dp": {"enabled": True}, "screening": {"max_norm_ratio": 0.0}},
     "outside-guarantee"),
])
def test_a_client_with_nothing_covered_to_send_refuses(tmp_path, section, code):
    # DP but never trained: no kept release, and none is made outside training's epsilon.
    # Central DP alone: exact counts would bypass the user-level guarantee.
    cfg = neutral_config({"task": {"name": "digits"}, "federation": {"num_clients": 3},
                          "partition": {"kind": "iid"}, "name": "never-trained",
                          "deployment": {"reference_source": "clients"},
                          **{k: {**v, "ledger_dir": str(tmp_path / "ledgers")}
                             if k == "privacy" else v for k, v in section.items()}})
    grid = InProcessGrid({p: make_client_app() for p in range(3)}, cfg.flat(), cfg.seed)
    record = collect_reference(grid, cfg, RunFolder(tmp_path), grid.node_to_partition)
    assert record.parts == {} and sorted(record.refused) == ["0", "1", "2"]
    assert all(why.startswith(f"{code}: ") for why in record.refused.values())


@pytest.mark.slow
def test_the_run_files_record_each_release_event_and_its_ledger_id(dp_run):
    from fedshield.run_records import read_metrics

    cfg, summary, tmp = dp_run
    first = read_metrics(summary.run_dir)[0]
    events = {k: (e.reference.noise_multiplier, e.reference.sample_rate, e.reference.steps)
              for k, e in first.dp_events.items() if e.reference is not None}
    assert events == {k: (SIGMA, 1.0, 1) for k in ("0", "1", "2")}
    collected = summary.drift_reference
    assert collected.used == ("0", "1", "2") and not collected.rejected
    ledger_ids = {e["run_id"] for ledger in client_ledgers(tmp, cfg) for e in ledger.history
                  if REFERENCE_TAG in e["run_id"]}
    assert set(collected.event_ids.values()) == ledger_ids and len(ledger_ids) == 3
