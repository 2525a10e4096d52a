"""Typed records for what crosses the client -> server boundary, encoded and decoded in one place.

A client answers a training message with one of:

- a ``TrainReport``: ``"arrays"`` (ArrayRecord: the trained weights) and ``"metrics"``
  (MetricRecord: example count, partition id, privacy event, optional loss and timings, and any
  other scalar metric), plus an optional ``"histogram"`` ArrayRecord;
- a ``Refusal``: ``"refusal"`` (ConfigRecord with ``code`` and ``reason``), and optionally
  ``"metrics"`` with the partition id;
- an error (Flower's ``Error``: the ClientApp raised, or the node was unreachable).

Clients build their replies with ``encode_*``. The server never reads ``msg.content`` itself:
``decode_train_reply`` / ``decode_eval_reply`` / ``decode_reference_reply`` parse and validate
every field and return a typed record or a ``Rejected`` with a coded reason. They share one
prologue and one except-tail (``_decode``) and never raise, whatever the message holds: a hostile
client must not be able to stop the federation by sending something unparseable. Before decoding,
``sender_problem`` says whether the sender may answer at all (duplicate, unsolicited).

Arrays are decoded as read-only zero-copy views on the message's bytes, after the ``.npy`` header
has been checked against the global model (names, dtype kind, shape, exact byte count): nothing is
allocated from a size a client claims. Parsing a ``.npy`` header (numpy's reader evaluates it with
``ast``) costs more than copying a small model's arrays, and a run repeats a handful of headers, so
parsed headers are kept (keyed by their exact bytes, bounded) and encoded ones too (``to_array``:
the bytes ``np.save`` writes, header built once per dtype and shape).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Collection, Container, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

# Record names in a reply's RecordDict.
ARRAYS, METRICS, REFUSAL, HISTOGRAM = "arrays", "metrics", "refusal", "histogram"
# The drift-reference query after the last round (server/reference.py) and its reply's records.
REFERENCE_QUERY = "drift-reference"  # the query message's config "query" value
REFERENCE, FEATURE_COUNTS, CLASS_COUNTS = "reference", "feature-counts", "class-counts"
NOISE_MULTIPLIER, NOISE_STD, SENSITIVITY = "noise-multiplier", "noise-std", "sensitivity"
RELEASE, EVENT_ID = "release", "event-id"  # ConfigRecord naming the release's ledger event
# Train/evaluate config key: in how many rounds of this run the server received this node's
# DP-released update (the client checks its ledger holds at least that many; client/fit.py).
RELEASED_ROUNDS = "released-rounds"

# Metric keys with a meaning; every other key is an ``extra`` metric.
NUM_EXAMPLES, PARTITION_ID, EPSILON = "num-examples", "partition-id", "epsilon"
TRAIN_LOSS, TRAIN_SECONDS, CLIENT_SECONDS = "train-loss", "train-seconds", "client-seconds"
ACCURACY, LOSS = "accuracy", "loss"
# One DP-SGD privacy event: all five or none (an epsilon can be recomputed only from all five).
# Any of them but "steps" (which non-private training reports too) makes a reply claim an event.
DP_KEYS = {"noise-multiplier": "noise_multiplier", "sample-rate": "sample_rate",
           "steps": "steps", "clip-norm": "clip_norm", "delta": "delta"}
STEPS = "steps"

# The server aggregates in float32 (server/flat.py): wider floats must fit it.
AGGREGATION_DTYPE = np.dtype(np.float32)
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}
# Parsed .npy headers kept (distinct headers: a run has one per model array; a hostile client
# sending new ones only evicts old ones).
NPY_HEADER_CACHE = 512
NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class ReplyLimits:
    """Sizes a reply may not exceed (parsing stops before anything this large is read)."""

    max_metric_keys: int = 1024
    max_text_chars: int = 4096  # refusal code + reason
    max_npy_header_bytes: int = 4096
    max_histogram_values: int = 1_000_000
    max_partition_id: int = 2**31 - 1
    max_num_examples: int = 2**53  # exact in float64, where Flower's metrics may carry it


@dataclass(frozen=True)
class DPEvent:
    """One round of DP-SGD on a client: enough to recompute its epsilon with any accountant."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float


