"""ShieldStrategy: Flower's FedAvg message plumbing around fedshield's screening, robust rules,
central DP and reputation.

The adapter is thin: replies -> screened -> one ``(n, d)`` tensor of deltas from the global model
-> a pure aggregation rule -> (optional central DP) -> server step -> new global arrays.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from logging import ERROR, INFO, WARNING

import numpy as np
import torch
from fedshield.privacy.releases import OUTSIDE_KEY
from fedshield.server.aggregation import AggregationResult, build_aggregator
from fedshield.server.evaluation import (
    OUTSIDE_SOURCE,
    ClientResult,
    check_result,
    federated_evaluation,
    release_mode,
)
from fedshield.server.federation_state import (
    FederationState,
    HoldsFederation,
    RoundState,
    weighted_loss,
)
from fedshield.server.flat import flatten, stack, unflatten
from fedshield.server.report import node_label
from fedshield.server.screening import capped_weights, default_norm_bound, screen_updates
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedshield.errors import ConfigError, TooFewUpdates
from fedshield.records import (
    RELEASED_ROUNDS,
    Refusal,
    Rejected,
    ReplyLimits,
    array_views,
    decode_eval_reply,
    decode_train_reply,
    filed,
    npy_view,
    sender_problem,
)
from fedshield.schema import Config

__all__ = ["RoundState", "ShieldStrategy", "array_view", "to_numpy"]


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Read-only views of the server's own arrays on their serialized bytes: ``Array.numpy()``
    (np.load) copies every array, and the (n, d) stack copies them again. Client arrays go
    through fedshield.records' decoders instead, which validate them first."""
    return array_views(record)


def array_view(array: Array) -> np.ndarray:
    """A zero-copy view of a .npy payload (records.npy_view); raises ValueError when the payload
    is not a plain numeric .npy array, as np.load would."""
    try:
        return npy_view(array, "array")
    except Exception as exc:  # noqa: BLE001 — records' internal error: a ValueError for callers
        raise ValueError(str(exc)) from None


