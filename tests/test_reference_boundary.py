"""The drift-reference reply at the server's boundary (server/reference.py, fedshield/records.py):
under client DP only this run's DP release is used (noised at the configured sigma, with its
sensitivity and ledger event id); exact counts, a weaker or missing mechanism, a duplicate, an
unsolicited reply and a false identity are rejected with their reasons; the merge sums the
noised counts and post-processes once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fedshield.deployment.reference_stats import merge_histograms
from fedshield.privacy.reference import (
    ReferenceRelease,
    event_id_problem,
    normalise,
    public_edges,
    reference_event_id,
    release_reference,
)
from fedshield.server.outputs import RunFolder
from fedshield.server.reference import check_reference, collect_reference
from fedshield.tasks import get_task
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict

from fedshield.records import (
    ReferenceReport,
    Refusal,
    Rejected,
    decode_eval_reply,
    decode_reference_reply,
    decode_train_reply,
    encode_reference_report,
    filed,
    sender_problem,
)
from tests.config_support import neutral_config
from tests.reply_support import wire

SIGMA = 2.0  # the run's privacy.reference_noise_multiplier in these tests
RUN_KEY = "run-a"
NONCE = "0123abcd"
SHAPE, CLASSES = (64, 10), 10


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):  # a server-built message needs them
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture(scope="module")
def digits():
    task = get_task("digits")
    train, test = task.load()
    return train.x[:300].astype(np.float64), train.y[:300], public_edges(test.x, (64,), 10)


def dp_release(digits, pid: int = 0, sigma: float = SIGMA, run_key: str = RUN_KEY
               ) -> ReferenceRelease:
    x, y, edges = digits
    part = slice(100 * pid, 100 * (pid + 1))
    made = release_reference(x[part], y[part], CLASSES, edges, sigma, np.random.default_rng(pid))
    return replace(made, event_id=reference_event_id(run_key, NONCE))


def report_of(release: ReferenceRelease, **changes) -> ReferenceReport:
    """What an honest client sends for ``release``, with a malicious client's ``changes``."""
    fields = {"feature_counts": release.feature_counts, "class_counts": release.class_counts,
              "noise_multiplier": release.noise_multiplier, "noise_std": release.noise_std,
              "sensitivity": release.sensitivity if release.private else None,
              "event_id": release.event_id, **changes}
    return ReferenceReport(**fields)


def check(report: ReferenceReport, private: bool = True):
    return check_reference(report, private=private, sigma=SIGMA if private else 0.0,
                           run_key=RUN_KEY)


def test_the_honest_dp_release_is_used_with_its_ledger_event(digits):
    release = dp_release(digits)
    used = check(report_of(release))
    assert isinstance(used, ReferenceRelease), used
    assert used.event_id == f"{RUN_KEY}/drift-reference-release/{NONCE}"
    assert used.to_dict()["event_id"] == used.event_id  # client_reference.json records it
    assert np.array_equal(used.feature_counts, release.feature_counts)


@pytest.mark.parametrize(("changes", "code", "detail"), [
    # the exact counts, claimed to be a DP release with every parameter right
    ("exact", "not-private", "whole numbers"),
    ({"noise_multiplier": 0.0, "noise_std": 0.0}, "not-private", "noise multiplier 0"),
    ({"event_id": None}, "not-private", "missing event-id"),
    ({"sensitivity": None}, "not-private", "missing sensitivity"),
    ({"event_id": f"{RUN_KEY}/drift-reference-release/"}, "not-private", "hex nonce"),
    ({"event_id": f"other-run/drift-reference-release/{NONCE}"}, "not-private", "hex nonce"),
    ({"event_id": f"{RUN_KEY}/class-histogram-release/{NONCE}"}, "not-private", "hex nonce"),
    ({"noise_multiplier": SIGMA / 4}, "dp-mismatch", "weaker than"),
    ({"noise_multiplier": SIGMA * 2}, "dp-mismatch", "noise multiplier 4"),
    ({"sensitivity": 1.0}, "dp-mismatch", "sensitivity 1"),
    ({"noise_std": 1.0}, "dp-mismatch", "noise std 1"),
])
def test_under_dp_a_reply_that_is_not_this_runs_release_is_rejected(digits, changes, code,
                                                                    detail):
    release = dp_release(digits)
    if changes == "exact":
        x, y, edges = digits
        exact = release_reference(x[:100], y[:100], CLASSES, edges, 0.0, None)
        changes = {"feature_counts": exact.feature_counts, "class_counts": exact.class_counts}
    why = check(report_of(release, **changes))
    assert isinstance(why, str) and why.startswith(f"{code}: ") and detail in why, why


