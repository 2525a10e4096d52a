"""ShieldStrategy: Flower's FedAvg message plumbing around fedshield's screening, robust rules,
central DP and reputation.

The adapter is thin: replies -> screened -> one ``(n, d)`` tensor of deltas from the global model
-> a pure aggregation rule -> (optional central DP) -> server step -> new global arrays.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fedshield.config import AggregationConfig, Config
from fedshield.errors import ConfigError, TooFewUpdates
from privacy.central import (add_central_noise, clip_updates, expected_clients,
                             fixed_denominator_mean, noise_generator, poisson_sample,
                             sampling_rng, user_level_epsilon)
from server.aggregation import AggregationResult, build_aggregator
from server.reputation import Reputation
from server.flat import flatten, stack, unflatten
from server.screening import screen_updates

# Called after each round with (round, global arrays, round record); used for checkpoints,
# metrics lines and progress display.
RoundCallback = Callable[[int, ArrayRecord, dict], None]


NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Read-only views of the record's arrays on their serialized bytes: ``Array.numpy()``
    (np.load) copies every array, and the (n, d) stack copies them again."""
    return {k: array_view(v) for k, v in record.items()}


def array_view(array: Array) -> np.ndarray:
    """A zero-copy view of a plain .npy payload; anything else goes through ``Array.numpy()``."""
    buf = io.BytesIO(array.data)  # shares the bytes, no copy
    try:
        reader = NPY_HEADER_READERS.get(np.lib.format.read_magic(buf))
        if reader is None:
            return array.numpy()
        shape, fortran_order, dtype = reader(buf)
    except ValueError:
        return array.numpy()  # raises the same error np.load would
    count = math.prod(shape)
    if fortran_order or dtype.hasobject or len(array.data) - buf.tell() != count * dtype.itemsize:
        return array.numpy()
    return np.frombuffer(array.data, dtype=dtype, count=count, offset=buf.tell()).reshape(shape)