class ShieldStrategy(HoldsFederation, FedAvg):
    """FedAvg's hooks around screening, a robust rule (or central DP) and reputation.

    Flower's own ``Strategy.start`` drives the rounds. A resumed run sets
    ``federation.resume_after(done)`` first; the hooks then number rounds from ``done + 1``
    (sampling seeds, ledgers and metrics see the run's round, Flower's loop its own count).
    """

    def __init__(self, cfg: Config) -> None:
        fed = cfg.federation
        super().__init__(fraction_train=fed.fraction_train,
                         fraction_evaluate=fed.fraction_evaluate,
                         min_train_nodes=fed.min_clients,
                         min_evaluate_nodes=1 if fed.fraction_evaluate > 0 else 0,
                         min_available_nodes=fed.min_clients)
        self.cfg = cfg
        self.aggregator = build_aggregator(cfg.aggregation.rule, cfg.aggregation,
                                           fed.num_clients, cfg.seed)
        self.federation = FederationState(cfg)
        self.limits = ReplyLimits()
        self._global: ArrayRecord | None = None
        self._sent: list[Message] = []
        self._sent_eval: list[Message] = []
        self._round_no = 0

    # --- sampling ---------------------------------------------------------------------------
    def eligible_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes that may train (not quarantined, not out of budget)."""
        return self.federation.eligible(grid.get_node_ids())

    def _wait_for_nodes(self, grid: Grid) -> None:
        deadline = time.monotonic() + self.cfg.federation.round_timeout
        while len(list(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise TooFewUpdates(f"only {len(list(grid.get_node_ids()))} nodes connected "
                                    f"after {self.cfg.federation.round_timeout:.0f} s; "
                                    f"federation.min_clients = {self.min_available_nodes}")
            log(INFO, "Waiting for nodes: %d connected, %d needed",
                len(list(grid.get_node_ids())), self.min_available_nodes)
            time.sleep(1.0)

    def sample(self, grid: Grid, server_round: int, fraction: float) -> list[int]:
        """This round's cohort (node ids, sorted) for a phase sampling ``fraction``."""
        self._wait_for_nodes(grid)
        known = getattr(grid, "node_to_partition", None)
        if isinstance(known, dict):  # fedshield's in-process grid knows each node's partition
            self.federation.learn_partitions(known)
        eligible = self.eligible_nodes(grid)
        if len(eligible) < self.cfg.federation.min_clients:
            raise TooFewUpdates(
                f"only {len(eligible)} clients can still train (quarantined: "
                f"{len(self.reputation.quarantined) if self.reputation else 0}, out of privacy "
                f"budget: {len(self.exhausted)}); federation.min_clients = "
                f"{self.cfg.federation.min_clients}")
        # Central DP claims amplification for training's Poisson cohort at q only.
        k = min(len(eligible),
                max(self.cfg.federation.min_clients, round(len(eligible) * fraction)))
        positions = self.federation.sample_positions(len(eligible), k, server_round,
                                                     amplified=fraction == self.fraction_train)
        return [eligible[i] for i in positions]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample this round's cohort and send it the global model and the round config."""
        rnd = self.federation.run_round(server_round)
        self.federation.new_round()  # the round's clock starts before sampling waits
        self._global = arrays
        self.round.sampled = self.sample(grid, rnd, self.fraction_train)
        # Kept to name the node behind an error reply: the grid gives these their ids when it
        # sends them, and an error for an unreachable node comes from the SuperLink itself.
        self._sent = self._per_node_messages(arrays, {**dict(config), "server-round": rnd},
                                             self.round.sampled, MessageType.TRAIN)
        return self._sent

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Sample the evaluation cohort (none when fraction_evaluate is 0)."""
        if self.fraction_evaluate == 0.0:
            return []
        rnd = self.federation.run_round(server_round)
        nodes = self.sample(grid, rnd, self.fraction_evaluate)
        self._sent_eval = self._per_node_messages(arrays, {**dict(config), "server-round": rnd},
                                                  nodes, MessageType.EVALUATE)
        return self._sent_eval

    def _per_node_messages(self, arrays: ArrayRecord, config: dict, nodes: list[int],
                           message_type: str) -> list[Message]:
        """One message per node: the same global model (one ArrayRecord object, which the worker
        pool shares once), and the round config plus how many of this node's DP releases of
        this run the server received (its ledger must hold at least that many rounds)."""
        released = self.federation.released_rounds
        # One ConfigRecord per distinct count, shared like the model (read-only for the clients;
        # building and validating one per node cost more than a small client's training step)
        configs: dict[int, ConfigRecord] = {}
        for count in sorted({released.get(node, 0) for node in nodes}):
            configs[count] = ConfigRecord({**config, RELEASED_ROUNDS: count})
        return [msg for node in nodes for msg in self._construct_messages(
            RecordDict({"arrays": arrays, "config": configs[released.get(node, 0)]}), [node],
            message_type)]

    # --- decoding: every reply goes through fedshield.records -------------------------------
    @staticmethod
    def _routes(sent: list[Message]) -> dict[str, int]:
        """Message id -> destination node of the messages sent (built once per round's replies)."""
        return {m.metadata.message_id: m.metadata.dst_node_id for m in sent}

    @staticmethod
    def _sender(msg: Message, routes: dict[str, int]) -> int:
        """The node a reply belongs to: the destination of the message it answers (the grid's
        routing, not a field the client fills in), else the sender the transport recorded."""
        return int(routes.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id))

    def identity_problem(self, node: int, claim: int | None) -> Rejected | None:
        """Whether ``claim`` is consistent with what the federation knows of ``node``."""
        return self.federation.identity_problem(node, claim)

    def _decode_train_replies(self, replies: Iterable[Message],
                              reference: dict[str, np.ndarray]) -> list[int]:
        """Decode every reply; record refusals and rejections; return the nodes whose update
        can be screened (their reports are in ``self.round.reports``)."""
        usable: list[int] = []
        routes = self._routes(self._sent)
        for msg in replies:
            node = self._sender(msg, routes)
            answered = {*self.round.reports, *self.round.refused, *self.round.rejected}
            problem = sender_problem(node, answered, self.round.sampled,
                                     second="a second reply for the same round",
                                     not_asked="this node was not sampled this round")
            if problem is not None:
                self.round.rejected[node] = str(problem)
                if problem.code == "duplicate":  # neither answer is used
                    self.round.reports.pop(node, None)
                    usable = [n for n in usable if n != node]
                continue
            decoded = decode_train_reply(msg, reference, self.limits)
            if isinstance(decoded, Rejected):
                self.round.rejected[node] = str(decoded)
                continue
            problem = self.identity_problem(node, decoded.partition_id)
            if isinstance(decoded, Refusal):
                # A refusal's partition claim is only a label: ignore a false one, keep the refusal.
                self.federation.note_refusal(node, decoded.code, decoded.reason)
                continue
            if problem is not None and self.federation.partitions_known:  # a lie about a known id
                self.round.rejected[node] = str(problem)
                continue
            if problem is not None:
                # First claimant wins a label on a SuperLink; rejecting a later honest claimant's
                # update would let any node lock another out, so only the claim is dropped.
                self.round.ignored_claims[node] = str(problem)
                log(WARNING, "round %d: %s: partition claim ignored: %s", self._round_no,
                    node_label(node, self.node_partition), problem)
            self.round.reports[node] = decoded
            usable.append(node)
        return usable

    def screening_config(self, reference: dict[str, np.ndarray]):
        """The configured screening, with the absolute norm bound that holds for any n: the
        configured screening.max_norm, or (0) a default from the global model's scale."""
        scr = self.cfg.screening
        if scr.enabled and scr.max_norm <= 0:
            return replace(scr, max_norm=default_norm_bound(reference))
        return scr

    # --- aggregation ------------------------------------------------------------------------
    def _fail_round(self, server_round: int, reason: str) -> tuple[None, MetricRecord]:
        """The round produced no new global model; the reason goes to the metrics line."""
        self.round.skipped = reason
        log(WARNING, "round %d failed: %s", server_round, reason)
        return None, self._train_metrics()

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode, screen and aggregate the round's replies into the new global model."""
        assert self._global is not None, "configure_train runs before aggregate_train"
        server_round = self.federation.run_round(server_round)
        reference = to_numpy(self._global)
        names = list(reference)
        self._round_no = server_round
        nodes = self._decode_train_replies(replies, reference)
        self.federation.note_released(n for n, r in self.round.reports.items() if r.dp is not None)
        updates = [self.round.reports[n].arrays for n in nodes]
        screening = self.screening_config(reference)
        kept, rejections = screen_updates(updates, reference, screening, nodes,
                                          relative_to_reference=True)
        self.round.rejected.update({r.client: r.reason for r in rejections})
        for node, reason in self.round.rejected.items():
            log(WARNING, "round %d: rejected update from %s: %s", server_round,
                node_label(node, self.node_partition), reason)
        for node, reason in self.round.refused.items():
            log(WARNING, "round %d: %s refused to train: %s", server_round,
                node_label(node, self.node_partition), reason)
        # Reports of screened-out updates stay: their privacy events were spent all the same.
        self.round.accepted = [nodes[i] for i in kept]
        # Under central DP the cohort is Poisson (accounted as such) and the noisy mean has a fixed
        # denominator, so any non-empty cohort may be aggregated; requiring min_clients there
        # would fail most rounds of a small q.
        minimum = 1 if self.cfg.central_dp.enabled else self.cfg.federation.min_clients
        if len(kept) < minimum:
            self._update_reputation(server_round, [], torch.zeros(0))
            self.round.accepted = []
            return self._fail_round(
                server_round, f"only {len(kept)} accepted update(s), federation.min_clients = "
                f"{minimum}; the global model is unchanged (rejections: "
                f"{self.round.rejected_codes or 'none'}, refusals: {len(self.round.refused)})")

        global_flat = torch.from_numpy(flatten(reference, names))
        deltas = torch.from_numpy(stack([updates[i] for i in kept], names))
        deltas -= global_flat  # in place: no second (n, d) buffer
        weights = self._weights(self.round.accepted)
        try:
            result = self._aggregate(deltas, weights)
        except (ConfigError, ValueError) as exc:  # e.g. too few survivors for the rule's f
            self._update_reputation(server_round, [], torch.zeros(0))
            return self._fail_round(server_round, f"aggregation refused: {exc}")
        self.round.aggregation_info = {**result.info, "norm_bound": float(screening.max_norm)}
        step, momentum = self.federation.step(result.update.float())
        arrays = unflatten((global_flat + step).numpy(), reference)  # cast to the model's dtypes
        if not all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f"):
            # Never release or save a non-finite model; the momentum step is not taken either.
            self._update_reputation(server_round, [], torch.zeros(0))
            log(ERROR, "round %d: the aggregate is not finite", server_round)
            return self._fail_round(server_round, "non-finite aggregate: the global model is "
                                    "unchanged")
        self.federation.commit_momentum(momentum)
        self._update_reputation(server_round, self.round.accepted, result.suspicion)
        return self._record(arrays), self._train_metrics()

    def _weights(self, accepted: list[int]) -> torch.Tensor:
        """FedAvg weights: the clients' example counts, capped (screening.capped_weights) so no
        claim can capture the mean; uniform when any accepted client withheld its count."""
        claims = [self.round.reports[n].num_examples for n in accepted]
        if all(c is not None for c in claims):
            weights = capped_weights(np.array(claims, dtype=np.float64))
        else:
            weights = np.ones(len(accepted))
        self.round.weights = dict(zip(accepted, weights.tolist(), strict=True))
        return torch.from_numpy(weights)

    def _aggregate(self, deltas: torch.Tensor, weights: torch.Tensor) -> AggregationResult:
        """The configured rule, or under central DP the noisy clipped mean it was checked to be."""
        central = self.federation.central
        if central is None:
            return self.aggregator(deltas, weights, None)
        return central.aggregate(deltas)

    def _update_reputation(self, server_round: int, accepted: list[int],
                           suspicion: torch.Tensor) -> None:
        if self.reputation is None:
            return
        self.round.newly_quarantined = self.reputation.update(
            # A rule's NaN score (degenerate input) counts as fully suspicious, never a crash.
            server_round, accepted, suspicion.double().nan_to_num(1.0).clamp(0, 1).tolist(),
            rejected=list(self.round.rejected))
        for node in self.round.newly_quarantined:
            log(WARNING, "round %d: %s quarantined (suspicion %.2f)", server_round,
                node_label(node, self.node_partition),
                self.reputation.scores.get(node, float("nan")))

    @staticmethod
    def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
        return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v))
                            for k, v in arrays.items()})

    def _train_metrics(self) -> MetricRecord:
        reports = self.round.reports
        out: dict[str, MetricRecordValues] = {
            "accepted": len(self.round.accepted), "rejected": len(self.round.rejected),
            "refused": len(self.round.refused)}
        accepted = [n for n in self.round.accepted if n in reports]
        loss = weighted_loss([reports[n].train_loss for n in accepted],
                             [self.round.weights.get(n, 1.0) for n in accepted])
        if loss is not None:
            out["train-loss"] = loss
        eps = [r.epsilon for r in reports.values() if r.epsilon is not None]
        if eps:
            out["epsilon-max"] = max(eps)
            out["epsilon-mean"] = float(np.mean(eps))
        self.round.train = dict(out)  # the round record's training metrics
        return MetricRecord(out)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """The round's federated evaluation: each reply decoded at the boundary (a malformed or
        unsolicited one is rejected with its reason and the round goes on), checked against the
        run's release mode (server/evaluation.py), and summarised per client (partition ids) in
        ``round.evaluation``; returns the example-weighted mean accuracy and loss."""
        server_round = self.federation.run_round(server_round)
        privacy = self.cfg.privacy
        mode = release_mode(privacy.enabled, privacy.release_stats)
        results: dict[int, ClientResult] = {}
        rejected: dict[int, str] = {}
        refused: dict[int, str] = {}
        asked = {m.metadata.dst_node_id for m in self._sent_eval}
        routes = self._routes(self._sent_eval)
        for msg in replies:
            node = self._sender(msg, routes)
            problem = sender_problem(node, {*results, *rejected, *refused}, asked,
                                     second="a second evaluation reply in the same round",
                                     not_asked="this node was not asked to evaluate")
            if problem is not None:
                rejected[node] = str(problem)
                if problem.code == "duplicate":  # neither answer is used
                    results.pop(node, None)
                continue
            decoded = filed(decode_eval_reply(msg, self.limits), node, refused, rejected)
            if decoded is None:
                continue
            problem = self.identity_problem(node, decoded.partition_id)
            checked = check_result(decoded.accuracy, decoded.loss, decoded.num_examples,
                                   decoded.extra, mode=mode,
                                   noise_multiplier=privacy.eval_noise_multiplier,
                                   loss_clip=privacy.eval_loss_clip)
            if problem is not None:
                rejected[node] = str(problem)
            elif isinstance(checked, str):
                rejected[node] = checked
            else:
                results[node] = checked
        for node, reason in rejected.items():
            log(WARNING, "round %d: evaluation reply of node %d rejected: %s", server_round,
                node, reason)
        label = self.node_partition.get
        self.round.evaluation = federated_evaluation(
            {str(label(n, n)): r for n, r in sorted(results.items())}, server_round=server_round,
            mode=mode, noise_multiplier=privacy.eval_noise_multiplier if privacy.enabled else None,
            loss_clip=privacy.eval_loss_clip if privacy.enabled else None,
            rejected={str(label(n, n)): r for n, r in rejected.items()},
            refused={str(label(n, n)): r for n, r in refused.items()})
        self.round.client_eval = {}
        if not results:
            return None
        reports = list(results.values())
        counts = [r.num_examples for r in reports]
        w = capped_weights(np.array(counts, np.float64)) if all(c is not None for c in counts) \
            else np.ones(len(reports))
        mean = lambda xs: float(np.dot(w, xs) / w.sum())  # noqa: E731
        out: dict[str, MetricRecordValues] = {
            "accuracy": mean([r.accuracy for r in reports]),
            "loss": mean([r.loss for r in reports]), "num-clients": len(reports)}
        if mode == OUTSIDE_SOURCE:  # exact values sent by opt-in
            out[OUTSIDE_KEY] = 1.0
        self.round.client_eval = dict(out)
        return MetricRecord(out)

    # --- state for checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict:
        """The federation's state plus the rule's (e.g. FLTrust's or FLAME's memory)."""
        return {"aggregator": self.aggregator.state_dict(), **self.federation.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.aggregator.load_state_dict(state["aggregator"])
        self.federation.load_state_dict(state)
