"""The reply boundary (fedshield/records.py): each hostile reply of issue 19 becomes a coded
rejection and the round goes on; bounds that hold for any n; identity; min_clients; failed runs.

Every reply crosses Flower's protobuf serialisation (tests/reply_support.py) before the server
sees it, and goes through the real strategy (configure_train -> replies -> aggregate_train).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from fedshield.server.aggregation import AggregationResult
from fedshield.server.recording import metrics_line
from fedshield.server.screening import capped_weights, default_norm_bound
from fedshield.server.strategy import ShieldStrategy
from fedshield.tasks import task_for
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from fedshield.records import (
    RELEASED_ROUNDS,
    EvalReport,
    Refusal,
    Rejected,
    TrainReport,
    decode_eval_reply,
    decode_train_reply,
    encode_eval_report,
    encode_refusal,
    encode_train_report,
)
from tests.reply_support import (
    Federation,
    digits_cfg,
    honest,
    honest_delta,
    honest_metrics,
    run_round,
    wire,
)

HOSTILE = 0  # the partition whose replies are hostile


def initial_arrays(cfg) -> ArrayRecord:
    torch.manual_seed(cfg.seed)
    return ArrayRecord(task_for(cfg.task).build_model().state_dict())


def npy(descr: str, shape: tuple, fortran: bool = False, payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran,
                                               "shape": shape})
    return buf.getvalue() + payload


def raw(data: bytes, stype: str = "numpy.ndarray") -> Array:
    return Array(dtype="float32", shape=(1,), stype=stype, data=data)


def with_array(name_index: int, make):
    """A hostile reply: honest, except one array of the record is ``make(global array)``."""
    def behaviour(g, pid, rnd):
        content = honest(g, pid, rnd)
        name = list(g)[name_index]
        arrays = dict(content["arrays"].items())
        arrays[name] = make(g[name])
        content["arrays"] = ArrayRecord(arrays)
        return content
    return behaviour


def with_metrics(record=None, drop=(), **values):
    """A hostile reply: honest arrays; metrics replaced by ``record`` or edited."""
    def behaviour(g, pid, rnd):
        content = honest(g, pid, rnd)
        if record is not None:
            content["metrics"] = record
        else:
            m = {k: v for k, v in honest_metrics(pid).items() if k not in drop}
            m.update({k.replace("_", "-"): v for k, v in values.items()})
            content["metrics"] = MetricRecord(m)
        return content
    return behaviour


def with_content(make):
    return lambda g, pid, rnd: make(g, pid, rnd)


def f32_bytes(a: np.ndarray) -> bytes:
    return a.astype(np.float32).tobytes()


CASES = {
    # undecodable or truncated .npy bytes, an |O descr, a header claiming 10^12 floats
    "npy-truncated": (with_array(0, lambda a: raw(Array(a).data[:-7])), "malformed:arrays"),
    "npy-garbage": (with_array(0, lambda a: raw(b"\x00garbage" * 9)), "malformed:arrays"),
    "npy-bad-header": (with_array(0, lambda a: raw(b"\x93NUMPY\x01\x00\x10\x00{'descr': [1, \n")),
                       "malformed:arrays"),
    "npy-object-descr": (with_array(0, lambda a: raw(npy("|O", a.shape, payload=b"\0" * 8))),
                         "dtype"),
    "npy-1e12-floats": (with_array(0, lambda a: raw(npy("<f4", (10**12,)))), "shape-mismatch"),
    "npy-trailing-bytes": (with_array(1, lambda a: raw(Array(a).data + b"\0" * 4)),
                           "malformed:arrays"),
    "npy-not-numpy-stype": (with_array(1, lambda a: raw(Array(a).data, stype="torch.Tensor")),
                            "malformed:arrays"),
    "npy-complex": (with_array(1, lambda a: Array(a.astype(np.complex64))), "dtype"),
    "npy-strings": (with_array(1, lambda a: Array(a.astype("U8"))), "dtype"),
    "npy-wrong-shape": (with_array(1, lambda a: Array(a[:-1])), "shape-mismatch"),
    "array-missing": (with_content(lambda g, p, r: RecordDict({
        "arrays": ArrayRecord({k: v for k, v in list(honest(g, p, r)["arrays"].items())[1:]}),
        "metrics": MetricRecord(honest_metrics(p))})), "missing-array"),
    "array-extra": (with_content(lambda g, p, r: RecordDict({
        "arrays": ArrayRecord({**dict(honest(g, p, r)["arrays"].items()),
                               "intruder": Array(np.zeros(3, np.float32))}),
        "metrics": MetricRecord(honest_metrics(p))})), "extra-array"),
    # arrays sent as the wrong record type
    "arrays-as-metrics": (with_content(lambda g, p, r: RecordDict({
        "arrays": MetricRecord({"w": [1.0, 2.0]}), "metrics": MetricRecord(honest_metrics(p))})),
        "malformed:arrays"),
    "arrays-as-config": (with_content(lambda g, p, r: RecordDict({
        "arrays": ConfigRecord({"w": b"\x93NUMPY"}), "metrics": MetricRecord(honest_metrics(p))})),
        "malformed:arrays"),
    "metrics-as-config": (with_metrics(record=ConfigRecord({"num-examples": "12"})),
                          "malformed:metrics"),
    "metrics-missing": (with_content(lambda g, p, r: RecordDict(
        {"arrays": honest(g, p, r)["arrays"]})), "malformed:metrics"),
    "empty-reply": (with_content(lambda g, p, r: RecordDict()), "malformed:reply"),
    "error-reply": (with_content(lambda g, p, r: Error(code=1, reason="ValueError: boom")),
                    "client-error"),
    # non-finite values, also once a wider dtype is cast to float32
    "nan-weights": (with_array(0, lambda a: Array(np.full_like(a, np.nan))), "non-finite"),
    "inf-weights": (with_array(1, lambda a: Array(np.full_like(a, np.inf))), "non-finite"),
    "float64-1e39": (with_array(0, lambda a: Array(np.full(a.shape, 1e39))), "non-finite"),
    # noise-multiplier without sample-rate / steps / clip-norm / delta, or steps NaN
    "dp-event-incomplete": (with_metrics(noise_multiplier=1.1), "malformed:dp-event"),
    "dp-steps-nan": (with_metrics(noise_multiplier=1.1, sample_rate=0.1, steps=float("nan"),
                                  clip_norm=1.0, delta=1e-5), "non-finite"),
    "dp-sample-rate-zero": (with_metrics(noise_multiplier=1.1, sample_rate=0.0, steps=3,
                                         clip_norm=1.0, delta=1e-5), "out-of-range:sample-rate"),
    # num-examples NaN, inf, negative, non-integer, a list or a string
    "num-examples-nan": (with_metrics(num_examples=float("nan")), "non-finite"),
    "num-examples-inf": (with_metrics(num_examples=float("inf")), "non-finite"),
    "num-examples-negative": (with_metrics(num_examples=-5), "out-of-range:num-examples"),
    "num-examples-zero": (with_metrics(num_examples=0), "out-of-range:num-examples"),
    "num-examples-fraction": (with_metrics(num_examples=2.5), "malformed:num-examples"),
    "num-examples-list": (with_metrics(num_examples=[10, 20]), "malformed:num-examples"),
    "num-examples-string": (with_metrics(record=ConfigRecord({"num-examples": "100"})),
                            "malformed:metrics"),
    # partition-id NaN or a string
    "partition-id-nan": (with_metrics(partition_id=float("nan")), "non-finite"),
    "partition-id-list": (with_metrics(partition_id=[1.0]), "malformed:partition-id"),
    "partition-id-negative": (with_metrics(partition_id=-1), "out-of-range:partition-id"),
    "partition-id-string": (with_metrics(record=ConfigRecord({"partition-id": "3"})),
                            "malformed:metrics"),
    # train-loss / epsilon as a list
    "train-loss-list": (with_metrics(train_loss=[0.1, 0.2]), "malformed:train-loss"),
    "epsilon-list": (with_metrics(epsilon=[0.1]), "malformed:epsilon"),
    "epsilon-nan": (with_metrics(epsilon=float("nan")), "non-finite"),
    "epsilon-negative": (with_metrics(epsilon=-1.0), "out-of-range:epsilon"),
    # a refusal without code / reason, or of the wrong type
    "refusal-without-code": (with_content(lambda g, p, r: RecordDict({
        "refusal": ConfigRecord({"reason": "no"})})), "malformed:refusal"),
    "refusal-without-reason": (with_content(lambda g, p, r: RecordDict({
        "refusal": ConfigRecord({"code": "budget-exhausted"})})), "malformed:refusal"),
    "refusal-code-list": (with_content(lambda g, p, r: RecordDict({
        "refusal": ConfigRecord({"code": ["a"], "reason": "x"})})), "malformed:refusal"),
    "refusal-as-metrics": (with_content(lambda g, p, r: RecordDict({
        "refusal": MetricRecord({"code": 1.0})})), "malformed:refusal"),
    # a claim of another client's identity
    "identity-theft": (with_metrics(partition_id=3, epsilon=0.01), "identity"),
}


@pytest.fixture(scope="module")
def six_clients(tmp_path_factory):
    cfg = digits_cfg(tmp_path_factory.mktemp("six"), "fedavg", 6)
    return cfg, initial_arrays(cfg)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_hostile_reply_is_a_coded_rejection_and_the_round_goes_on(case, six_clients):
    cfg, arrays = six_clients
    behaviour, code = CASES[case]
    fed = Federation(cfg, {HOSTILE: behaviour})
    strategy = ShieldStrategy(cfg)
    new, _ = run_round(strategy, fed, arrays)
    node = fed.partition_node[HOSTILE]
    assert new is not None, strategy.round.skipped
    assert sorted(strategy.round.accepted) == sorted(n for n in fed.partition_node.values()
                                                     if n != node)
    assert strategy.round.rejected[node].startswith(code + ": ")
    assert len(strategy.round.rejected[node]) > len(code) + 5  # says what was wrong
    line = metrics_line(1, {"state": strategy.round, "server_eval": {}, "client_eval": {},
                            "train": {}, "seconds": 0.0}, strategy)
    assert line.rejected_codes == {code: 1} and line.status == "aggregated"
    assert all(np.isfinite(v).all() for v in new.to_numpy_ndarrays())
    # The thief's epsilon never overwrites partition 3's in the metrics line.
    assert line.epsilon["3"] == pytest.approx(honest_metrics(3)["epsilon"])


def test_a_fortran_order_array_is_read_as_numpy_writes_it(six_clients):
    cfg, arrays = six_clients
    reference = {k: v.numpy() for k, v in arrays.items()}
    name = next(iter(reference))
    fortran = np.asfortranarray(reference[name] + 1.0)
    content = honest(reference, 1, 1)
    content["arrays"] = ArrayRecord({**dict(content["arrays"].items()), name: Array(fortran)})
    report = decode_train_reply(wire(reply_message(content)), reference)
    assert isinstance(report, TrainReport)
    assert np.array_equal(report.arrays[name], fortran)
    assert not report.arrays[name].flags.writeable  # a view on the message's bytes


def reply_message(content):
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    sent = Message(RecordDict({}), dst_node_id=7, message_type="train")
    return Message(content, reply_to=sent)


def test_records_round_trip_through_the_wire_and_optional_fields_stay_optional():
    ref = {"w": np.zeros((2, 3), np.float32)}
    full = TrainReport.from_metrics({"w": np.ones((2, 3), np.float32)},
                                    {"num-examples": 5, "partition-id": 2, "epsilon": 1.5,
                                     "noise-multiplier": 1.1, "sample-rate": 0.1, "steps": 4.0,
                                     "clip-norm": 1.0, "delta": 1e-5, "train-loss": 0.3,
                                     "client-seconds": 0.2, "class-0": 3.0})
    back = decode_train_reply(wire(reply_message(encode_train_report(full))), ref)
    assert isinstance(back, TrainReport)
    assert (back.num_examples, back.partition_id, back.epsilon, back.train_loss) == (5, 2, 1.5, 0.3)
    assert back.dp == full.dp and back.dp.steps == 4 and dict(back.extra) == {"class-0": 3.0}
    # Withheld under DP: loss, exact count, data-quality counts; a noised histogram added.
    bare = TrainReport({"w": np.ones((2, 3), np.float32)},
                       histogram={"counts": np.array([1.5, -0.2, 3.0])})
    back = decode_train_reply(wire(reply_message(encode_train_report(bare))), ref)
    assert isinstance(back, TrainReport) and back.num_examples is None and back.train_loss is None
    assert np.array_equal(back.histogram["counts"], [1.5, -0.2, 3.0])
    refusal = decode_train_reply(wire(reply_message(encode_refusal(Refusal("invalid-data", "NaN",
                                                                           4)))), ref)
    assert refusal == Refusal("invalid-data", "NaN", 4)
    ev = decode_eval_reply(wire(reply_message(encode_eval_report(EvalReport(7, 0.5, 1.2)))))
    assert ev == EvalReport(7, 0.5, 1.2)
    bad = decode_eval_reply(wire(reply_message(RecordDict({"metrics": MetricRecord(
        {"accuracy": 7.0, "num-examples": 3})}))))
    assert isinstance(bad, Rejected) and bad.code == "out-of-range:accuracy"


def test_unknown_metrics_pass_through_only_as_finite_scalars():
    ref = {"w": np.zeros(3, np.float32)}
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, np.float32))}),
                          "metrics": MetricRecord({"num-examples": 3, "ok": 2, "nan": float("nan"),
                                                   "list": [1.0, 2.0], "steps": 7})})
    report = decode_train_reply(wire(reply_message(content)), ref)
    assert isinstance(report, TrainReport) and dict(report.extra) == {"ok": 2.0, "steps": 7.0}


# --- bounds that hold for any n ---------------------------------------------------------------
@pytest.mark.parametrize("factor", [1e4, 1e20, 3e38])
def test_a_scaled_update_is_refused_in_a_two_client_round(factor, tmp_path):
    """The norm-ratio check needs 3 updates; the absolute default bound holds at n = 2 (an
    honest delta here is 0.69, the bound about 570)."""
    cfg = digits_cfg(tmp_path, "fedavg", 2)
    arrays = initial_arrays(cfg)

    def scaled(g, pid, rnd):
        delta = honest_delta(g, pid, rnd)
        up = {k: (g[k].astype(np.float64) + factor * delta[k]).astype(np.float32) for k in g}
        return encode_train_report(TrainReport.from_metrics(up, honest_metrics(pid)))

    fed = Federation(cfg, {HOSTILE: scaled})
    strategy = ShieldStrategy(cfg)
    new, _ = run_round(strategy, fed, arrays)
    reason = strategy.round.rejected[fed.partition_node[HOSTILE]]
    assert reason.startswith(("norm_cap: ", "non-finite: ")), reason
    assert new is not None and strategy.round.accepted == [fed.partition_node[1]]


def test_honest_updates_sit_well_inside_the_default_bound(tmp_path):
    """The bound is computed as documented (server/screening.py). Measured on real training
    (scratch runs, digits with DP-SGD at lr 0.5): the largest honest update was 3.4x the model
    scale, 0.034x the bound."""
    cfg = digits_cfg(tmp_path)
    reference = {k: v.numpy() for k, v in initial_arrays(cfg).items()}
    d = sum(v.size for v in reference.values())
    norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in reference.values()))
    assert default_norm_bound(reference) == pytest.approx(100 * (norm + 0.01 * np.sqrt(d)))


def test_weight_cap_keeps_any_claim_from_taking_more_than_half():
    assert capped_weights(np.array([100.0, 1e12])).tolist() == [100.0, 100.0]
    w = capped_weights(np.array([100.0, 120, 90, 110, 1e12, 105]))
    assert w[4] == 525.0  # 10 x the median (1075) is more than all the others together
    w = capped_weights(np.array([100.0] * 20 + [1e12]))
    assert w[-1] == 1000.0 and w[:-1].tolist() == [100.0] * 20  # 10 x the median claim
    assert capped_weights(np.array([5.0])).tolist() == [1.0]
    honest_w = np.array([100.0, 137, 174])
    assert capped_weights(honest_w).tolist() == honest_w.tolist()  # ordinary claims untouched


@pytest.mark.parametrize("n", [2, 6])
def test_a_huge_example_count_moves_fedavg_at_most_half_way(n, tmp_path):
    cfg = digits_cfg(tmp_path, "fedavg", n)
    arrays = initial_arrays(cfg)
    g = {k: v.numpy() for k, v in arrays.items()}
    target = {k: v + 0.05 for k, v in g.items()}  # far from the honest cloud, inside the bound

    def greedy(g_, pid, rnd):
        return encode_train_report(TrainReport.from_metrics(
            target, {**honest_metrics(pid), "num-examples": 10**12}))

    new, _ = run_round(ShieldStrategy(cfg), Federation(cfg, {HOSTILE: greedy}), arrays)
    honest_only, _ = run_round(ShieldStrategy(cfg), Federation(cfg, {HOSTILE: refuse}), arrays)
    flat = lambda rec: np.concatenate([a.ravel() for a in rec.to_numpy_ndarrays()])  # noqa: E731
    moved = flat(new) - flat(honest_only)
    towards = np.concatenate([target[k].ravel() for k in g]) - flat(honest_only)
    assert np.linalg.norm(moved) <= 0.5 * np.linalg.norm(towards) * (1 + 1e-5)


def refuse(g, pid, rnd):
    return encode_refusal(Refusal("invalid-data", "scripted refusal", pid))


def test_withheld_example_counts_weigh_uniformly(tmp_path):
    cfg = digits_cfg(tmp_path, "fedavg", 3)
    fed = Federation(cfg, {1: with_metrics(drop=("num-examples", "train-loss"))})
    strategy = ShieldStrategy(cfg)
    new, metrics = run_round(strategy, fed, initial_arrays(cfg))
    assert new is not None and set(strategy.round.weights.values()) == {1.0}
    assert "train-loss" not in metrics  # one client withheld it: no made-up mean


# --- identity ---------------------------------------------------------------------------------
def test_without_a_known_mapping_a_partition_label_is_learned_once_and_never_taken(tmp_path):
    """As on a SuperLink: a conflicting claim is dropped (its update still counts, so no node
    can lock another out by claiming its label first), and never relabels anyone."""
    cfg = digits_cfg(tmp_path, "fedavg", 3)
    fed = Federation(cfg)
    del fed.grid.node_to_partition  # as on a SuperLink: the server only has the claims
    strategy = ShieldStrategy(cfg)
    arrays = initial_arrays(cfg)
    run_round(strategy, fed, arrays, 1)
    assert strategy.node_partition == {n: p for p, n in fed.partition_node.items()}
    fed.behaviour[0] = with_metrics(partition_id=2)   # steal another's label
    fed.behaviour[1] = with_metrics(partition_id=7)   # change its own
    run_round(strategy, fed, arrays, 2)
    ignored = strategy.round.ignored_claims
    assert ignored[fed.partition_node[0]].startswith("identity: ")
    assert ignored[fed.partition_node[1]].startswith("identity: ")
    assert sorted(strategy.round.accepted) == sorted(fed.partition_node.values())
    assert strategy.node_partition == {n: p for p, n in fed.partition_node.items()}
    line = metrics_line(2, {"state": strategy.round, "server_eval": {}, "client_eval": {},
                            "train": {}, "seconds": 0.0}, strategy)
    assert line.epsilon["2"] == pytest.approx(honest_metrics(2)["epsilon"])
    assert set(line.ignored_claims) == {"0", "1"}


# --- min_clients means accepted updates; finite global weights --------------------------------
def test_nine_of_ten_nan_with_min_clients_five_fails_the_round(tmp_path):
    cfg = digits_cfg(tmp_path, "fedavg", 10, federation={"min_clients": 5})
    nan = with_array(0, lambda a: Array(np.full_like(a, np.nan)))
    fed = Federation(cfg, {p: nan for p in range(1, 10)})
    strategy = ShieldStrategy(cfg)
    new, metrics = run_round(strategy, fed, initial_arrays(cfg))
    assert new is None and strategy.round.accepted == []
    assert "only 1 accepted update(s), federation.min_clients = 5" in strategy.round.skipped
    assert metrics["rejected"] == 9
    line = metrics_line(1, {"state": strategy.round, "server_eval": {}, "client_eval": {},
                            "train": {}, "seconds": 0.0}, strategy)
    assert line.status == "failed" and line.rejected_codes == {"non-finite": 9}


def test_a_non_finite_aggregate_is_never_released(tmp_path, monkeypatch):
    cfg = digits_cfg(tmp_path, "fedavg", 3, aggregation={"server_momentum": 0.5})
    strategy = ShieldStrategy(cfg)
    d = sum(v.size for v in initial_arrays(cfg).to_numpy_ndarrays())
    monkeypatch.setattr(strategy, "aggregator", lambda x, w, r: AggregationResult(
        torch.full((d,), float("inf")), torch.zeros(len(x), dtype=torch.float64), {}))
    new, _ = run_round(strategy, Federation(cfg), initial_arrays(cfg))
    assert new is None and strategy.round.skipped.startswith("non-finite aggregate")
    assert strategy.server_momentum is None  # the step was not taken


# --- a run that never trains fails loudly and registers nothing -------------------------------
def test_an_all_fail_run_exits_non_zero_and_registers_nothing(tmp_path, monkeypatch):
    import fedshield.simulations.runner as runner
    from fedshield.client.app import make_client_app
    from fedshield.client.data import load_client_data
    from fedshield.tasks import Split
    from typer.testing import CliRunner

    from fedshield.cli import app

    def nan_data(context, cfg):
        task, train, val = load_client_data(context, cfg)
        x = train.x.copy()
        x[0, 0] = np.nan
        return task, Split(x, train.y), val

    monkeypatch.setattr(runner, "make_client_app", lambda: make_client_app(nan_data))
    registry = tmp_path / "registry.db"
    config = tmp_path / "c.toml"
    config.write_text(
        f'name = "allfail"\noutput_dir = "{tmp_path / "runs"}"\n[task]\nname = "digits"\n'
        f'model = ""\n[aggregation]\nrule = "fedavg"\n'
        # workers = 1: the monkeypatched apps exist in this process only
        f'[federation]\nnum_clients = 3\nrounds = 2\nworkers = 1\n[privacy]\nenabled = false\n'
        f'ledger_dir = "{tmp_path / "ledgers"}"\n'
        f'[deployment]\nhandoff = true\nregistry_uri = "sqlite:///{registry}"\n')
    result = CliRunner().invoke(app, ["simulate", str(config)])
    assert result.exit_code == 2, result.output
    assert "every round failed" in " ".join(result.output.split())
    # The failed run is tracked (MLflow, in the registry's store) but no model is registered.
    if registry.exists():
        from mlflow import MlflowClient

        assert MlflowClient(f"sqlite:///{registry}").search_registered_models() == []
    (summary_path,) = (tmp_path / "runs").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "failed" and "refusals: 6" in summary["failure"]
    assert "handoff" not in summary


class Recording(Federation):
    """A Federation that records each train message's ``released-rounds``, per (pid, round)."""

    def __init__(self, cfg, behaviour=None) -> None:
        self.released: dict[tuple[int, int], int] = {}
        super().__init__(cfg, behaviour)

    def _app(self, pid: int):
        inner = super()._app(pid)

        def app(msg: Message, context) -> Message:
            config = msg.content["config"]
            self.released[(pid, int(config["server-round"]))] = int(config[RELEASED_ROUNDS])
            return inner(msg, context)
        return app