@dataclass(frozen=True)
class TrainReport:
    """A client's answer to a training message. ``arrays`` are read-only; every optional field is
    None when the client withheld it (e.g. under DP it may not release its loss or exact count)."""

    arrays: Mapping[str, np.ndarray]
    num_examples: int | None = None
    partition_id: int | None = None
    dp: DPEvent | None = None
    epsilon: float | None = None
    train_loss: float | None = None
    train_seconds: float | None = None
    client_seconds: float | None = None
    extra: Mapping[str, float] = field(default_factory=dict)
    histogram: Mapping[str, np.ndarray] | None = None

    @classmethod
    def from_metrics(cls, arrays: Mapping[str, np.ndarray], metrics: Mapping[str, float],
                     histogram: Mapping[str, np.ndarray] | None = None) -> TrainReport:
        """From a client's kebab-case metrics dict: known keys become fields, the rest extra."""
        m = dict(metrics)
        dp = None
        if any(k in m for k in DP_KEYS if k != STEPS):
            values = {attr: m.pop(key) for key, attr in DP_KEYS.items()}
            # steps is int()-converted here; the other four are floats as DPEvent declares
            dp = DPEvent(**{**values, "steps": int(values["steps"])})  # type: ignore[arg-type]

        def opt(key: str, kind=float):
            value = m.pop(key, None)
            return None if value is None else kind(value)

        return cls(arrays=arrays, num_examples=opt(NUM_EXAMPLES, int),
                   partition_id=opt(PARTITION_ID, int), dp=dp, epsilon=opt(EPSILON),
                   train_loss=opt(TRAIN_LOSS), train_seconds=opt(TRAIN_SECONDS),
                   client_seconds=opt(CLIENT_SECONDS),
                   extra={k: float(v) for k, v in m.items()}, histogram=histogram)


@dataclass(frozen=True)
class Refusal:
    """A client that must not train this round says why (e.g. ``budget-exhausted``)."""

    code: str
    reason: str
    partition_id: int | None = None

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


@dataclass(frozen=True)
class EvalReport:
    """A client's answer to an evaluation message (on its own held-out data)."""

    num_examples: int | None = None
    accuracy: float | None = None
    loss: float | None = None
    partition_id: int | None = None
    extra: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ReferenceReport:
    """A client's answer to the drift-reference query: its released counts (noised under DP,
    ``noise_multiplier`` > 0; exact without DP, 0) and the mechanism's parameters: the L2
    ``sensitivity`` the noise is calibrated to and the ledger ``event_id`` the release cost
    (None when not sent: an exact reply has neither)."""

    feature_counts: np.ndarray  # (features, bins), read-only
    class_counts: np.ndarray    # (num_classes,), read-only
    noise_multiplier: float
    noise_std: float
    partition_id: int | None = None
    sensitivity: float | None = None
    event_id: str | None = None


@dataclass(frozen=True)
class Rejected:
    """A reply the server could not use. ``code`` is short and stable (counted in metrics)."""

    code: str
    reason: str

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


class _Bad(Exception):
    """Internal: one field failed; becomes a Rejected (never leaves this module)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


# --- encoding (client side) -------------------------------------------------------------------
# What a Flower MetricRecord holds (its constructor's value type; dict is invariant).
_MetricValue = int | float | list[int] | list[float]


def _metrics_dict(report: TrainReport | EvalReport) -> dict[str, _MetricValue]:
    out: dict[str, _MetricValue] = {k: float(v) for k, v in report.extra.items()}
    if report.num_examples is not None:
        out[NUM_EXAMPLES] = int(report.num_examples)
    if report.partition_id is not None:
        out[PARTITION_ID] = int(report.partition_id)
    return out


def encode_train_report(report: TrainReport) -> RecordDict:
    """A client's training report as the RecordDict of its Flower reply."""
    metrics = _metrics_dict(report)
    if report.dp is not None:
        for key, attr in DP_KEYS.items():
            metrics[key] = float(getattr(report.dp, attr))
    for key, value in ((EPSILON, report.epsilon), (TRAIN_LOSS, report.train_loss),
                       (TRAIN_SECONDS, report.train_seconds),
                       (CLIENT_SECONDS, report.client_seconds)):
        if value is not None:
            metrics[key] = float(value)
    content = RecordDict({ARRAYS: ArrayRecord({k: to_array(v) for k, v in report.arrays.items()}),
                          METRICS: MetricRecord(metrics)})
    if report.histogram is not None:
        content[HISTOGRAM] = ArrayRecord({k: to_array(v) for k, v in report.histogram.items()})
    return content


