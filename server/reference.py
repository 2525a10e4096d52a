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

from logging import INFO, WARNING

from fedshield.privacy.ledger import atomic_write_json
from fedshield.privacy.reference import (
    CLIENT_REFERENCE_JSON,
    ClientReference,
    ReferenceRelease,
    checked_release,
    names_for,
    public_edges,
)
from fedshield.server.outputs import RunFolder
from fedshield.tasks import task_for
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedshield import schema
from fedshield.records import (
    REFERENCE_QUERY,
    ReferenceReport,
    Refusal,
    Rejected,
    decode_reference_reply,
)


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
    parts: dict[str, ReferenceRelease] = {}
    refused: dict[str, str] = {}
    rejected: dict[str, str] = {}
    for msg in replies:
        node = int(by_id.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id))
        label = str(node_partition.get(node, node))
        if label in parts or label in refused or label in rejected:
            rejected[label] = "duplicate: a second reply to the reference query"
            parts.pop(label, None)
            continue
        decoded = decode_reference_reply(msg, shape, task.num_classes)
        if isinstance(decoded, Refusal):
            refused[label] = f"{decoded.code}: {decoded.reason}"
        elif isinstance(decoded, Rejected):
            rejected[label] = str(decoded)
        else:
            part = _release(decoded)
            if isinstance(part, str):
                rejected[label] = part
            else:
                parts[label] = part
    for label, why in {**refused, **rejected}.items():
        log(WARNING, "drift reference: client %s sent no usable counts: %s", label, why)
    sigma = cfg.privacy.reference_noise_multiplier if cfg.privacy.enabled else 0.0
    names = names_for(task.input_shape, task.feature_names)
    record = ClientReference(edges, names, task.num_classes, parts, refused, rejected, sigma)
    # Not a secret: under DP every count is noised; without DP the run released them anyway.
    atomic_write_json(folder.path / CLIENT_REFERENCE_JSON, record.to_dict())
    log(INFO, "drift reference: counts from %d of %d clients in %s", len(parts), len(nodes),
        CLIENT_REFERENCE_JSON)
    return record


def _release(report: ReferenceReport) -> ReferenceRelease | str:
    try:
        return checked_release(report.feature_counts, report.class_counts,
                               report.noise_multiplier, report.noise_std)
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
