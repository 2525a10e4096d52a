"""ShieldStrategy: Flower's FedAvg message plumbing around fedshield's screening, robust rules,
central DP and reputation.

The adapter is thin: replies -> screened -> one ``(n, d)`` tensor of deltas from the global model
-> a pure aggregation rule -> (optional central DP) -> server step -> new global arrays.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from logging import ERROR, INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fedshield.schema import AggregationConfig, Config
from fedshield.errors import ConfigError, TooFewUpdates
from fedshield.records import (EvalReport, Refusal, Rejected, ReplyLimits, TrainReport,
                               decode_eval_reply, decode_train_reply, npy_view)
from privacy.central import (add_central_noise, clip_updates, expected_clients,
                             fixed_denominator_mean, noise_generator, poisson_sample,
                             sampling_rng, user_level_epsilon)
from privacy.releases import OUTSIDE_KEY
from server.aggregation import AggregationResult, build_aggregator
from server.reputation import Reputation
from server.flat import flatten, stack, unflatten
from server.screening import capped_weights, default_norm_bound, screen_updates

# Called after each round with (round, global arrays, round record); used for checkpoints,
# metrics lines and progress display.
RoundCallback = Callable[[int, ArrayRecord, dict], None]


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Read-only views of the server's own arrays on their serialized bytes: ``Array.numpy()``
    (np.load) copies every array, and the (n, d) stack copies them again. Client arrays go
    through fedshield.records instead, which validates them first."""
    return {k: array_view(v) for k, v in record.items()}


def array_view(array: Array) -> np.ndarray:
    """A zero-copy view of a .npy payload (records.npy_view); raises ValueError when the payload
    is not a plain numeric .npy array, as np.load would."""
    try:
        return npy_view(array, "array")
    except Exception as exc:  # records' internal error: a ValueError for callers
        raise ValueError(str(exc)) from None


