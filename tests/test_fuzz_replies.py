"""Property-based fuzzing of the reply boundary through the real round path (issue 19).

For each rule (nnm+cclip, fedavg, median) with 2 and 6 clients, hypothesis sends 170 hostile
replies (1,020 in all), one per round among honest ones, each a real Flower Message round-tripped
through Flower's protobuf serialisation. Each round goes configure_train -> replies ->
aggregate_train -> server evaluation -> metrics line -> checkpoint (Flower's Strategy.start with
server/app.py's end_of_round and server/recording.py's RunRecorder), and the global model carries
over from round to round.

Properties, for every hostile reply:
- no exception escapes the round;
- the global weights (returned and checkpointed) are finite;
- every sampled client is accepted, rejected or refused, and every rejection has a code and a
  reason (and none is the decoder's last-resort "undecodable");
- the reply moves the global update at most half way towards itself. The reference is the same
  round without that reply. FedAvg (through the weight cap) and the coordinate-wise median meet
  the bound exactly; a robust rule that picks neighbours (NNM) may also reshuffle which honest
  updates it averages, so there the bound allows the honest updates' spread as well. FedAvg gets
  the same allowance when the reply withholds its example count (uniform weights then).
"""

from __future__ import annotations

import io
import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch
from fedshield.server.app import end_of_round
from fedshield.server.checkpoint import load_checkpoint
from fedshield.server.flat import flatten
from fedshield.server.recording import RunRecorder
from fedshield.server.strategy import ShieldStrategy
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedshield.records import TrainReport, decode_train_reply
from tests.reply_support import Federation, digits_cfg, honest, honest_delta, honest_metrics

EXAMPLES_PER_CASE = int(__import__("os").environ.get("FUZZ_EXAMPLES", 170))
CASES = [(rule, n) for rule in ("nnm+cclip", "fedavg", "median") for n in (2, 6)]
HOSTILE = 0

# float32 rounding of a 4,810-value model: relative slack on the half-way bound.
REL_TOL = 1e-4

METRIC_KEYS = ["num-examples", "partition-id", "epsilon", "train-loss", "client-seconds",
               "noise-multiplier", "sample-rate", "steps", "clip-norm", "delta", "class-0"]
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(-2**63, 2**63 - 1),
                    st.sampled_from([0, 1, -1, 2**53, 10**12, 10**18, 0.5, 1e-300]))
metric_values = st.one_of(numbers, st.lists(st.floats(allow_nan=True), min_size=1, max_size=3),
                          st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=3))
config_values = st.one_of(metric_values, st.text(max_size=20), st.binary(max_size=20),
                          st.booleans())
DESCRS = ["<f4", ">f4", "<f8", "<f2", "|O", "<c8", "|b1", "<U4", "|V8", "<i8", "|u1", "<M8[s]"]


@st.composite
def npy_payload(draw, ref: np.ndarray) -> bytes:
    """Raw .npy bytes: crafted headers, truncated or padded payloads, or garbage."""
    kind = draw(st.sampled_from(["header", "truncate", "pad", "garbage"]))
    good = Array(ref.copy()).data
    if kind == "truncate":
        return good[:draw(st.integers(0, len(good) - 1))]
    if kind == "pad":
        return good + draw(st.binary(min_size=1, max_size=16))
    if kind == "garbage":
        return draw(st.binary(max_size=200))
    shape = draw(st.one_of(st.just(ref.shape), st.just((10**12,)), st.just(ref.shape[::-1]),
                           st.lists(st.integers(0, 2**31), max_size=3).map(tuple)))
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": draw(st.sampled_from(DESCRS)),
                                               "fortran_order": draw(st.booleans()),
                                               "shape": shape})
    return buf.getvalue() + draw(st.binary(max_size=64)) * draw(st.sampled_from([0, 1, 100]))


