"""Typed records of a run folder's result files: ``metrics.jsonl`` and ``summary.json``.

``MetricsLine`` is one round's line of ``metrics.jsonl``; ``RunSummary`` is ``summary.json``. The
server builds them, ``server/outputs.py`` writes and reads them, and every other module (sweeps,
benchmarks, deployment, the console report) reads their attributes, never the JSON by key.

The JSON field names are the ones users and older run folders have, so ``to_json`` of a record
the server built is byte-for-byte today's file. ``from_json`` decodes and type-checks every known
field and raises ``StateCorrupted`` (saying which field, and what to do) for a torn line, an
edited value of the wrong type, or a file that is not such a record at all. Fields that older
fedshield versions did not write have defaults (None: not recorded), and keys a newer version
added are kept in ``extra`` and written back, so reading never loses information.

This module is core: standard library only (no Flower, numpy or torch), so deployment tools and
benchmarks can read run folders without the training stack.
"""

from __future__ import annotations

import json
import logging
import types
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from fedshield.errors import StateCorrupted

log = logging.getLogger("fedshield.outputs")  # the run folder's logger (server/outputs.py)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

# A metrics line's status: the round produced a new global model, or it did not.
AGGREGATED, FAILED = "aggregated", "failed"
# A run summary's status.
COMPLETED = "completed"

R = TypeVar("R", bound="_Record")
_OMIT_NONE = {"omit_none": True}  # keys that today's files carry only when set


