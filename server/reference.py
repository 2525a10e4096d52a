"""The ServerApp's step after the last round: collect the clients' drift-reference counts.

With ``deployment.reference_source = "clients"`` the ServerApp sends every connected node that is
not quarantined (a suspected poisoner's counts would skew the reference) one Flower message of
type ``query`` through the grid. Each client answers with the release it made and kept when it
first trained (noised under DP and already in its epsilon; client/reference.py), or a refusal
saying why. Replies are decoded by fedshield.records (typed; a malformed one is rejected with its
reason and the rest go on) and written to the run folder's ``client_reference.json``, where the
hand-off merges them into the drift reference (deployment/reference_stats.py merge_histograms).
A resumed run asks again and the clients resend their kept releases: nothing is paid twice.
"""

from __future__ import annotations

import json
import math
from logging import INFO, WARNING

import numpy as np
from fedshield.privacy.ledger import atomic_write_json
from fedshield.privacy.reference import (
    CLIENT_REFERENCE_JSON,
    ClientReference,
    ReferenceRelease,
    checked_release,
    event_id_problem,
    names_for,
    public_edges,
    reference_sensitivity,
)
from fedshield.server.federation_state import identity_problem
from fedshield.server.outputs import RunFolder
from fedshield.tasks import task_for
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedshield import schema
from fedshield.records import (
    REFERENCE_QUERY,
    ReferenceReport,
    decode_reference_reply,
    filed,
    sender_problem,
)
from fedshield.run_records import ReferenceCollection, ReleaseEvent


def collect_reference(grid: Grid, cfg: schema.Config, folder: RunFolder,
                      node_partition: dict[int, int],
                      quarantined: set[int] | frozenset[int] = frozenset()
                      ) -> ClientReference | None:
    """Ask the clients for their reference counts and write ``client_reference.json``; None
    when the run takes its reference from the server (``deployment.reference_source``)."""
    if cfg.deployment.reference_source != "clients":
        return None
    task = task_for(cfg.task)
    bins = cfg.deployment.reference_bins
    edges = public_edges(task.load()[1].x, task.input_shape, bins)
    shape = (edges.shape[0], bins)
    nodes = sorted(n for n in grid.get_node_ids() if n not in quarantined)
    # run-key: the run's name for the clients' releases files, as in every training message
    query = {"query": REFERENCE_QUERY, "run-key": folder.path.name}
    sent = [Message(RecordDict({"config": ConfigRecord(dict(query))}), dst_node_id=n,
                    message_type=MessageType.QUERY) for n in nodes]
    replies = list(grid.send_and_receive(sent, timeout=cfg.federation.round_timeout))
    by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    private = cfg.privacy.enabled
    sigma = cfg.privacy.reference_noise_multiplier if private else 0.0
    labels = dict(node_partition)  # identity_problem learns first claims into its own copy
    parts: dict[str, ReferenceRelease] = {}
    refused: dict[str, str] = {}
    rejected: dict[str, str] = {}
    answered: set[int] = set()
    for msg in replies:
        node = int(by_id.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id))
        label = str(node_partition.get(node, node))
        problem = sender_problem(node, answered, nodes,
                                 second="a second reply to the reference query",
                                 not_asked="this node was not asked for reference counts")
        answered.add(node)
        if problem is not None:
            rejected[label] = str(problem)
            if problem.code == "duplicate":  # neither answer is kept
                parts.pop(label, None)
                refused.pop(label, None)
            continue
        decoded = filed(decode_reference_reply(msg, shape, task.num_classes), label, refused,
                        rejected)
        if decoded is None:
            continue
        claim = identity_problem(labels, node, decoded.partition_id)
        part = claim if claim is not None else check_reference(
            decoded, private=private, sigma=sigma, run_key=folder.path.name)
        if isinstance(part, ReferenceRelease):
            parts[label] = part
        else:
            rejected[label] = str(part)
    for label, why in {**refused, **rejected}.items():
        log(WARNING, "drift reference: client %s sent no usable counts: %s", label, why)
    names = names_for(task.input_shape, task.feature_names)
    record = ClientReference(edges, names, task.num_classes, parts, refused, rejected, sigma)
    # Not a secret: under DP every count is noised; without DP the run released them anyway.
    atomic_write_json(folder.path / CLIENT_REFERENCE_JSON, record.to_dict())
    log(INFO, "drift reference: counts from %d of %d clients in %s", len(parts), len(nodes),
        CLIENT_REFERENCE_JSON)
    return record


def collection_record(record: ClientReference) -> ReferenceCollection:
    """The summary's typed view of a collection: who was used, at which ledger event."""
    private = {k: p for k, p in record.parts.items() if p.private}
    events = {k: ReleaseEvent(noise_multiplier=e[0], sample_rate=e[1], steps=e[2])
              for k, e in ((k, p.event) for k, p in private.items())}
    return ReferenceCollection(
        noise_multiplier=record.noise_multiplier, used=tuple(sorted(record.parts)),
        events=events, event_ids={k: p.event_id for k, p in private.items() if p.event_id},
        refused=dict(record.refused), rejected=dict(record.rejected))