@st.composite
def hostile_arrays(draw, g: dict[str, np.ndarray], pid: int, rnd: int):
    """The arrays record of a hostile training reply (or something in its place)."""
    mode = draw(st.sampled_from(["scale", "poke", "dtype", "shape", "keys", "raw", "record",
                                 "shift", "near"]))
    names = list(g)
    delta = honest_delta(g, pid, rnd)
    arrays = {k: g[k] + delta[k] for k in names}
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "scale":  # up to float32's max and beyond (float64 1e39)
        factor = 10.0 ** draw(st.floats(-3, 40))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        with np.errstate(over="ignore"):
            arrays = {k: (g[k].astype(np.float64) + factor * delta[k]).astype(dtype) for k in names}
    elif mode == "poke":
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e39, 3.4e38, -1e30, 65504.0]))
        dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
        name = draw(st.sampled_from(names))
        with np.errstate(over="ignore", invalid="ignore"):
            a = arrays[name].astype(dtype)
            a.flat[rng.integers(0, a.size, draw(st.integers(1, 5)))] = value
        arrays[name] = a
    elif mode == "dtype":
        dtype = draw(st.sampled_from(["f2", "f8", ">f4", "i4", "i8", "?", "c8", "u1"]))
        name = draw(st.sampled_from(names))
        arrays[name] = arrays[name].astype(dtype)
    elif mode == "shape":
        name = draw(st.sampled_from(names))
        a = arrays[name]
        arrays[name] = draw(st.sampled_from([a.ravel()[:-1], a.ravel(), a[None], a.T.copy(),
                                             np.zeros(0, a.dtype)]))
    elif mode == "keys":
        if draw(st.booleans()):
            del arrays[draw(st.sampled_from(names))]
        else:
            arrays[draw(st.text(min_size=1, max_size=8))] = np.zeros(3, np.float32)
    elif mode == "raw":
        name = draw(st.sampled_from(names))
        stype = draw(st.sampled_from(["numpy.ndarray", "numpy.ndarray", "torch", ""]))
        record = {k: Array(v) for k, v in arrays.items()}
        record[name] = Array(dtype="float32", shape=(1,), stype=stype,
                             data=draw(npy_payload(g[name])))
        return ArrayRecord(record)
    elif mode == "record":
        return draw(st.sampled_from([MetricRecord({"w": [1.0]}), ConfigRecord({"w": b"x"}),
                                     MetricRecord({})]))
    elif mode == "shift":  # finite, plausible-looking, but pulling in one direction
        c = draw(st.sampled_from([-1.0, 1.0])) * 10.0 ** draw(st.floats(-4, 1))
        arrays = {k: (g[k] + c).astype(g[k].dtype) for k in names}
    else:  # near: an honest-looking update
        arrays = {k: (arrays[k] + 1e-3 * rng.standard_normal(g[k].shape)).astype(g[k].dtype)
                  for k in names}
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


@st.composite
def hostile_metrics(draw, pid: int):
    shape = draw(st.sampled_from(["edit", "edit", "edit", "config", "missing", "none-left"]))
    if shape == "missing":
        return None
    if shape == "config":
        keys = draw(st.lists(st.sampled_from(METRIC_KEYS), max_size=4, unique=True))
        return ConfigRecord({k: draw(config_values) for k in keys})
    m: dict = {} if shape == "none-left" else dict(honest_metrics(pid))
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.one_of(st.sampled_from(METRIC_KEYS), st.text(min_size=1, max_size=8)))
        if draw(st.integers(0, 3)) == 0:
            m.pop(key, None)
        else:
            m[key] = draw(metric_values)
    return MetricRecord(m)


@st.composite
def hostile_reply(draw, g: dict[str, np.ndarray], rnd: int):
    """A hostile client's answer to round ``rnd`` of global model ``g``: content or an Error."""
    kind = draw(st.sampled_from(["train"] * 8 + ["refusal", "error", "empty", "histogram"]))
    if kind == "error":
        return Error(code=draw(st.integers(0, 2**31 - 1)), reason=draw(st.text(max_size=50)))
    if kind == "empty":
        return RecordDict()
    if kind == "refusal":
        rtype = draw(st.sampled_from([ConfigRecord, MetricRecord]))
        keys = draw(st.sampled_from([("code", "reason"), ("code",), ("reason",), ()]))
        values = {k: draw(config_values) for k in keys}
        try:
            record = rtype(values)
        except (TypeError, ValueError):  # not representable in that record type
            record = ConfigRecord({})
        return RecordDict({"refusal": record})
    content = RecordDict({"arrays": draw(hostile_arrays(g, HOSTILE, rnd))})
    metrics = draw(hostile_metrics(HOSTILE))
    if metrics is not None:
        content["metrics"] = metrics
    if kind == "histogram":
        content["histogram"] = draw(st.sampled_from([
            ArrayRecord({"h": Array(np.array([1.0, np.nan]))}), MetricRecord({"h": [1.0]}),
            ArrayRecord({"h": Array(dtype="float64", shape=(1,), stype="numpy.ndarray",
                                    data=Array(np.zeros(2)).data[:-3])})]))
    return content