def test_each_train_message_says_how_many_of_its_nodes_releases_the_server_received(tmp_path):
    """Partner sites that missed a round (offline, restarted) must not be taken for sites that
    lost their ledger: the server tells each node how many of its DP releases of the run it
    received; the client's ledger must hold that many (privacy/ledger.py). Node 0 is down in
    round 1, node 1 sends no DP event, node 2 trains every round under DP; a checkpoint keeps
    the counts for a resumed run."""
    cfg = digits_cfg(tmp_path, n=3)
    dp = {"noise-multiplier": 1.0, "sample-rate": 0.1, "steps": 3.0, "clip-norm": 1.0,
          "delta": 1e-5}

    def private(g, pid, rnd):
        delta = honest_delta(g, pid, rnd)
        arrays = {k: g[k] + delta[k] for k in g}
        return encode_train_report(TrainReport.from_metrics(arrays, {**honest_metrics(pid),
                                                                    **dp}))

    def down_in_round_one(g, pid, rnd):
        return Error(code=1, reason="Node Unavailable") if rnd == 1 else private(g, pid, rnd)

    fed = Recording(cfg, {0: down_in_round_one, 1: honest, 2: private})
    strategy = ShieldStrategy(cfg)
    arrays = initial_arrays(cfg)
    for rnd in (1, 2, 3):
        new, _ = run_round(strategy, fed, arrays, rnd)
        assert new is not None, strategy.round.skipped
        arrays = new
    assert fed.released == {(0, 1): 0, (1, 1): 0, (2, 1): 0,
                            (0, 2): 0, (1, 2): 0, (2, 2): 1,
                            (0, 3): 1, (1, 3): 0, (2, 3): 2}
    resumed = ShieldStrategy(cfg)
    resumed.federation.load_state_dict(strategy.federation.state_dict())
    node = fed.partition_node[2]
    assert resumed.federation.released_rounds[node] == 3
