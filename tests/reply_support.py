"""Test support for the reply boundary: scripted clients on fedshield's in-process grid.

Every reply is round-tripped through Flower's protobuf serialisation (``wire``), as it is between a
SuperNode and the SuperLink, so the server sees what a real transport would deliver. Honest
clients do not train: they send the global weights plus small seeded noise, which keeps a round
to milliseconds on the digits model (4,810 parameters).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from fedshield.simulations.grid import InProcessGrid
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from fedshield import schema
from fedshield.records import TrainReport, encode_train_report
from tests.config_support import neutral_config

# (global arrays, partition id, round) -> reply content, an Error, or a whole Message.
Behaviour = Callable[[dict[str, np.ndarray], int, int], RecordDict | Error | Message]

HONEST_SCALE = 0.01  # per-coordinate std of an honest update


def wire(msg: Message) -> Message:
    """``msg`` after Flower's protobuf serialisation and back."""
    return message_from_proto(ProtoMessage.FromString(message_to_proto(msg).SerializeToString()))


def digits_cfg(tmp_path, rule: str = "fedavg", n: int = 6, **sections) -> schema.Config:
    data = {"name": "replies", "seed": 0, "output_dir": str(tmp_path / "runs"),
            "task": {"name": "digits", "eval_examples": 64},
            "federation": {"num_clients": n, "rounds": 1, "min_clients": 1},
            "aggregation": {"rule": rule},
            "privacy": {"ledger_dir": str(tmp_path / "ledgers")},
            "deployment": {"handoff": False}}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return neutral_config(data)


def honest_delta(global_arrays: dict[str, np.ndarray], pid: int, rnd: int,
                 scale: float = HONEST_SCALE) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([pid, rnd])
    return {k: (scale * rng.standard_normal(v.shape)).astype(v.dtype)
            for k, v in global_arrays.items()}


def honest_metrics(pid: int) -> dict[str, float]:
    return {"num-examples": 100 + 37 * pid, "partition-id": pid, "train-loss": 0.5 + 0.01 * pid,
            "client-seconds": 0.1, "epsilon": 1.0 + 0.1 * pid}


def honest(global_arrays: dict[str, np.ndarray], pid: int, rnd: int) -> RecordDict:
    delta = honest_delta(global_arrays, pid, rnd)
    arrays = {k: global_arrays[k] + delta[k] for k in global_arrays}
    return encode_train_report(TrainReport.from_metrics(arrays, honest_metrics(pid)))


class Federation:
    """``n`` scripted clients; ``behaviour[pid]`` overrides the honest reply of partition pid.
    ``replies`` holds the last round's replies as the server received them."""

    def __init__(self, cfg: schema.Config, behaviour: dict[int, Behaviour] | None = None) -> None:
        self.behaviour: dict[int, Behaviour] = dict(behaviour or {})
        self.replies: list[Message] = []
        apps = {pid: self._app(pid) for pid in range(cfg.federation.num_clients)}
        self.grid = InProcessGrid(apps, cfg.flat(), cfg.seed, reply_filter=self._wire)
        self.partition_node = {p: n for n, p in self.grid.node_to_partition.items()}

    def _app(self, pid: int):
        def app(msg: Message, context) -> Message:
            global_arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            rnd = int(msg.content["config"]["server-round"])
            out = self.behaviour.get(pid, honest)(global_arrays, pid, rnd)
            return out if isinstance(out, Message) else Message(out, reply_to=msg)
        return app

    def _wire(self, sent: list[Message], replies: list[Message]) -> list[Message]:
        self.replies = [wire(r) for r in replies]
        return self.replies


def run_round(strategy, fed: Federation, arrays, rnd: int = 1):
    """configure_train -> the clients -> aggregate_train; (new arrays or None, train metrics)."""
    messages = strategy.configure_train(rnd, arrays, ConfigRecord({}), fed.grid)
    replies = fed.grid.send_and_receive(messages)
    return strategy.aggregate_train(rnd, replies)