def _omit_none() -> Any:
    """A field that is None by default and absent from the JSON while None."""
    return field(default=None, metadata=_OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class _Record:
    """Base: JSON (de)coding from the dataclass fields' types; unknown keys kept in ``extra``."""

    # Keys this version does not know (a newer writer's, or a hand-made file's): kept verbatim.
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The record as the JSON object of the file (field names as in the file)."""
        out: dict[str, Any] = dict(self.extra)
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = _encode(value)
        return out

    @classmethod
    def from_dict(cls: type[R], data: Any, where: str = "") -> R:
        """Decode and type-check a parsed JSON object; StateCorrupted says what is wrong."""
        where = where or cls.__name__
        if not isinstance(data, Mapping):
            raise StateCorrupted(f"{where}: expected a JSON object, found {_kind(data)}")
        hints = get_type_hints(cls)
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            if f.name in data:
                kwargs[f.name] = _decode(hints[f.name], data[f.name], f"{where}.{f.name}")
            elif _required(f):
                raise StateCorrupted(f"{where}: the field {f.name!r} is missing")
        extra = {k: v for k, v in data.items() if k not in known}
        if any(not isinstance(k, str) for k in extra):
            raise StateCorrupted(f"{where}: a key is not a string")
        return cls(**kwargs, extra=extra)


def _required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _encode(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) checked against the type annotation ``tp``."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _decode(option, value, where)
            except StateCorrupted as exc:
                problems.append(str(exc))
        raise StateCorrupted(problems[0] if len(problems) == 1 else
                             f"{where}: {_kind(value)} is none of the allowed types")
    if isinstance(tp, type) and is_dataclass(tp) and issubclass(tp, _Record):
        return tp.from_dict(value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, list):
            return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    elif origin in (dict, Mapping):
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return {k: _decode(args[1], v, f"{where}.{k}") for k, v in value.items()}
    else:  # a programming error in this module, not in the file
        raise TypeError(f"run_records cannot decode the annotation {tp!r}")
    raise StateCorrupted(f"{where}: expected {_type_name(tp)}, found {_kind(value)} "
                         f"{_short(value)}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is tuple:
        return "a list"
    if origin in (dict, Mapping):
        return "an object"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StateCorrupted(f"{what} is not valid JSON ({exc})") from None


# --- metrics.jsonl ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ReleaseEvent(_Record):
    """A client's once-per-run release (class histogram, drift reference) or one evaluation
    release, accounted as a Gaussian event."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass(frozen=True, kw_only=True)
class DPEventLine(_Record):
    """One client's DP-SGD event this round (enough to recompute its epsilon), plus its
    histogram release and its drift-reference release in the round whose ledger entry holds
    each (absent in lines written before the reference event was recorded)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    release: ReleaseEvent | None = _omit_none()
    reference: ReleaseEvent | None = _omit_none()


@dataclass(frozen=True, kw_only=True)
class ClassCounts(_Record):
    """A client's class histogram as released: noised under DP (``noise_std``), else exact."""

    counts: tuple[float, ...]
    noise_std: float | None = None


@dataclass(frozen=True, kw_only=True)
class PrivacyUnits(_Record):
    """What each epsilon of a metrics line measures (sample-level, user-level)."""

    epsilon: str
    central_epsilon: str


@dataclass(frozen=True, kw_only=True)
class FederatedEvaluation(_Record):
    """The round's federated evaluation of the global model: each evaluating client's result on
    its own held-out data, keyed by partition id, noised under client DP (``noise_std``: the
    accuracy noise's standard deviation; None means exact), and their distribution."""

    accuracy: Mapping[str, float]
    loss: Mapping[str, float] = field(default_factory=dict)
    mean: float | None = None
    worst: float | None = None
    worst_decile: float | None = None  # mean accuracy of the worst 10% of clients (at least one)
    spread: float | None = None  # standard deviation of the clients' accuracies
    noise_std: float | None = None
    # Added with the evaluation itself (server/evaluation.py): how the values were released
    # ("dp-gaussian", "exact (no DP)", "exact, outside the DP guarantee"), the mechanism's
    # parameters, each client's (noised) example count and cumulative epsilon after it, its
    # privacy events this round, and the replies that were refused or rejected (reasons).
    source: str | None = None
    round: int | None = None
    noise_multiplier: float | None = None
    loss_clip: float | None = None
    num_examples: Mapping[str, int] = field(default_factory=dict)
    epsilon: Mapping[str, float] = field(default_factory=dict)
    events: Mapping[str, tuple[ReleaseEvent, ...]] = field(default_factory=dict)
    rejected: Mapping[str, str] = field(default_factory=dict)
    refused: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class MetricsLine(_Record):
    """One round's line of ``metrics.jsonl``. Client-keyed maps use the partition id (or the
    node id where it is unknown) as a string key, as JSON requires."""

    round: int
    status: str | None = None  # None: a line from before the status field (see ``aggregated``)
    accuracy: float | None = None
    loss: float | None = None
    client_accuracy: float | None = None
    train_loss: float | None = None
    epsilon: Mapping[str, float] = field(default_factory=dict)
    epsilon_max: float | None = None
    epsilon_mean: float | None = None
    dp_events: Mapping[str, DPEventLine] = field(default_factory=dict)
    central_epsilon: float | None = None
    privacy_unit: PrivacyUnits | None = None
    sampled: int = 0
    accepted: int = 0
    rejected: Mapping[str, str] = field(default_factory=dict)
    rejected_codes: Mapping[str, int] = field(default_factory=dict)
    refused: Mapping[str, str] = field(default_factory=dict)
    ignored_claims: Mapping[str, str] = field(default_factory=dict)
    newly_quarantined: tuple[int, ...] = ()
    quarantined: tuple[int, ...] = ()
    aggregation: Mapping[str, Any] = field(default_factory=dict)  # the rule's own diagnostics
    skipped: str = ""
    seconds: float | None = None
    # The server's own work in the round (decoding, screening, aggregation, server-side
    # evaluation, accounting): its seconds outside the round's message exchanges.
    server_seconds: float | None = _omit_none()
    client_seconds: Mapping[str, float] = field(default_factory=dict)
    class_counts: Mapping[str, ClassCounts] = field(default_factory=dict)
    outside_guarantee: tuple[str, ...] = ()
    # node id -> partition id of every node this line names by node id (the quarantine lists)
    node_partitions: Mapping[str, int] = field(default_factory=dict)
    evaluation: FederatedEvaluation | None = _omit_none()  # the round's federated evaluation
    timestamp: float | None = _omit_none()  # unix time the round was recorded (MLflow's x-axis)

    @property
    def aggregated(self) -> bool:
        """Whether this round produced a new global model (older lines: it was not skipped)."""
        return self.status == AGGREGATED if self.status is not None else not self.skipped

    def to_json(self) -> str:
        """The line as written to metrics.jsonl (no newline)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "metrics line") -> MetricsLine:
        """Parse one line; StateCorrupted if it is not a metrics record."""
        return cls.from_dict(_parse(text, where), where)


# --- summary.json -------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class FinalMetrics(_Record):
    """The released model's server-side test metrics after the last completed round."""

    accuracy: float | None = None
    loss: float | None = None


@dataclass(frozen=True, kw_only=True)
class BestRound(_Record):
    """The round whose released model scored the best server-side test accuracy."""

    round: int
    accuracy: float


@dataclass(frozen=True, kw_only=True)
class CentralDPSummary(_Record):
    """User-level (central) DP at the server: its configuration and the epsilon spent."""

    enabled: bool = False
    noise_multiplier: float | None = None
    clip_norm: float | None = None
    delta: float | None = None
    accountant: str | None = None
    reproducible_noise: bool | None = None
    user_level_epsilon: float | None = None
    unit: str | None = None
    sampling: str | None = None
    client_sample_rate: float | None = None
    label: str | None = None


@dataclass(frozen=True, kw_only=True)
class PrivacySummary(_Record):
    """The run's privacy: the sample-level DP-SGD guarantee per client (``unit``, ``delta``,
    ``accountant``), the noise used, and what was released outside the guarantee. None: not
    recorded (runs written before the field existed)."""

    enabled: bool = False
    accountant: str | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    noise_multipliers_used: tuple[float, ...] | None = None
    target_epsilon: float | None = None
    max_grad_norm: float | None = None
    max_epsilon: float | None = None
    reproducible_noise: bool | None = None  # True: the epsilon does NOT hold against the server
    epsilon_by_client: Mapping[str, float] = field(default_factory=dict)
    epsilon_max: float | None = None
    epsilon_mean: float | None = None
    unit: str | None = None
    label: str | None = None
    central_dp: CentralDPSummary | None = None
    exhausted_clients: tuple[int, ...] = ()
    release_stats: str | None = None
    stats_noise_multiplier: float | None = None
    outside_guarantee: tuple[str, ...] = ()  # values sent exactly under DP, by opt-in

    @property
    def sample_level_epsilon(self) -> float | None:
        """The per-client epsilon a gate or registry may quote: None without DP."""
        return self.epsilon_max if self.enabled else None


@dataclass(frozen=True, kw_only=True)
class DataQuality(_Record):
    """The federation's class mix from the clients' released histograms (noised under DP;
    privacy/releases.py ClassView): what the drift reference takes its class priors from."""

    clients: int
    class_counts: tuple[float, ...]  # summed (noised) counts
    class_priors: tuple[float, ...]  # clipped at 0 and normalised
    noise_std: float
    examples: float
    private: bool  # every part came from the DP release
    source: str


@dataclass(frozen=True, kw_only=True)
class RobustnessSummary(_Record):
    """Rejected updates, refusals and quarantine over the run; ``accuracy_drop`` is written by
    a robustness check (none today) and read by the promotion gate."""

    rejected_total: int | None = None
    refused_total: int | None = None
    quarantined: tuple[int, ...] = ()
    accuracy_drop: float | None = _omit_none()


@dataclass(frozen=True, kw_only=True)
class AttackReport(_Record):
    """Who was Byzantine in a simulated attack, who got caught, and a backdoor's success."""

    byzantine_ids: tuple[int, ...] = ()
    quarantined: tuple[int, ...] = ()
    detection_rate: float | None = None
    false_quarantine_rate: float | None = None
    backdoor_success: float | None = _omit_none()


@dataclass(frozen=True, kw_only=True)
class HandoffSummary(_Record):
    """The hand-off's outcome (export, card, registry, gate), or the error that stopped it."""

    model_name: str | None = _omit_none()
    version: str | None = _omit_none()
    passed: bool | None = _omit_none()
    reasons: tuple[str, ...] | None = _omit_none()
    card_path: str | None = _omit_none()
    export_dir: str | None = _omit_none()
    model_uri: str | None = _omit_none()
    checks: tuple[Mapping[str, Any], ...] | None = _omit_none()
    error: str | None = _omit_none()
    skipped: str | None = _omit_none()  # why no hand-off ran (e.g. no [deploy] extra installed)


@dataclass(frozen=True, kw_only=True)
class ReferenceCollection(_Record):
    """The drift-reference query after the last round (server/reference.py, the run folder's
    client_reference.json): whose release was used, the ledger event each one cost (DP only:
    ``events`` and ``event_ids`` by partition label), and who refused or was rejected, why."""

    noise_multiplier: float  # the configured sigma (0: exact counts, a run without client DP)
    used: tuple[str, ...] = ()
    events: Mapping[str, ReleaseEvent] = field(default_factory=dict)
    event_ids: Mapping[str, str] = field(default_factory=dict)
    refused: Mapping[str, str] = field(default_factory=dict)
    rejected: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RunSummary(_Record):
    """``summary.json``. None: not recorded (runs written before the field existed)."""

    status: str | None = None  # "completed" or "failed"
    failure: str = ""  # why the run failed ("" when it did not)
    name: str | None = None
    task: str | None = None
    run_dir: str | None = None
    rounds: int | None = None
    rounds_completed: int | None = None
    num_clients: int | None = None
    partition: Mapping[str, Any] | None = None  # the config's [partition] table
    strategy: str | None = None
    attack: Mapping[str, Any] | str | None = None  # the config's [attack] table (older: a name)
    seed: int | None = None
    secagg: bool | None = None
    final: FinalMetrics | None = None
    best: BestRound | None = None
    privacy: PrivacySummary = field(default_factory=PrivacySummary)
    data_quality: DataQuality | None = None
    robustness: RobustnessSummary | None = None
    stopped_early: str = ""
    versions: Mapping[str, str] = field(default_factory=dict)
    wall_seconds: float | None = None
    handoff: HandoffSummary | None = _omit_none()
    # The other post-run hooks' results by hook name (server/hooks.py: "report", "tracking")
    post_run: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    attack_report: AttackReport | None = _omit_none()
    evaluation: FederatedEvaluation | None = _omit_none()  # the last evaluated round's
    # node id -> partition id of every node the run's lines name (shown beside partition ids)
    node_partitions: Mapping[str, int] = field(default_factory=dict)
    drift_reference: ReferenceCollection | None = _omit_none()  # reference_source = "clients"

    @property
    def failed(self) -> bool:
        """Whether the run never updated the model (nothing may be exported from it)."""
        return self.status == FAILED

    @property
    def final_accuracy(self) -> float | None:
        """The final server-side test accuracy, None when no round completed."""
        return self.final.accuracy if self.final else None

    @property
    def best_accuracy(self) -> float | None:
        """The best round's server-side test accuracy, None when no round was scored."""
        return self.best.accuracy if self.best else None

    def to_json(self) -> str:
        """The text of summary.json."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = SUMMARY_FILE) -> RunSummary:
        """Parse summary.json; StateCorrupted if it is torn, edited or another file."""
        return cls.from_dict(_parse(text, where), where)

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> RunSummary:
        """Decode a parsed summary; a JSON object without a ``privacy`` block (every summary
        fedshield wrote has one) is another file, not a run summary."""
        where = where or SUMMARY_FILE
        if isinstance(data, Mapping) and "privacy" not in data:
            raise StateCorrupted(f"{where} is not a fedshield run summary (no 'privacy' block); "
                                 "point at a run folder written by fedshield")
        return super().from_dict(data, where)


# --- the files of a run folder ------------------------------------------------------------------
def read_metrics(run_dir: str | Path) -> list[MetricsLine]:
    """The metrics lines of a run folder, one per round ([] when there is no metrics.jsonl).

    A torn last line (a crash mid-append: no final newline) is dropped with a warning; any other
    unreadable line, or rounds out of order, is StateCorrupted: the results cannot be trusted,
    so nothing continues from them."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise StateCorrupted(f"{path} is not UTF-8 text (corrupted); restore it from a backup "
                             "or start a new run") from None
    lines = [(i, line) for i, line in enumerate(text.split("\n"), 1) if line.strip()]
    rows: list[MetricsLine] = []
    for k, (number, line) in enumerate(lines):
        try:
            row = MetricsLine.from_json(line, f"line {number}")
        except StateCorrupted as exc:
            if k == len(lines) - 1 and not text.endswith("\n"):
                log.warning("%s: dropping the torn last line %d (the run stopped while writing "
                            "it); that round will be redone on resume", path, number)
                break
            raise StateCorrupted(f"{path}: line {number} is not a metrics record ({exc}); it is "
                                 "corrupted or was edited: restore it from a backup or start a "
                                 "new run") from None
        if rows and row.round <= rows[-1].round:
            raise StateCorrupted(f"{path}: line {number} is round {row.round} after round "
                                 f"{rows[-1].round}; the file was edited or two runs wrote to "
                                 "it. Start a new run")
        rows.append(row)
    return rows


def read_summary(run_dir: str | Path) -> RunSummary:
    """The summary.json of a run folder; StateCorrupted (saying what to do) if it is missing,
    torn, edited or not a fedshield summary."""
    path = Path(run_dir) / SUMMARY_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise StateCorrupted(f"{path} does not exist: the run has not finished (or this is not "
                             "a run folder); point at a finished run's folder") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StateCorrupted(f"{path} is unreadable ({exc}); restore it from a backup") from None
    try:
        return RunSummary.from_json(text, str(path))
    except StateCorrupted as exc:
        raise StateCorrupted(f"{exc}; the file is torn or was edited: restore it from a backup "
                             "or run the federation again") from None