def server_step(update: torch.Tensor, buffer: torch.Tensor | None,
                agg: AggregationConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(step to add to the global weights, new momentum buffer): server lr and momentum."""
    if agg.server_momentum > 0:
        buffer = update if buffer is None else agg.server_momentum * buffer + update
        update = buffer
    return agg.server_lr * update, buffer


@dataclass
class RoundState:
    """What one round's aggregation did; becomes part of the round's metrics line."""

    sampled: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    newly_quarantined: list[int] = field(default_factory=list)
    client_metrics: dict[int, dict] = field(default_factory=dict)
    aggregation_info: dict[str, float] = field(default_factory=dict)
    skipped: str = ""


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
        self.node_partition: dict[int, int] = {}
        self.server_momentum: torch.Tensor | None = None
        self.dp_generator = noise_generator(cfg.central_dp, cfg.seed)  # OS CSPRNG unless opted out
        self._global: ArrayRecord | None = None
        self._sent: list[Message] = []
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
        return self._construct_messages(record, nodes, MessageType.EVALUATE)

    # --- aggregation ------------------------------------------------------------------------
    def _sort_replies(self, replies: Iterable[Message]) -> list[Message]:
        """Drop errors and refusals (logged with their reasons); keep replies carrying arrays."""
        usable = []
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        for msg in replies:
            node = sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if msg.has_error():
                self.round.rejected[node] = f"client-error: {msg.error.reason}"
            elif "refusal" in msg.content:
                self._learn_partition(msg)
                code = str(msg.content["refusal"]["code"])
                reason = str(msg.content["refusal"]["reason"])
                self.round.refused[node] = f"{code}: {reason}"
                if code == "budget-exhausted":
                    self.exhausted[node] = reason
            elif "arrays" not in msg.content or "metrics" not in msg.content:
                self.round.rejected[node] = "malformed: reply lacks 'arrays' or 'metrics'"
            else:
                usable.append(msg)
        return usable

    def _learn_partition(self, msg: Message) -> None:
        metrics = msg.content["metrics"] if "metrics" in msg.content else {}
        if "partition-id" in metrics:
            self.node_partition[msg.metadata.src_node_id] = int(metrics["partition-id"])

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._global is not None, "configure_train runs before aggregate_train"
        usable = self._sort_replies(replies)
        reference = to_numpy(self._global)
        names = list(reference)
        updates, nodes = [], []
        for msg in usable:
            node = msg.metadata.src_node_id
            self.round.client_metrics[node] = dict(msg.content["metrics"])
            self._learn_partition(msg)
            updates.append(to_numpy(msg.content["arrays"]))
            nodes.append(node)
        kept = list(range(len(updates)))
        if self.cfg.screening.enabled:
            kept, rejections = screen_updates(updates, reference, self.cfg.screening, nodes,
                                              relative_to_reference=True)
            self.round.rejected.update({r.client: r.reason for r in rejections})
        for node, reason in self.round.rejected.items():
            log(WARNING, "round %d: rejected update from node %d: %s", server_round, node, reason)
        for node, reason in self.round.refused.items():
            log(WARNING, "round %d: node %d refused to train: %s", server_round, node, reason)
        self.round.accepted = [nodes[i] for i in kept]
        if not kept:
            self.round.skipped = "no valid update this round; the global model is unchanged"
            log(WARNING, "round %d: %s", server_round, self.round.skipped)
            self._update_reputation(server_round, [], torch.zeros(0))
            return None, self._train_metrics()

        global_flat = torch.from_numpy(flatten(reference, names))
        deltas = torch.from_numpy(stack([updates[i] for i in kept], names))
        deltas -= global_flat  # in place: no second (n, d) buffer
        weights = torch.tensor([float(self.round.client_metrics[nodes[i]].get("num-examples", 1))
                                for i in kept], dtype=torch.float64)
        try:
            result = self._aggregate(deltas, weights)
        except ConfigError as exc:  # e.g. too few survivors for the rule's f
            self.round.skipped = f"aggregation refused: {exc}"
            log(WARNING, "round %d: %s", server_round, self.round.skipped)
            return None, self._train_metrics()
        self.round.aggregation_info = dict(result.info)
        step = self._server_step(result.update.float())
        self._update_reputation(server_round, self.round.accepted, result.suspicion)
        return self._unflatten(global_flat + step, reference), self._train_metrics()

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

    def _server_step(self, update: torch.Tensor) -> torch.Tensor:
        step, self.server_momentum = server_step(update, self.server_momentum, self.cfg.aggregation)
        return step

    def _update_reputation(self, server_round: int, accepted: list[int],
                           suspicion: torch.Tensor) -> None:
        if self.reputation is None:
            return
        self.round.newly_quarantined = self.reputation.update(
            server_round, accepted, suspicion.double().clamp(0, 1).tolist(),
            rejected=list(self.round.rejected))
        for node in self.round.newly_quarantined:
            log(WARNING, "round %d: node %d quarantined (suspicion %.2f)", server_round, node,
                self.reputation.scores.get(node, float("nan")))

    @staticmethod
    def _unflatten(flat: torch.Tensor, reference: dict[str, np.ndarray]) -> ArrayRecord:
        arrays = unflatten(flat.numpy(), reference)
        return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})

    def _train_metrics(self) -> MetricRecord:
        m = self.round.client_metrics
        accepted = [m[n] for n in self.round.accepted if n in m]
        total = sum(float(x.get("num-examples", 0)) for x in accepted) or 1.0
        out = {"accepted": len(self.round.accepted), "rejected": len(self.round.rejected),
               "refused": len(self.round.refused)}
        if accepted and all("train-loss" in x for x in accepted):
            out["train-loss"] = sum(x["train-loss"] * x.get("num-examples", 0)
                                    for x in accepted) / total
        eps = [float(x["epsilon"]) for x in m.values() if "epsilon" in x]
        if eps:
            out["epsilon-max"] = max(eps)
            out["epsilon-mean"] = float(np.mean(eps))
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