def test_one_exact_count_among_noised_ones_is_caught(digits):
    release = dp_release(digits)
    features = release.feature_counts.copy()
    features[3, 4] = 17.0  # one bin sent exactly
    why = check(report_of(release, feature_counts=features))
    assert isinstance(why, str) and why.startswith("not-private: 1 of 650 counts"), why


def test_whole_counts_are_a_reliable_sign_of_exact_data(digits):
    # Noise is continuous: over 40 releases (26,000 noised counts, small sigma included) none
    # is a whole number, while the exact counts always are.
    x, y, edges = digits
    for seed in range(40):
        sigma = 0.05 if seed % 2 else SIGMA
        noised = release_reference(x, y, CLASSES, edges, sigma, np.random.default_rng(seed))
        for counts in (noised.feature_counts, noised.class_counts):
            assert not np.any(counts == np.round(counts))
    exact = release_reference(x, y, CLASSES, edges, 0.0, None)
    assert np.all(exact.feature_counts == np.round(exact.feature_counts))


def test_without_dp_exact_counts_are_used_and_noised_ones_are_a_mismatch(digits):
    x, y, edges = digits
    exact = release_reference(x, y, CLASSES, edges, 0.0, None)
    used = check(report_of(exact), private=False)
    assert isinstance(used, ReferenceRelease) and not used.private
    why = check(report_of(dp_release(digits)), private=False)
    assert isinstance(why, str) and why.startswith("dp-mismatch: "), why


def test_the_event_id_and_sensitivity_survive_the_wire(digits):
    release = dp_release(digits)
    sent = Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)
    reply = wire(Message(encode_reference_report(report_of(release, partition_id=4)),
                         reply_to=sent))
    decoded = decode_reference_reply(reply, SHAPE, CLASSES)
    assert isinstance(decoded, ReferenceReport), decoded
    assert (decoded.event_id, decoded.sensitivity, decoded.partition_id) \
        == (release.event_id, release.sensitivity, 4)
    assert isinstance(check(decoded), ReferenceRelease)


def test_a_malformed_event_id_record_is_rejected_at_decoding(digits):
    from flwr.app import ConfigRecord

    content = encode_reference_report(report_of(dp_release(digits)))
    content["release"] = ConfigRecord({"event-id": 12})
    sent = Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)
    decoded = decode_reference_reply(Message(content, reply_to=sent), SHAPE, CLASSES)
    assert isinstance(decoded, Rejected) and decoded.code == "malformed:release", decoded


def test_event_id_problem_names_what_is_wrong():
    assert event_id_problem(reference_event_id(RUN_KEY, NONCE), RUN_KEY) is None
    assert event_id_problem(None, RUN_KEY) == "no ledger event id"
    assert "hex nonce" in event_id_problem(reference_event_id(RUN_KEY, "XYZ12345"), RUN_KEY)


def test_sender_problem_duplicate_and_unsolicited():
    args = {"second": "a second reply", "not_asked": "not asked"}
    assert sender_problem(1, {1}, [1, 2], **args) == Rejected("duplicate", "a second reply")
    assert sender_problem(3, set(), [1, 2], **args) == Rejected("unsolicited", "not asked")
    assert sender_problem(3, set(), [], **args) is None  # the asked set is unknown
    assert sender_problem(2, {1}, [1, 2], **args) is None


class ScriptedGrid:
    """A grid whose nodes answer the query with ``answer(node, message)`` (a list of replies),
    plus ``extra`` replies nobody asked for: the server's side of collect_reference alone."""

    def __init__(self, nodes, answer, extra=()):
        self.nodes, self.answer, self.extra = list(nodes), answer, list(extra)

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        for m in messages:  # ids as a grid gives them when it sends (simulations/grid.py)
            m.metadata.__dict__["_message_id"] = f"query-{m.metadata.dst_node_id}"
        out = [wire(r) for m in messages for r in self.answer(m.metadata.dst_node_id, m)]
        return out + [wire(r) for r in self.extra]


def dp_cfg(tmp_path: Path):
    return neutral_config({"task": {"name": "digits"}, "federation": {"num_clients": 6},
                           "partition": {"kind": "iid"},
                           "privacy": {"enabled": True, "noise_multiplier": 1.0,
                                       "reference_noise_multiplier": SIGMA,
                                       "ledger_dir": str(tmp_path / "ledgers")},
                           "deployment": {"reference_source": "clients"}})


