"""The federation's state across rounds, shared by both strategies (plain and SecAgg+).

Both run modes sample clients, learn node -> partition labels, track clients out of privacy
budget, keep server momentum, run central DP and checkpoint the same state; this module holds
that once. The strategies keep only what differs: how replies arrive (Message API or Flower's
legacy SecAgg+ workflow) and how they are aggregated.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from fedshield.server.central_dp import CentralDP
from fedshield.server.reputation import Reputation

from fedshield.records import Rejected, TrainReport
from fedshield.run_records import FederatedEvaluation
from fedshield.schema import AggregationConfig, Config


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


def server_step(update: torch.Tensor, buffer: torch.Tensor | None,
                agg: AggregationConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(step to add to the global weights, new momentum buffer): server lr and momentum."""
    if agg.server_momentum > 0:
        buffer = update if buffer is None else agg.server_momentum * buffer + update
        update = buffer
    return agg.server_lr * update, buffer


def fixed_size_sample(num_eligible: int, k: int, seed: int, server_round: int) -> list[int]:
    """Sorted positions of ``k`` of ``num_eligible`` clients, drawn from the run seed (a run is
    reproducible; no amplification is claimed for this sampler). Positions, not ids: node ids
    are 64-bit and numpy would not keep them exact."""
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(i) for i in rng.choice(num_eligible, size=k, replace=False))


def weighted_loss(losses: list[float | None], weights: list[float]) -> float | None:
    """The weighted mean training loss, or None when there is none or a client withheld its."""
    known = [x for x in losses if x is not None]
    if not losses or len(known) < len(losses):
        return None
    return float(np.dot(weights, known) / sum(weights))


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
    # The round's aggregated client metrics (training, client-side evaluation) and its start.
    train: dict = field(default_factory=dict)
    client_eval: dict = field(default_factory=dict)
    evaluation: FederatedEvaluation | None = None  # the per-client distribution (server/evaluation)
    started: float = field(default_factory=time.perf_counter)
    # Seconds of the round spent in message exchanges (push to last reply: Flower's transport
    # and polling, the clients' work); the rest of the round is the server's own.
    exchange_seconds: float = 0.0

    @property
    def rejected_codes(self) -> dict[str, int]:
        """How many rejections of each code this round had (sorted by code)."""
        codes: dict[str, int] = {}
        for reason in self.rejected.values():
            codes[reason_code(reason)] = codes.get(reason_code(reason), 0) + 1
        return dict(sorted(codes.items()))

    def record(self, server_round: int, server_eval: dict) -> dict:
        """The round record RunRecorder turns into a metrics line (see server/recording.py)."""
        seconds = time.perf_counter() - self.started
        return {"round": server_round, "train": dict(self.train),
                "client_eval": dict(self.client_eval), "server_eval": dict(server_eval),
                "state": self, "seconds": seconds,
                "server_seconds": max(seconds - self.exchange_seconds, 0.0)}


