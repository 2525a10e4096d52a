"""Client side of the drift reference (privacy/reference.py): the release made in the first round
the client trains, and the answer to the ServerApp's query after the last round.

Under DP the release is made with training (client/fit.py), so its event is in every epsilon the
client reports and in the planned noise; the query only resends the kept release (client/
releases.py), free, and a client that has none (it never trained in this run, or its releases
file is gone) refuses rather than release anything outside the epsilon it reported. Without any
DP there is no guarantee to keep: the client counts its data exactly when asked; under central DP
alone exact counts would bypass it, so the client refuses.
"""

from __future__ import annotations

import numpy as np
from fedshield.client.fit import DataLoader, checked_data, client_ledger, identity
from fedshield.client.releases import (
    kept_reference,
    reference_shape,
    task_edges,
    wants_reference,
)
from fedshield.privacy.reference import monitored_features, release_reference
from flwr.app import Context, Message

from fedshield import schema
from fedshield.errors import BudgetExhausted, DataValidationError
from fedshield.records import (
    REFERENCE_QUERY,
    ReferenceReport,
    Refusal,
    encode_reference_report,
    encode_refusal,
)


def _refuse(msg: Message, context: Context, code: str, reason: str) -> Message:
    pid = identity(context).get("partition-id")
    return Message(encode_refusal(Refusal(code, reason, pid)), reply_to=msg)


def answer_query(msg: Message, context: Context, cfg: schema.Config,
                 load_data: DataLoader) -> Message:
    """The reply to the ServerApp's drift-reference query: the counts, or a refusal saying why."""
    config = dict(msg.content["config"]) if "config" in msg.content else {}
    if config.get("query") != REFERENCE_QUERY:
        return _refuse(msg, context, "unknown-query",
                       f"this client answers the query {REFERENCE_QUERY!r} only, not "
                       f"{str(config.get('query'))[:60]!r}")
    if not wants_reference(cfg):
        return _refuse(msg, context, "not-released", 'deployment.reference_source is "server": '
                       "this run's clients release no drift-reference histograms")
    try:
        task, data, _ = checked_data(context, cfg, load_data)
    except DataValidationError as exc:
        return _refuse(msg, context, "invalid-data", str(exc))
    bins = cfg.deployment.reference_bins
    if cfg.privacy.enabled:
        run_key = str(config.get("run-key", context.run_id))
        try:
            ledger = client_ledger(cfg, context, run_key)
        except BudgetExhausted as exc:  # a lost or corrupted ledger
            return _refuse(msg, context, getattr(exc, "code", "budget-exhausted"), str(exc))
        release = kept_reference(ledger, run_key, reference_shape(task, bins), task.num_classes)
        if release is None:
            return _refuse(msg, context, "no-reference-release",
                           "this client made no drift-reference release in this run (it never "
                           "trained, or its releases file is gone); it sends nothing that its "
                           "reported epsilon does not cover")
    elif cfg.central_dp.enabled:  # exact counts would bypass the user-level guarantee
        return _refuse(msg, context, "outside-guarantee",
                       "exact drift-reference counts are outside central DP's guarantee; enable "
                       'privacy.enabled (a DP release) or set deployment.reference_source = '
                       '"server"')
    else:  # no DP at all: no guarantee to keep, the exact counts
        release = release_reference(monitored_features(data.x, task.input_shape), data.y,
                                    task.num_classes, task_edges(task, bins), 0.0,
                                    np.random.default_rng())
    # A DP release carries its event's parameters (sensitivity, ledger event id): the server
    # checks them against the run's config before it uses the counts (server/reference.py).
    report = ReferenceReport(release.feature_counts, release.class_counts,
                             release.noise_multiplier, release.noise_std,
                             identity(context).get("partition-id"),
                             sensitivity=release.sensitivity if release.private else None,
                             event_id=release.event_id)
    return Message(encode_reference_report(report), reply_to=msg)