def test_collect_keeps_honest_releases_and_rejects_each_hostile_reply(digits, tmp_path):
    folder = RunFolder(tmp_path / RUN_KEY)  # creates the folder
    node_partition = {10 + p: p for p in range(6)}
    quarantined = 15  # partition 5: not asked; it answers anyway

    def reply(pid: int, msg: Message, **changes) -> Message:
        report = report_of(dp_release(digits, pid % 3), partition_id=pid, **changes)
        return Message(encode_reference_report(report), reply_to=msg)

    def answer(node: int, msg: Message) -> list[Message]:
        pid = node_partition[node]
        if pid == 1:  # exact counts dressed as a DP release
            x, y, edges = digits
            exact = release_reference(x[:100], y[:100], CLASSES, edges, 0.0, None)
            return [reply(pid, msg, feature_counts=exact.feature_counts,
                          class_counts=exact.class_counts)]
        if pid == 2:  # answers twice: neither answer is used
            return [reply(pid, msg), reply(pid, msg)]
        if pid == 3:  # claims to be partition 0
            return [reply(0, msg)]
        if pid == 4:  # a weaker mechanism than the run's
            return [reply(pid, msg, noise_multiplier=SIGMA / 2,
                          noise_std=SIGMA / 2 * np.sqrt(65))]
        return [reply(pid, msg)]

    unasked = Message(RecordDict(), dst_node_id=quarantined, message_type=MessageType.QUERY)
    unasked.metadata.__dict__["_message_id"] = "never-sent"
    grid = ScriptedGrid(node_partition, answer, extra=[reply(5, unasked)])
    record = collect_reference(grid, dp_cfg(tmp_path), folder, node_partition, {quarantined})
    assert sorted(record.parts) == ["0"]
    codes = {k: v.split(":")[0] for k, v in record.rejected.items()}
    assert codes == {"1": "not-private", "2": "duplicate", "3": "identity",
                     "4": "dp-mismatch", "5": "unsolicited"}, record.rejected
    assert record.parts["0"].event_id == reference_event_id(RUN_KEY, NONCE)


def test_the_merge_sums_noised_counts_then_clips_and_normalises_once():
    # Two clients' noised bins -5 and +8 for one feature: the summed count 3 is kept (clipping
    # each part first would give 8 and bias every sparse bin upwards).
    edges = np.array([[-np.inf, 0.0, np.inf]])
    a = ReferenceRelease(np.array([[-5.0, 10.0]]), np.array([-1.0, 4.0]), SIGMA, 1.0)
    b = ReferenceRelease(np.array([[8.0, 2.0]]), np.array([3.0, -0.5]), SIGMA, 1.0)
    merged = merge_histograms([a, b], edges, ("f",), (1,))
    assert merged.probs[0].tolist() == pytest.approx([3 / 15, 12 / 15])
    assert merged.class_priors.tolist() == pytest.approx([2 / 5.5, 3.5 / 5.5])
    assert merged.noise_std == pytest.approx(np.sqrt(2.0))
    # a feature whose summed counts are all <= 0 carries no information: uniform
    assert normalise(np.array([[-1.0, -2.0]])).tolist() == [[0.5, 0.5]]


# --- what the run's files record -----------------------------------------------------------------

def test_the_metrics_line_records_the_reference_event_in_the_round_that_holds_it():
    from types import SimpleNamespace

    from fedshield.server.federation_state import RoundState
    from fedshield.server.recording import metrics_line

    from fedshield.records import TrainReport
    from fedshield.run_records import MetricsLine

    dp_reply = {"epsilon": 1.0, "delta": 1e-5, "noise-multiplier": 1.0, "clip-norm": 1.0,
                "sample-rate": 0.1, "steps": 10.0, "partition-id": 0,
                **dp_release_metrics(new=True)}
    strategy = SimpleNamespace(node_partition={7: 0}, reputation=None,
                               user_level_epsilon=lambda rnd: None)
    record = {"server_eval": {}, "client_eval": {}, "train": {}, "seconds": 1.0,
              "state": RoundState(reports={7: TrainReport.from_metrics({}, dp_reply)})}
    text = metrics_line(1, record, strategy).to_json()
    event = MetricsLine.from_json(text).dp_events["0"].reference
    assert (event.noise_multiplier, event.sample_rate, event.steps) == (SIGMA, 1.0, 1)
    kept = {**dp_reply, **dp_release_metrics(new=False)}  # later rounds resend, pay nothing
    record["state"] = RoundState(reports={7: TrainReport.from_metrics({}, kept)})
    assert "reference" not in metrics_line(2, record, strategy).to_dict()["dp_events"]["0"]
    # a line written before the field existed still reads
    old = MetricsLine.from_json('{"round": 1, "dp_events": {"0": {"noise_multiplier": 1.0, '
                                '"sample_rate": 0.1, "steps": 10, "clip_norm": 1.0, '
                                '"delta": 1e-05}}}')
    assert old.dp_events["0"].reference is None