def to_array(value) -> Array:
    """Flower's ``Array(np.asarray(value))``, byte for byte (what ``np.save`` writes), with the
    .npy header built once per dtype and shape instead of once per array."""
    arr = np.asarray(value)
    dtype = arr.dtype
    shape = tuple(int(s) for s in arr.shape)
    known = None
    if (arr.flags.c_contiguous and dtype.kind in "fiub" and dtype.fields is None
            and dtype.subdtype is None):
        known = _npy_header_bytes(dtype, shape)
    if known is None:  # anything unusual: Flower's own encoder
        return Array(arr)
    header, name = known
    return Array(dtype=name, shape=shape, stype="numpy.ndarray", data=header + arr.tobytes())


@functools.lru_cache(maxsize=NPY_HEADER_CACHE)
def _npy_header_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[bytes, str] | None:
    # np.save's header for a C-ordered array (format 1.0; None where np.save would need 2.0)
    # and the dtype's name (str(dtype) is slow too)
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, {
            "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
            "shape": shape})
    except ValueError:  # a header over 64 KiB (a shape with thousands of dimensions)
        return None
    return buf.getvalue(), str(dtype)


def encode_refusal(refusal: Refusal) -> RecordDict:
    """A client's refusal to train (code, reason) as the RecordDict of its reply."""
    # num-examples 0: Flower's own aggregation helpers expect the key in every metrics record.
    metrics: dict[str, _MetricValue] = {NUM_EXAMPLES: 0}
    if refusal.partition_id is not None:
        metrics[PARTITION_ID] = int(refusal.partition_id)
    return RecordDict({REFUSAL: ConfigRecord({"code": refusal.code, "reason": refusal.reason}),
                       METRICS: MetricRecord(metrics)})


def encode_eval_report(report: EvalReport) -> RecordDict:
    """A client's evaluation report as the RecordDict of its Flower reply."""
    metrics = _metrics_dict(report)
    for key, value in ((ACCURACY, report.accuracy), (LOSS, report.loss)):
        if value is not None:
            metrics[key] = float(value)
    return RecordDict({METRICS: MetricRecord(metrics)})


def encode_reference_report(report: ReferenceReport) -> RecordDict:
    """A client's drift-reference counts as the RecordDict of its reply to the query."""
    metrics: dict[str, _MetricValue] = {NOISE_MULTIPLIER: float(report.noise_multiplier),
                                        NOISE_STD: float(report.noise_std)}
    if report.partition_id is not None:
        metrics[PARTITION_ID] = int(report.partition_id)
    if report.sensitivity is not None:
        metrics[SENSITIVITY] = float(report.sensitivity)
    arrays = {FEATURE_COUNTS: Array(np.asarray(report.feature_counts, dtype=np.float64)),
              CLASS_COUNTS: Array(np.asarray(report.class_counts, dtype=np.float64))}
    content = RecordDict({REFERENCE: ArrayRecord(arrays), METRICS: MetricRecord(metrics)})
    if report.event_id is not None:
        content[RELEASE] = ConfigRecord({EVENT_ID: report.event_id})
    return content


# --- decoding (server side) -------------------------------------------------------------------
# The one decoding boundary. Every reply goes through _decode: a client error, no content or a
# refusal first (the same for every kind of reply), then the kind's own body; _guarded turns
# whatever a body raises into a Rejected, so no decoder ever raises.
T = TypeVar("T")
K = TypeVar("K")


def _guarded(body: Callable[[], T]) -> T | Rejected:
    try:
        return body()
    except _Bad as bad:
        return Rejected(bad.code, bad.reason)
    except Exception as exc:  # noqa: BLE001 — a last line of defence; tests expect none of these
        return Rejected("undecodable", f"{type(exc).__name__}: {_clip(str(exc), 200)}")