def read_collection(folder: RunFolder, cfg: schema.Config) -> ReferenceCollection | None:
    """The run folder's collection as the summary records it; None when the run takes its
    reference from the server or the file is missing or unreadable (logged)."""
    path = folder.path / CLIENT_REFERENCE_JSON
    if cfg.deployment.reference_source != "clients" or not path.exists():
        return None
    try:
        return collection_record(ClientReference.from_dict(json.loads(path.read_text())))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log(WARNING, "drift reference: %s unreadable (%s); not in the summary", path, exc)
        return None


# Tolerance on floats the client computed the same way (sigma x sqrt(H)) and sent through a
# MetricRecord and its releases file (JSON): float64 rounding, never a different mechanism.
REL_TOL = 1e-9


def check_reference(report: ReferenceReport, *, private: bool, sigma: float,
                    run_key: str) -> ReferenceRelease | str:
    """The release a decoded reply carries, or why the server may not use it (a "code: detail"
    string), under the run's privacy mode: the evaluation's standard (server/evaluation.py).

    Under client DP (``private``) the reply must be this run's DP release: noised at this run's
    ``sigma`` with the noise std of sigma x the sensitivity sqrt(features + 1), both stated,
    and the ledger event it cost (its id names this run and a nonce). Counts that are whole
    numbers are exact counts, whatever the reply claims: Gaussian noise is continuous, so a
    noised float64 count is a whole number with chance about ulp(count) (< 1e-9 for counts
    below 1e6). Without client DP the counts are exact (noise multiplier 0)."""
    counts = (report.feature_counts, report.class_counts)
    if not private:
        if report.noise_multiplier != 0:
            return (f"dp-mismatch: counts noised at {report.noise_multiplier:g} in a run "
                    "without client DP, whose clients send exact counts")
        return _release(report)
    if report.noise_multiplier == 0:
        return ("not-private: exact counts (noise multiplier 0) although this run releases "
                "the drift reference under client DP")
    missing = [k for k, v in (("sensitivity", report.sensitivity),
                              ("event-id", report.event_id)) if v is None]
    if missing:
        return ("not-private: under client DP a reference reply carries its release's "
                f"sensitivity and ledger event id; missing {', '.join(missing)}")
    if report.noise_multiplier != sigma:
        weaker = "weaker than" if report.noise_multiplier < sigma else "not"
        return (f"dp-mismatch: released at noise multiplier {report.noise_multiplier:g}, "
                f"{weaker} this run's privacy.reference_noise_multiplier {sigma:g}")
    sensitivity = reference_sensitivity(report.feature_counts.shape[0])
    assert report.sensitivity is not None  # checked in missing above
    if not math.isclose(report.sensitivity, sensitivity, rel_tol=REL_TOL):
        return (f"dp-mismatch: sensitivity {report.sensitivity:g}; "
                f"{report.feature_counts.shape[0]} features + labels have {sensitivity:g}")
    if not math.isclose(report.noise_std, sigma * sensitivity, rel_tol=REL_TOL):
        return (f"dp-mismatch: noise std {report.noise_std:g}, but noise multiplier {sigma:g} "
                f"x sensitivity {sensitivity:g} is {sigma * sensitivity:g}")
    bad_id = event_id_problem(report.event_id, run_key)
    if bad_id is not None:
        return f"not-private: {bad_id}"
    whole = sum(int(np.count_nonzero(c == np.round(c))) for c in counts)
    if whole:
        total = sum(c.size for c in counts)
        return (f"not-private: {whole} of {total} counts are whole numbers; noise of std "
                f"{report.noise_std:g} leaves none whole: these are exact counts")
    return _release(report)


def _release(report: ReferenceReport) -> ReferenceRelease | str:
    try:
        return checked_release(report.feature_counts, report.class_counts,
                               report.noise_multiplier, report.noise_std,
                               event_id=report.event_id)
    except ValueError as exc:
        return f"malformed:reference: {exc}"


def after_last_round(grid: Grid, cfg: schema.Config, folder: RunFolder, strategy) -> None:
    """:func:`collect_reference` for a strategy that holds the federation (partition labels,
    quarantine). A failure is logged, never raised: the run's results must still be written."""
    reputation = getattr(strategy, "reputation", None)
    quarantined = set(reputation.quarantined) if reputation is not None else set()
    try:
        collect_reference(grid, cfg, folder, dict(strategy.node_partition), quarantined)
    except Exception as exc:  # noqa: BLE001 — the reference is optional; the run is not
        log(WARNING, "drift reference: collecting the clients' counts failed (%s: %s); the "
            "hand-off falls back to the server's evaluation split", type(exc).__name__, exc)