def server_step(update: torch.Tensor, buffer: torch.Tensor | None,
                agg: AggregationConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(step to add to the global weights, new momentum buffer): server lr and momentum."""
    if agg.server_momentum > 0:
        buffer = update if buffer is None else agg.server_momentum * buffer + update
        update = buffer
    return agg.server_lr * update, buffer


def reason_code(reason: str) -> str:
    """The short code a rejection or refusal reason starts with ("code: detail")."""
    return reason.split(": ", 1)[0]


def identity_problem(node_partition: dict[int, int], node: int,
                     claim: int | None) -> Rejected | None:
    """None when ``claim`` (a reply's partition id) is consistent with ``node_partition`` (node id
    -> partition label); learns the label the first time. The node id is the identity: a claim
    that differs from the node's known partition, or names another node's, is refused."""
    if claim is None:
        return None
    known = node_partition.get(node)
    if known is not None:
        if claim != known:
            return Rejected("identity", f"claims partition-id {claim}, but this node is "
                            f"partition {known}")
        return None
    if claim in node_partition.values():
        return Rejected("identity", f"claims partition-id {claim}, which belongs to another node")
    node_partition[node] = claim
    return None


@dataclass
class RoundState:
    """What one round's aggregation did; becomes part of the round's metrics line."""

    sampled: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)  # node -> "code: detail"
    refused: dict[int, str] = field(default_factory=dict)
    newly_quarantined: list[int] = field(default_factory=list)
    reports: dict[int, TrainReport] = field(default_factory=dict)  # decoded, valid replies
    weights: dict[int, float] = field(default_factory=dict)  # FedAvg weight of accepted nodes
    aggregation_info: dict[str, float] = field(default_factory=dict)
    skipped: str = ""  # why the round failed (no new global model); "" when it aggregated
    # Partition claims the server did not believe (no authoritative mapping): the update counts,
    # the label is not taken.
    ignored_claims: dict[int, str] = field(default_factory=dict)

    @property
    def rejected_codes(self) -> dict[str, int]:
        codes: dict[str, int] = {}
        for reason in self.rejected.values():
            codes[reason_code(reason)] = codes.get(reason_code(reason), 0) + 1
        return dict(sorted(codes.items()))


class ShieldStrategy(FedAvg):
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
        rep = cfg.reputation
        self.reputation = Reputation.from_config(rep) if rep.enabled else None
        self.exhausted: dict[int, str] = {}  # node -> the budget refusal it sent
        # The node id is a client's identity; its partition id is a label, learned once (or
        # given by the grid) and never taken from a claim that collides with another node's.
        self.node_partition: dict[int, int] = {}
        self.partitions_known = False  # True when the grid told us every node's partition
        self.limits = ReplyLimits()
        self.server_momentum: torch.Tensor | None = None
        self.dp_generator = noise_generator(cfg.central_dp, cfg.seed)  # OS CSPRNG unless opted out
        self._global: ArrayRecord | None = None
        self._sent: list[Message] = []
        self._sent_eval: list[Message] = []
        self._round_no = 0
        self.round = RoundState()

    # --- sampling ---------------------------------------------------------------------------
    def eligible_nodes(self, grid: Grid) -> list[int]:
        quarantined = self.reputation.quarantined if self.reputation else set()
        return sorted(n for n in grid.get_node_ids()
                      if n not in quarantined and n not in self.exhausted)

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
        self._wait_for_nodes(grid)
        self._learn_grid_partitions(grid)
        eligible = self.eligible_nodes(grid)
        if len(eligible) < self.cfg.federation.min_clients:
            raise TooFewUpdates(
                f"only {len(eligible)} clients can still train (quarantined: "
                f"{len(self.reputation.quarantined) if self.reputation else 0}, out of privacy "
                f"budget: {len(self.exhausted)}); federation.min_clients = "
                f"{self.cfg.federation.min_clients}")
        if self.cfg.central_dp.enabled and fraction == self.fraction_train:
            # Poisson at q, as accounted: a variable cohort, never topped up to min_clients.
            rng = sampling_rng(self.cfg.central_dp, self.cfg.seed, server_round)
            return sorted(eligible[i] for i in poisson_sample(len(eligible), fraction, rng))
        k = min(len(eligible), max(self.cfg.federation.min_clients, round(len(eligible) * fraction)))
        rng = np.random.default_rng([self.cfg.seed, server_round])
        # Sample positions, not ids: node ids are 64-bit and numpy would not keep them exact.
        return sorted(eligible[i] for i in rng.choice(len(eligible), size=k, replace=False))

    def _learn_grid_partitions(self, grid: Grid) -> None:
        """fedshield's in-process grid knows each node's partition from its node config: trust
        that over anything a client says."""
        known = getattr(grid, "node_to_partition", None)
        if isinstance(known, dict):
            self.node_partition.update({int(n): int(p) for n, p in known.items()})
            self.partitions_known = True

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays
        nodes = self.sample(grid, server_round, self.fraction_train)
        self.round = RoundState(sampled=nodes)
        config["server-round"] = server_round
        record = RecordDict({"arrays": arrays, "config": config})
        # Kept to name the node behind an error reply: the grid gives these their ids when it
        # sends them, and an error for an unreachable node comes from the SuperLink itself.
        self._sent = list(self._construct_messages(record, nodes, MessageType.TRAIN))
        return self._sent

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self.sample(grid, server_round, self.fraction_evaluate)
        config["server-round"] = server_round
        record = RecordDict({"arrays": arrays, "config": config})
        self._sent_eval = list(self._construct_messages(record, nodes, MessageType.EVALUATE))
        return self._sent_eval

    # --- decoding: every reply goes through fedshield.records -------------------------------
    def _sender(self, msg: Message, sent: list[Message]) -> int:
        """The node a reply belongs to: the destination of the message it answers (the grid's
        routing, not a field the client fills in), else the sender the transport recorded."""
        by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        return int(by_id.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id))

    def identity_problem(self, node: int, claim: int | None) -> Rejected | None:
        return identity_problem(self.node_partition, node, claim)

    def _decode_train_replies(self, replies: Iterable[Message],
                              reference: dict[str, np.ndarray]) -> list[int]:
        """Decode every reply; record refusals and rejections; return the nodes whose update
        can be screened (their reports are in ``self.round.reports``)."""
        usable: list[int] = []
        for msg in replies:
            node = self._sender(msg, self._sent)
            if node in self.round.reports or node in self.round.refused \
                    or node in self.round.rejected:
                self.round.rejected[node] = "duplicate: a second reply for the same round"
                self.round.reports.pop(node, None)
                usable = [n for n in usable if n != node]
                continue
            if self.round.sampled and node not in self.round.sampled:
                self.round.rejected[node] = "unsolicited: this node was not sampled this round"
                continue
            decoded = decode_train_reply(msg, reference, self.limits)
            if isinstance(decoded, Rejected):
                self.round.rejected[node] = str(decoded)
                continue
            problem = self.identity_problem(node, decoded.partition_id)
            if isinstance(decoded, Refusal):
                # A refusal's partition claim is only a label: ignore a false one, keep the refusal.
                self.round.refused[node] = f"{decoded.code}: {decoded.reason}"
                if decoded.code == "budget-exhausted":
                    self.exhausted[node] = decoded.reason
                continue
            if problem is not None and self.partitions_known:  # a lie about a known identity
                self.round.rejected[node] = str(problem)
                continue
            if problem is not None:
                # First claimant wins a label on a SuperLink; rejecting a later honest claimant's
                # update would let any node lock another out, so only the claim is dropped.
                self.round.ignored_claims[node] = str(problem)
                log(WARNING, "round %d: node %d: partition claim ignored: %s", self._round_no,
                    node, problem)
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
        assert self._global is not None, "configure_train runs before aggregate_train"
        reference = to_numpy(self._global)
        names = list(reference)
        self._round_no = server_round
        nodes = self._decode_train_replies(replies, reference)
        updates = [self.round.reports[n].arrays for n in nodes]
        screening = self.screening_config(reference)
        kept, rejections = screen_updates(updates, reference, screening, nodes,
                                          relative_to_reference=True)
        self.round.rejected.update({r.client: r.reason for r in rejections})
        for node, reason in self.round.rejected.items():
            log(WARNING, "round %d: rejected update from node %d: %s", server_round, node, reason)
        for node, reason in self.round.refused.items():
            log(WARNING, "round %d: node %d refused to train: %s", server_round, node, reason)
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
        step, momentum = server_step(result.update.float(), self.server_momentum,
                                     self.cfg.aggregation)
        arrays = unflatten((global_flat + step).numpy(), reference)  # cast to the model's dtypes
        if not all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f"):
            # Never release or save a non-finite model; the momentum step is not taken either.
            self._update_reputation(server_round, [], torch.zeros(0))
            log(ERROR, "round %d: the aggregate is not finite", server_round)
            return self._fail_round(server_round, "non-finite aggregate: the global model is "
                                    "unchanged")
        self.server_momentum = momentum
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
        self.round.weights = dict(zip(accepted, weights.tolist()))
        return torch.from_numpy(weights)

    def _aggregate(self, deltas: torch.Tensor, weights: torch.Tensor) -> AggregationResult:
        """The configured rule, or under central DP the noisy clipped mean it was checked to be."""
        cdp = self.cfg.central_dp
        if not cdp.enabled:
            return self.aggregator(deltas, weights, None)
        # Config validation allowed only rules that are a mean of clipped updates ("fedavg",
        # "clip"): clip with the central-DP bound, fixed denominator, noise on the sum.
        clipped, n_clipped = clip_updates(deltas, cdp.clip_norm)  # float64: norms <= C exactly
        expected = expected_clients(self.fraction_train, self.cfg.federation.num_clients)
        mean = fixed_denominator_mean(clipped, expected)
        noisy = add_central_noise(mean, cdp.clip_norm, cdp.noise_multiplier, expected,
                                  self.dp_generator)
        # No per-client evidence leaves the DP mechanism; reputation sees screening rejections only.
        suspicion = torch.zeros(len(deltas), dtype=torch.float64)
        return AggregationResult(noisy, suspicion, {"clipped": float(n_clipped)})

    def user_level_epsilon(self, rounds: int) -> float | None:
        cdp = self.cfg.central_dp
        if not cdp.enabled:
            return None
        # The Poisson rate sample() draws with: the accounted rate is the sampler's.
        return user_level_epsilon(cdp.noise_multiplier, self.fraction_train, rounds, cdp.delta,
                                  cdp.accountant)

    def _update_reputation(self, server_round: int, accepted: list[int],
                           suspicion: torch.Tensor) -> None:
        if self.reputation is None:
            return
        self.round.newly_quarantined = self.reputation.update(
            # A rule's NaN score (degenerate input) counts as fully suspicious, never a crash.
            server_round, accepted, suspicion.double().nan_to_num(1.0).clamp(0, 1).tolist(),
            rejected=list(self.round.rejected))
        for node in self.round.newly_quarantined:
            log(WARNING, "round %d: node %d quarantined (suspicion %.2f)", server_round, node,
                self.reputation.scores.get(node, float("nan")))

    @staticmethod
    def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
        return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v))
                            for k, v in arrays.items()})

    def _train_metrics(self) -> MetricRecord:
        reports = self.round.reports
        out = {"accepted": len(self.round.accepted), "rejected": len(self.round.rejected),
               "refused": len(self.round.refused)}
        accepted = [n for n in self.round.accepted if n in reports]
        losses = [reports[n].train_loss for n in accepted]
        if accepted and all(x is not None for x in losses):
            w = [self.round.weights.get(n, 1.0) for n in accepted]
            out["train-loss"] = float(np.dot(w, losses) / sum(w))
        eps = [r.epsilon for r in reports.values() if r.epsilon is not None]
        if eps:
            out["epsilon-max"] = max(eps)
            out["epsilon-mean"] = float(np.mean(eps))
        return MetricRecord(out)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted mean accuracy and loss of the valid evaluation replies (decoded like
        training replies; a malformed one is logged and left out)."""
        reports: list[tuple[int, EvalReport]] = []
        for msg in replies:
            node = self._sender(msg, self._sent_eval)
            decoded = decode_eval_reply(msg, self.limits)
            if isinstance(decoded, Rejected):
                log(WARNING, "round %d: evaluation reply of node %d rejected: %s", server_round,
                    node, decoded)
            elif isinstance(decoded, EvalReport) and \
                    self.identity_problem(node, decoded.partition_id) is None:
                reports.append((node, decoded))
        reports = [(n, r) for n, r in reports if r.accuracy is not None and r.loss is not None]
        if not reports:
            return None
        counts = [r.num_examples for _, r in reports]
        w = capped_weights(np.array(counts, np.float64)) if all(c is not None for c in counts) \
            else np.ones(len(reports))
        mean = lambda xs: float(np.dot(w, xs) / w.sum())  # noqa: E731
        out = {"accuracy": mean([r.accuracy for _, r in reports]),
               "loss": mean([r.loss for _, r in reports]), "num-clients": len(reports)}
        if any(r.extra.get(OUTSIDE_KEY) for _, r in reports):  # exact values sent by opt-in
            out[OUTSIDE_KEY] = 1.0
        return MetricRecord(out)

    # --- state for checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"aggregator": self.aggregator.state_dict(),
                "reputation": self.reputation.state_dict() if self.reputation else None,
                "exhausted": {str(k): v for k, v in self.exhausted.items()},
                "node_partition": {str(k): v for k, v in self.node_partition.items()},
                "server_momentum": self.server_momentum,
                "dp_generator": self.dp_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.aggregator.load_state_dict(state["aggregator"])
        if self.reputation and state.get("reputation") is not None:
            self.reputation.load_state_dict(state["reputation"])
        self.exhausted = {int(k): v for k, v in state["exhausted"].items()}
        self.node_partition = {int(k): v for k, v in state["node_partition"].items()}
        self.server_momentum = state.get("server_momentum")
        self.dp_generator.set_state(state["dp_generator"])

    # --- the round loop ---------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,  # type: ignore[override]
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              start_round: int = 1, on_round: RoundCallback | None = None) -> Result:
        """Flower's round loop, plus resuming at ``start_round`` and a per-round callback."""
        result = Result()
        arrays = initial_arrays
        result.arrays = arrays
        for rnd in range(start_round, num_rounds + 1):
            started = time.perf_counter()
            replies = grid.send_and_receive(
                self.configure_train(rnd, arrays, ConfigRecord(dict(train_config or {})), grid),
                timeout=timeout)
            new_arrays, train_metrics = self.aggregate_train(rnd, replies)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[rnd] = train_metrics
            client_eval = self.aggregate_evaluate(rnd, grid.send_and_receive(
                self.configure_evaluate(rnd, arrays, ConfigRecord(dict(evaluate_config or {})),
                                        grid), timeout=timeout))
            if client_eval is not None:
                result.evaluate_metrics_clientapp[rnd] = client_eval
            server_eval = evaluate_fn(rnd, arrays) if evaluate_fn else None
            if server_eval is not None:
                result.evaluate_metrics_serverapp[rnd] = server_eval
            record = {"round": rnd, "train": dict(train_metrics or {}),
                      "client_eval": dict(client_eval or {}), "server_eval": dict(server_eval or {}),
                      "state": self.round, "seconds": time.perf_counter() - started}
            if on_round is not None:
                on_round(rnd, arrays, record)
        return result