def _decode(msg: Message, limits: ReplyLimits,
            body: Callable[[RecordDict], T]) -> T | Refusal | Rejected:
    def run() -> T | Refusal | Rejected:
        if msg.has_error():
            return Rejected("client-error", _error_reason(msg))
        content = _content(msg)
        if REFUSAL in content:
            return _refusal(content, limits)
        return body(content)
    return _guarded(run)


def sender_problem(node: int, answered: Container[int], asked: Collection[int], *,
                   second: str, not_asked: str) -> Rejected | None:
    """Whether a reply from ``node`` may be decoded at all: not when ``node`` already answered
    (``duplicate``: the caller drops its first answer too) or was not among the ``asked`` nodes
    (``unsolicited``; an empty ``asked`` means the asked set is unknown). The node id is the
    grid's routing (the message the reply answers), never a field the client fills in; a
    partition-id claim is checked after decoding (server/federation_state.py)."""
    if node in answered:
        return Rejected("duplicate", second)
    if asked and node not in asked:
        return Rejected("unsolicited", not_asked)
    return None


def filed(decoded: T | Refusal | Rejected, key: K, refused: dict[K, str],
          rejected: dict[K, str]) -> T | None:
    """The decoded record, or None once a refusal or a rejection is filed under ``key`` as
    "code: reason" (the strings metrics.jsonl and client_reference.json carry)."""
    if isinstance(decoded, Refusal):
        refused[key] = str(decoded)
        return None
    if isinstance(decoded, Rejected):
        rejected[key] = str(decoded)
        return None
    return decoded


def decode_reference_reply(msg: Message, shape: tuple[int, int], num_classes: int,
                           limits: ReplyLimits = ReplyLimits()
                           ) -> ReferenceReport | Refusal | Rejected:
    """Parse and validate one reply to the drift-reference query: counts of exactly ``shape``
    and ``num_classes`` (checked in the .npy header before anything is read), finite, a noise
    multiplier and std that are both 0 (exact) or both > 0, and, when sent, the release's
    sensitivity and ledger event id. Whether they fit the run's privacy mode is the server's
    check (server/reference.py). Never raises."""
    def body(content: RecordDict) -> ReferenceReport:
        record = content[REFERENCE] if REFERENCE in content else None
        if not isinstance(record, ArrayRecord) or set(record.keys()) != {FEATURE_COUNTS,
                                                                         CLASS_COUNTS}:
            raise _Bad("malformed:reference", f"a reference reply needs the ArrayRecord "
                       f"{REFERENCE!r} with exactly {FEATURE_COUNTS!r} and {CLASS_COUNTS!r}")
        m = _metrics(content, limits, required=True)
        arrays = {}
        for name, want in ((FEATURE_COUNTS, tuple(shape)), (CLASS_COUNTS, (num_classes,))):
            arr = npy_view(record[name], name, limits, expected_shape=want)
            if arr.dtype.kind != "f":
                raise _Bad("dtype", f"{name} has dtype {arr.dtype}, expected floats")
            _check_finite(arr, name)
            arrays[name] = arr
        sigma, std = _number(m, NOISE_MULTIPLIER, lo=0.0), _number(m, NOISE_STD, lo=0.0)
        if sigma is None or std is None or (sigma > 0) != (std > 0):
            raise _Bad("malformed:reference", f"{NOISE_MULTIPLIER} and {NOISE_STD} are both "
                       f"needed, both 0 (exact counts) or both > 0; got {sigma}, {std}")
        return ReferenceReport(arrays[FEATURE_COUNTS], arrays[CLASS_COUNTS], sigma, std,
                               _partition_id(m, limits),
                               sensitivity=_number(m, SENSITIVITY, lo=0.0, lo_open=True),
                               event_id=_release_event_id(content, limits))
    return _decode(msg, limits, body)