def flat(record: ArrayRecord, names: list[str]) -> np.ndarray:
    return flatten({k: v.numpy() for k, v in record.items()}, names).astype(np.float64)


@pytest.mark.parametrize("rule,n", CASES)
def test_hostile_replies_never_escape_nor_pull_the_model_more_than_half_way(rule, n, tmp_path):
    cfg = digits_cfg(tmp_path, rule, n)
    fed = Federation(cfg)
    run = RunRecorder(cfg, ShieldStrategy(cfg), reporter=_Quiet(), run_dir=str(tmp_path / "run"))
    arrays = ArrayRecord(run.initial_weights)
    names = list(run.initial_weights)
    hostile_node = fed.partition_node[HOSTILE]
    rounds = itertools.count(1)
    seen = {"examples": 0, "accepted": 0}
    codes: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES_PER_CASE, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one_round(data):
        nonlocal arrays
        rnd = next(rounds)
        seen["examples"] += 1
        reply = data.draw(hostile_reply({k: v.numpy() for k, v in arrays.items()}, rnd))
        fed.behaviour = {HOSTILE: lambda g, pid, r: reply}
        strategy = run.strategy = ShieldStrategy(cfg)  # fresh reputation: the hostile stays sampled
        strategy.federation.resume_after(rnd - 1)  # Flower's loop runs round rnd as its round 1
        result = strategy.start(fed.grid, arrays, num_rounds=1, train_config=ConfigRecord({}),
                                evaluate_fn=end_of_round(run, strategy))
        # Flower's Result holds no arrays when the round produced no new model.
        new_arrays = result.arrays if len(result.arrays) else arrays
        before, after = flat(arrays, names), flat(new_arrays, names)
        assert np.isfinite(after).all()
        ckpt = load_checkpoint(run.folder.path)
        assert ckpt.round == rnd and all(torch.isfinite(t).all() for t in ckpt.weights.values())
        line = json.loads((run.folder.path / "metrics.jsonl").read_text().splitlines()[-1])
        assert line["round"] == rnd and line["sampled"] == n
        assert line["accepted"] + len(line["rejected"]) + len(line["refused"]) == n
        for reason in [*line["rejected"].values(), *line["refused"].values()]:
            code, _, detail = reason.partition(": ")
            assert code and detail.strip() and code != "undecodable", reason
        codes.update(line["rejected_codes"])

        # The same round without the hostile reply: what it moved the model by.
        hostile = next(r for r in fed.replies if r.metadata.src_node_id == hostile_node)
        shadow = ShieldStrategy(cfg)
        shadow.configure_train(rnd, arrays, ConfigRecord({}), fed.grid)
        base, _ = shadow.aggregate_train(rnd, [r for r in fed.replies if r is not hostile])
        moved = after - (flat(base, names) if base is not None else before)
        if hostile_node not in strategy.round.accepted:
            assert np.allclose(moved, 0.0, atol=1e-7), "a rejected reply changed the model"
        else:
            seen["accepted"] += 1
            report = decode_train_reply(hostile, {k: v.numpy() for k, v in arrays.items()})
            assert isinstance(report, TrainReport)
            u = flatten(dict(report.arrays), names).astype(np.float64)
            anchor = flat(base, names) if base is not None else before
            slack = 0.0
            if rule == "nnm+cclip" or report.num_examples is None:
                slack = max(np.linalg.norm(flat(honest_record(arrays, p, rnd), names) - anchor)
                            for p in range(1, n))
            pull = np.linalg.norm(moved)
            assert pull <= 0.5 * np.linalg.norm(u - anchor) * (1 + REL_TOL) + slack + 1e-7, \
                f"moved {pull:.4g} towards a reply {np.linalg.norm(u - anchor):.4g} away"
        arrays = new_arrays

    one_round()
    assert seen["examples"] >= EXAMPLES_PER_CASE  # hypothesis may run a few more
    assert seen["accepted"] > 0  # some hostile replies got through screening and were bounded
    if EXAMPLES_PER_CASE >= 100:  # the generator reaches every kind of defect
        assert len(codes) >= 10, codes
    print(f"{rule} n={n}: {seen} rejections {dict(codes)}")


def honest_record(arrays: ArrayRecord, pid: int, rnd: int) -> ArrayRecord:
    return honest({k: v.numpy() for k, v in arrays.items()}, pid, rnd)["arrays"]


class _Quiet:
    def start(self, cfg, run_dir) -> None: ...
    def round(self, line, total) -> None: ...
    def end(self, summary) -> None: ...