class FederationState:
    """Sampling, identities, budgets, reputation, momentum and central DP across rounds.

    ``round_offset`` is how many rounds a resumed run had already done: Flower's loops count
    each segment from 1, the run's rounds (seeds, ledgers, metrics) continue from the offset.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        rep = cfg.reputation
        self.reputation = Reputation.from_config(rep) if rep.enabled else None
        self.exhausted: dict[int, str] = {}  # node -> the budget refusal it sent
        # The node id is a client's identity; its partition id is a label, learned once (or
        # given by the grid) and never taken from a claim that collides with another node's.
        self.node_partition: dict[int, int] = {}
        self.partitions_known = False  # True when the grid told us every node's partition
        self.server_momentum: torch.Tensor | None = None
        self.central = CentralDP(cfg) if cfg.central_dp.enabled else None
        self.round = RoundState()
        self.round_offset = 0
        # Node -> rounds of this run in which it sent a DP-released update: each such client's
        # ledger must hold at least that many of the run's rounds (a lost ledger is refused,
        # a client that merely missed rounds is not).
        self.released_rounds: dict[int, int] = {}

    # --- rounds ----------------------------------------------------------------------------
    def resume_after(self, done: int) -> None:
        """Continue a run that completed ``done`` rounds: the next segment's round 1 is done + 1."""
        self.round_offset = done

    def run_round(self, segment_round: int) -> int:
        """The run's round number of a Flower loop's ``segment_round`` (counted from 1)."""
        return segment_round + self.round_offset

    def new_round(self, sampled: list[int] | None = None) -> RoundState:
        """Start a round's record (its clock starts now)."""
        self.round = RoundState(sampled=list(sampled or []))
        return self.round

    def note_exchange(self, seconds: float) -> None:
        """A message exchange of the current round took ``seconds`` (server/prompt_grid.py)."""
        self.round.exchange_seconds += seconds

    # --- sampling --------------------------------------------------------------------------
    def eligible(self, node_ids) -> list[int]:
        """The nodes that may train: connected, not quarantined, not out of budget (sorted)."""
        quarantined = self.reputation.quarantined if self.reputation else set()
        return sorted(int(n) for n in node_ids
                      if n not in quarantined and n not in self.exhausted)

    def sample_positions(self, num_eligible: int, k: int, server_round: int,
                         amplified: bool) -> list[int]:
        """Positions of this round's cohort among the eligible clients: central DP's Poisson
        sampler where amplification is claimed (``amplified``), else ``k`` seeded draws."""
        if amplified and self.central is not None:
            return self.central.sample(num_eligible, server_round)
        return fixed_size_sample(num_eligible, k, self.cfg.seed, server_round)

    def learn_partitions(self, known: dict) -> None:
        """An authoritative node -> partition mapping (fedshield's in-process grid): trusted
        over anything a client says."""
        self.node_partition.update({int(n): int(p) for n, p in known.items()})
        self.partitions_known = True

    def identity_problem(self, node: int, claim: int | None) -> Rejected | None:
        """:func:`identity_problem` against this federation's labels."""
        return identity_problem(self.node_partition, node, claim)

    def note_refusal(self, node: int, code: str, reason: str) -> None:
        """A client refused to train; a spent budget also keeps it out of later rounds."""
        self.round.refused[node] = f"{code}: {reason}"
        if code == "budget-exhausted":
            self.exhausted[node] = reason

    def note_released(self, nodes: Iterable[int]) -> None:
        """These nodes' updates of this round carried a DP event: their ledgers recorded it."""
        for node in nodes:
            self.released_rounds[node] = self.released_rounds.get(node, 0) + 1

    # --- the server step -------------------------------------------------------------------
    def step(self, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(step to take, momentum buffer after it); :meth:`commit_momentum` keeps the buffer
        once the new model is known to be finite."""
        return server_step(update, self.server_momentum, self.cfg.aggregation)

    def commit_momentum(self, buffer: torch.Tensor | None) -> None:
        """Keep the momentum buffer of a step that was taken."""
        self.server_momentum = buffer

    def user_level_epsilon(self, rounds: int) -> float | None:
        """Central DP's user-level epsilon after ``rounds`` rounds (None without central DP)."""
        return self.central.epsilon(rounds) if self.central is not None else None

    # --- state for checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint keeps (tensors go to its safetensors file)."""
        return {"reputation": self.reputation.state_dict() if self.reputation else None,
                "exhausted": {str(k): v for k, v in self.exhausted.items()},
                "node_partition": {str(k): v for k, v in self.node_partition.items()},
                "server_momentum": self.server_momentum,
                "dp_generator": self.central.state_dict() if self.central else None,
                "released_rounds": {str(k): v for k, v in self.released_rounds.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        if self.reputation and state.get("reputation") is not None:
            self.reputation.load_state_dict(state["reputation"])
        self.exhausted = {int(k): v for k, v in state["exhausted"].items()}
        self.node_partition = {int(k): v for k, v in state["node_partition"].items()}
        self.server_momentum = state.get("server_momentum")
        # absent in checkpoints written before it was kept: nothing known, nothing required
        self.released_rounds = {int(k): int(v)
                                for k, v in state.get("released_rounds", {}).items()}
        if self.central is not None and state.get("dp_generator") is not None:
            self.central.load_state_dict(state["dp_generator"])


class HoldsFederation:
    """Mixin: a strategy's view of the one :class:`FederationState` it holds.

    Gives RunRecorder (server/recording.py, ``RecordedStrategy``) and callers the attributes
    they read, without copying state into the strategy.
    """

    federation: FederationState

    @property
    def round(self) -> RoundState:
        """This round's record."""
        return self.federation.round

    @property
    def node_partition(self) -> dict[int, int]:
        """Node id -> partition label, as learned."""
        return self.federation.node_partition

    @property
    def reputation(self) -> Reputation | None:
        """The reputation tracker (None when off)."""
        return self.federation.reputation

    @property
    def exhausted(self) -> dict[int, str]:
        """Nodes out of privacy budget -> their refusal."""
        return self.federation.exhausted

    @property
    def server_momentum(self) -> torch.Tensor | None:
        """The server momentum buffer (None before the first step or without momentum)."""
        return self.federation.server_momentum

    def user_level_epsilon(self, rounds: int) -> float | None:
        """Central DP's user-level epsilon after ``rounds`` rounds (None without central DP)."""
        return self.federation.user_level_epsilon(rounds)