def decode_train_reply(msg: Message, reference: Mapping[str, np.ndarray],
                       limits: ReplyLimits = ReplyLimits()) -> TrainReport | Refusal | Rejected:
    """Parse and validate one training reply against the global model's arrays. Never raises."""
    def body(content: RecordDict) -> TrainReport:
        if ARRAYS not in content:
            raise _Bad("malformed:reply", f"neither {ARRAYS!r} nor {REFUSAL!r} in the reply "
                       f"(records: {_clip(', '.join(map(repr, list(content)[:8])), 200)})")
        metrics = _metrics(content, limits, required=True)
        arrays = decode_arrays(content[ARRAYS], reference, limits)
        histogram = None
        if HISTOGRAM in content:
            histogram = _histogram(content[HISTOGRAM], limits)
        return _train_report(arrays, metrics, limits, histogram)
    return _decode(msg, limits, body)


def decode_eval_reply(msg: Message,
                      limits: ReplyLimits = ReplyLimits()) -> EvalReport | Refusal | Rejected:
    """Parse and validate one evaluation reply. Never raises."""
    def body(content: RecordDict) -> EvalReport:
        m = _metrics(content, limits, required=True)
        return EvalReport(num_examples=_num_examples(m, limits),
                          accuracy=_number(m, ACCURACY, lo=0.0, hi=1.0),
                          loss=_number(m, LOSS, lo=0.0),
                          partition_id=_partition_id(m, limits),
                          extra=_extra(m, {NUM_EXAMPLES, ACCURACY, LOSS, PARTITION_ID}))
    return _decode(msg, limits, body)


def decode_train_metrics(metrics: Mapping,
                         limits: ReplyLimits = ReplyLimits()) -> TrainReport | Rejected:
    """The metrics part of a training reply alone (SecAgg+: the update itself is masked)."""
    return _guarded(lambda: _train_report({}, _checked_mapping(metrics, limits), limits, None))


def _release_event_id(content: RecordDict, limits: ReplyLimits) -> str | None:
    """The ledger event id in the optional ConfigRecord ``release`` (None when absent)."""
    if RELEASE not in content:
        return None
    record = content[RELEASE]
    value = record.get(EVENT_ID) if isinstance(record, ConfigRecord) else None
    if not isinstance(value, str) or not value.isprintable() \
            or len(value) > limits.max_text_chars:
        raise _Bad("malformed:release", f"{RELEASE!r} must be a ConfigRecord whose {EVENT_ID!r} "
                   f"is a printable string of at most {limits.max_text_chars} chars")
    return value


def _train_report(arrays: Mapping[str, np.ndarray], m: Mapping, limits: ReplyLimits,
                  histogram: Mapping[str, np.ndarray] | None) -> TrainReport:
    known = {NUM_EXAMPLES, PARTITION_ID, EPSILON, TRAIN_LOSS, TRAIN_SECONDS, CLIENT_SECONDS,
             *DP_KEYS}
    dp = _dp_event(m)
    if dp is None and STEPS in m:  # non-private training's step count: an ordinary metric
        known.discard(STEPS)
    return TrainReport(
        arrays=MappingProxyType(dict(arrays)), num_examples=_num_examples(m, limits),
        partition_id=_partition_id(m, limits), dp=dp, epsilon=_number(m, EPSILON, lo=0.0),
        train_loss=_number(m, TRAIN_LOSS), train_seconds=_number(m, TRAIN_SECONDS, lo=0.0),
        client_seconds=_number(m, CLIENT_SECONDS, lo=0.0), extra=_extra(m, known),
        histogram=None if histogram is None else MappingProxyType(dict(histogram)))


def _content(msg: Message) -> RecordDict:
    if not msg.has_content():
        raise _Bad("malformed:reply", "the reply has neither content nor an error")
    content = msg.content
    if not isinstance(content, RecordDict):
        raise _Bad("malformed:reply", f"content is a {type(content).__name__}")
    return content


def _error_reason(msg: Message) -> str:
    error = msg.error
    reason = error.reason if isinstance(error.reason, str) else repr(error.reason)
    return _clip(reason or f"error code {error.code}", 2000)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"