def dp_release_metrics(new: bool) -> dict[str, float]:
    release = ReferenceRelease(np.zeros((2, 3)), np.zeros(2), SIGMA, SIGMA * np.sqrt(3))
    return release.to_metrics(new)


def test_the_summary_records_who_was_used_at_which_event_and_who_was_not(digits, tmp_path):
    from fedshield.privacy.ledger import atomic_write_json
    from fedshield.privacy.reference import CLIENT_REFERENCE_JSON, ClientReference
    from fedshield.server.reference import read_collection

    from fedshield.run_records import RunSummary

    x, y, edges = digits
    record = ClientReference(edges, tuple(f"f{i}" for i in range(64)), CLASSES,
                             {"0": dp_release(digits)}, {"1": "no-reference-release: never"},
                             {"2": "not-private: 650 of 650 counts are whole numbers"}, SIGMA)
    folder = RunFolder(tmp_path / RUN_KEY)
    cfg = dp_cfg(tmp_path)
    assert read_collection(folder, cfg) is None  # no collection (yet)
    atomic_write_json(folder.path / CLIENT_REFERENCE_JSON, record.to_dict())
    collected = read_collection(folder, cfg)
    assert collected.used == ("0",) and collected.event_ids == {"0": release_id()}
    assert (collected.events["0"].noise_multiplier, collected.events["0"].steps) == (SIGMA, 1)
    assert collected.refused["1"].startswith("no-reference-release")
    assert collected.rejected["2"].startswith("not-private")
    summary = RunSummary(drift_reference=collected)
    assert RunSummary.from_json(summary.to_json()).drift_reference == collected
    assert RunSummary.from_json('{"privacy": {}}').drift_reference is None  # older summaries


def release_id() -> str:
    return reference_event_id(RUN_KEY, NONCE)


# --- one decoding boundary for the three kinds of reply ------------------------------------------

DECODERS = {
    "train": lambda msg: decode_train_reply(msg, {"w": np.zeros(2, np.float32)}),
    "evaluate": decode_eval_reply,
    "reference": lambda msg: decode_reference_reply(msg, SHAPE, CLASSES),
}


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_every_decoder_meets_errors_refusals_and_junk_the_same_way(kind):
    from flwr.app import ConfigRecord, Error, MetricRecord

    decode = DECODERS[kind]
    sent = Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)
    error = decode(Message(error=Error(code=1, reason="boom"), reply_to=sent))
    assert error == Rejected("client-error", "boom")
    refusal = decode(wire(Message(RecordDict({
        "refusal": ConfigRecord({"code": "budget-exhausted", "reason": "spent"}),
        "metrics": MetricRecord({"partition-id": 3})}), reply_to=sent)))
    assert str(refusal) == "budget-exhausted: spent" and refusal.partition_id == 3
    bad = decode(Message(RecordDict({"refusal": MetricRecord({"code": 1})}), reply_to=sent))
    assert isinstance(bad, Rejected) and bad.code == "malformed:refusal"
    nan = decode(Message(RecordDict({"metrics": MetricRecord({"partition-id": float("nan")}),
                                     "arrays": ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
                                     "reference": ArrayRecord()}), reply_to=sent))
    assert isinstance(nan, Rejected), nan  # never a traceback


def test_filed_sorts_refusals_and_rejections_under_their_key():
    refused, rejected = {}, {}
    assert filed(Refusal("no-data", "none", 1), "a", refused, rejected) is None
    assert filed(Rejected("non-finite", "NaN"), "b", refused, rejected) is None
    assert filed("a record", "c", refused, rejected) == "a record"
    assert (refused, rejected) == ({"a": "no-data: none"}, {"b": "non-finite: NaN"})