def _refusal(content: RecordDict, limits: ReplyLimits) -> Refusal:
    record = content[REFUSAL]
    if not isinstance(record, ConfigRecord):
        raise _Bad("malformed:refusal", f"{REFUSAL!r} is a {type(record).__name__}, expected a "
                   "ConfigRecord with 'code' and 'reason'")
    code, reason = record.get("code"), record.get("reason")
    if not isinstance(code, str) or not isinstance(reason, str) or not code:
        raise _Bad("malformed:refusal", "a refusal needs a non-empty string 'code' and a string "
                   f"'reason'; got code {type(code).__name__}, reason {type(reason).__name__}")
    if len(code) + len(reason) > limits.max_text_chars:
        raise _Bad("malformed:refusal", f"code + reason exceed {limits.max_text_chars} chars")
    if not code.isprintable() or any(c in code for c in ": "):
        raise _Bad("malformed:refusal", f"code {code[:40]!r} is not a printable word")
    pid = None
    if METRICS in content:
        pid = _partition_id(_metrics(content, limits, required=False), limits)
    return Refusal(code, reason.replace("\n", " "), pid)


def _metrics(content: RecordDict, limits: ReplyLimits, required: bool) -> Mapping:
    if METRICS not in content:
        if required:
            raise _Bad("malformed:metrics", f"the reply has no {METRICS!r} record")
        return {}
    record = content[METRICS]
    if not isinstance(record, MetricRecord):
        raise _Bad("malformed:metrics", f"{METRICS!r} is a {type(record).__name__}, expected a "
                   "MetricRecord")
    return _checked_mapping(record, limits)


def _checked_mapping(metrics: Mapping, limits: ReplyLimits) -> Mapping:
    if not isinstance(metrics, Mapping):
        raise _Bad("malformed:metrics", f"metrics are a {type(metrics).__name__}")
    if len(metrics) > limits.max_metric_keys:
        raise _Bad("malformed:metrics", f"{len(metrics)} metric keys; at most "
                   f"{limits.max_metric_keys}")
    return dict(metrics)


def _scalar(m: Mapping, key: str) -> float | int | np.integer | np.floating | None:
    """The value under ``key`` as a real number (None if absent); lists, strings, bools are
    malformed."""
    if key not in m:
        return None
    value = m[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _Bad(f"malformed:{key}", f"{key} is a {type(value).__name__}, expected a number")
    return value


def _number(m: Mapping, key: str, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> float | None:
    value = _scalar(m, key)
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        raise _Bad("non-finite", f"{key} = {value}")
    if (lo is not None and (value < lo or (lo_open and value == lo))) or \
            (hi is not None and value > hi):
        low = "-inf" if lo is None else f"{lo:g}"
        high = "inf" if hi is None else f"{hi:g}"
        bracket = "(" if lo_open else "["
        raise _Bad(f"out-of-range:{key}", f"{key} = {value:g}, expected in {bracket}{low}, {high}]")
    return value


def _integer(m: Mapping, key: str, lo: int, hi: int) -> int | None:
    value = _scalar(m, key)
    if value is None:
        return None
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise _Bad("non-finite", f"{key} = {value}")
        if value != int(value):
            raise _Bad(f"malformed:{key}", f"{key} = {value:g} is not an integer")
    value = int(value)
    if not lo <= value <= hi:
        raise _Bad(f"out-of-range:{key}", f"{key} = {value}, expected in [{lo}, {hi}]")
    return value


def _num_examples(m: Mapping, limits: ReplyLimits) -> int | None:
    return _integer(m, NUM_EXAMPLES, 1, limits.max_num_examples)


def _partition_id(m: Mapping, limits: ReplyLimits) -> int | None:
    return _integer(m, PARTITION_ID, 0, limits.max_partition_id)


def _dp_event(m: Mapping) -> DPEvent | None:
    steps = _integer(m, STEPS, 0, 2**40)  # checked whether or not an event is claimed
    if not any(k in m for k in DP_KEYS if k != STEPS):
        return None
    missing = [k for k in DP_KEYS if k not in m]
    if missing:
        raise _Bad("malformed:dp-event", f"a privacy event needs {', '.join(DP_KEYS)}; "
                   f"{', '.join(missing)} missing")
    noise = _number(m, "noise-multiplier", lo=0.0)
    rate = _number(m, "sample-rate", lo=0.0, hi=1.0, lo_open=True)
    clip = _number(m, "clip-norm", lo=0.0, lo_open=True)
    delta = _number(m, "delta", lo=0.0, hi=1.0, lo_open=True)
    # every DP key is present (checked above) and a present key is never read back as None
    assert noise is not None and rate is not None and steps is not None
    assert clip is not None and delta is not None
    return DPEvent(noise_multiplier=noise, sample_rate=rate, steps=steps, clip_norm=clip,
                   delta=delta)


def _extra(m: Mapping, known: set[str]) -> Mapping[str, float]:
    """Unknown keys pass through only as finite real scalars; anything else is dropped."""
    out = {}
    for key, value in m.items():
        if key in known or not isinstance(key, str) or isinstance(value, bool):
            continue
        if isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(float(value)):
            out[key] = float(value)
    return MappingProxyType(out)


# --- arrays -----------------------------------------------------------------------------------
def decode_arrays(record, reference: Mapping[str, np.ndarray],
                  limits: ReplyLimits = ReplyLimits()) -> dict[str, np.ndarray]:
    """Read-only views of ``record``'s arrays, each checked against ``reference``'s array of the
    same name: dtype kind, shape and exact byte count from the .npy header before anything is
    read, then finite values that also fit the aggregation dtype. Raises _Bad."""
    if not isinstance(record, ArrayRecord):
        raise _Bad("malformed:arrays", f"{ARRAYS!r} is a {type(record).__name__}, expected an "
                   "ArrayRecord")
    names = list(record.keys())
    missing = [k for k in reference if k not in record]
    if missing:
        raise _Bad("missing-array", f"{len(missing)} model array(s) absent, first "
                   f"{_clip(repr(missing[0]), 100)}")
    extra = [k for k in names if k not in reference]
    if extra:
        raise _Bad("extra-array", f"{len(extra)} unknown array(s), first "
                   f"{_clip(repr(extra[0]), 100)}")
    out = {}
    for name, ref in reference.items():
        arr = npy_view(record[name], name, limits, expected_shape=ref.shape)
        if dtype_kind(arr.dtype) != dtype_kind(ref.dtype):
            raise _Bad("dtype",
                       f"{name} has dtype {arr.dtype}, expected {dtype_kind(ref.dtype)} like "
                       f"{ref.dtype}")
        _check_finite(arr, name)
        out[name] = arr
    return out


def _histogram(record, limits: ReplyLimits) -> dict[str, np.ndarray]:
    if not isinstance(record, ArrayRecord):
        raise _Bad("malformed:histogram", f"{HISTOGRAM!r} is a {type(record).__name__}, expected "
                   "an ArrayRecord")
    out, total = {}, 0
    for name in list(record.keys()):
        arr = npy_view(record[name], name, limits, max_values=limits.max_histogram_values - total)
        if arr.dtype.kind not in "fiu":
            raise _Bad("malformed:histogram", f"{name} has dtype {arr.dtype}, expected numbers")
        _check_finite(arr, name)
        total += arr.size
        out[name] = arr
    return out


def dtype_kind(dtype: np.dtype) -> str:
    """float, integer or the dtype's name: an update's arrays must be of the model's kinds."""
    if dtype.kind == "f":
        return "float"
    if dtype.kind in "iu":
        return "integer"
    return dtype.name


def npy_view(array, name: str, limits: ReplyLimits = ReplyLimits(),
             expected_shape: tuple[int, ...] | None = None,
             max_values: int | None = None) -> np.ndarray:
    """A read-only zero-copy view of a Flower Array's .npy bytes. The header is parsed (at most
    ``limits.max_npy_header_bytes``) and checked (no object dtype, the expected shape or at most
    ``max_values`` values, exactly the bytes it claims) before any data is touched. Raises _Bad."""
    if not isinstance(array, Array):
        raise _Bad("malformed:arrays", f"{name} is a {type(array).__name__}, expected an Array")
    if array.stype != "numpy.ndarray":
        raise _Bad("malformed:arrays", f"{name} has serialization type "
                   f"{_clip(repr(array.stype), 60)}, expected 'numpy.ndarray'")
    data = array.data
    if not isinstance(data, bytes):
        raise _Bad("malformed:arrays", f"{name} carries a {type(data).__name__}, expected bytes")
    try:
        shape, fortran_order, dtype, offset = _npy_header(data, limits.max_npy_header_bytes)
    except _Bad as bad:
        raise _Bad(bad.code, f"{name}: {bad.reason}") from None
    except Exception as exc:  # noqa: BLE001 — numpy raises ValueError/SyntaxError/...
        raise _Bad("malformed:arrays", f"{name}: undecodable .npy header "
                   f"({type(exc).__name__}: {_clip(str(exc), 120)})") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise _Bad("dtype", f"{name} has dtype {_clip(str(dtype), 60)}: object and structured "
                   "arrays are refused")
    if dtype.kind not in "fiub" or dtype.itemsize == 0:
        raise _Bad("dtype", f"{name} has dtype {dtype}, expected a numeric dtype")
    shape = tuple(int(s) for s in shape)
    if expected_shape is not None and shape != tuple(expected_shape):
        raise _Bad("shape-mismatch", f"{name} has shape {_clip(str(shape), 80)}, expected "
                   f"{tuple(expected_shape)}")
    count = math.prod(shape)  # exact Python int: a claim of 10**12 values is just a number here
    if max_values is not None and count > max_values:
        raise _Bad("too-large", f"{name} claims {count} values; at most {max_values}")
    payload = len(data) - offset
    if payload != count * dtype.itemsize:
        raise _Bad("malformed:arrays", f"{name}: header promises {count * dtype.itemsize} bytes, "
                   f"the payload has {payload} (truncated or padded)")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    # Fortran order: the same bytes read as the transposed C array, then transposed back (a view).
    return flat.reshape(shape[::-1]).T if fortran_order else flat.reshape(shape)


def array_views(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Read-only zero-copy views of a trusted record's arrays (the model the server sends, or its
    own), as ``ArrayRecord.to_numpy_ndarrays`` without np.load's copy and per-array header
    parsing. Raises ValueError when an array is not a plain numeric .npy array, as np.load would.
    Clients' replies go through the ``decode_*`` functions instead, which check them first."""
    try:
        return {name: npy_view(array, name) for name, array in record.items()}
    except _Bad as bad:  # internal: a ValueError for callers
        raise ValueError(bad.reason) from None


def _npy_header(data: bytes, max_header_size: int) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran order, dtype, payload offset) of a .npy payload's header; a well-formed
    header no longer than ``max_header_size`` is parsed once per distinct header bytes."""
    version = (data[6], data[7]) if len(data) >= 8 and data.startswith(NPY_MAGIC) else None
    size = 2 if version == (1, 0) else 4  # the header length field's bytes
    if version in NPY_HEADER_READERS and len(data) >= 8 + size:
        length = int.from_bytes(data[8:8 + size], "little")
        if length <= max_header_size:
            return _parsed_header(data[:8 + size + length], max_header_size)
    return _read_header(data, max_header_size)  # numpy's reader says what is wrong


def _read_header(data: bytes, max_header_size: int) -> tuple[tuple, bool, np.dtype, int]:
    buf = io.BytesIO(data)  # shares the bytes, no copy
    reader = NPY_HEADER_READERS.get(np.lib.format.read_magic(buf))
    if reader is None:
        raise _Bad("malformed:arrays", "unsupported .npy format version")
    shape, fortran_order, dtype = reader(buf, max_header_size=max_header_size)
    return tuple(shape), bool(fortran_order), dtype, buf.tell()


# A header that does not parse raises and is not kept.
_parsed_header = functools.lru_cache(maxsize=NPY_HEADER_CACHE)(_read_header)


def _check_finite(arr: np.ndarray, name: str) -> None:
    """Finite in its own dtype, and still finite once cast to the aggregation dtype."""
    if arr.dtype.kind != "f" or arr.size == 0:
        return
    finite = np.isfinite(arr)
    if not finite.all():
        nan = int(np.isnan(arr).sum())
        raise _Bad("non-finite", f"{nan} NaN and {arr.size - nan - int(finite.sum())} Inf values "
                   f"in {name}")
    if arr.dtype.itemsize > AGGREGATION_DTYPE.itemsize:
        top = float(np.finfo(AGGREGATION_DTYPE).max)
        if float(arr.max()) > top or float(arr.min()) < -top:
            raise _Bad("non-finite", f"{name} holds {arr.dtype} values beyond "
                       f"{AGGREGATION_DTYPE} range (|x| > {top:.3g}): Inf once cast")
