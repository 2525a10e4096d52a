"""An in-process Flower Grid: the real ServerApp and ClientApps, with no Ray and no network.

Messages are delivered by calling each node's ClientApp directly, one after another in this process
(``federation.workers = 1``), or spread over a :class:`~fedshield.simulations.workers.WorkerPool`
of persistent processes (``workers > 1``); either way the replies come back in the order the
messages were sent, the same for any number of workers. This removes Ray's start-up and per-round
overhead. A ``ReplyFilter`` sees every round's replies together (after every worker has answered)
before the strategy does; the attack simulator uses it for omniscient adversaries, and nothing else
in fedshield knows about it.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable, Iterable
from uuid import uuid4

import numpy as np
from fedshield.simulations.workers import WorkerPool
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

# (messages sent, replies received) -> replies the strategy will see.
ReplyFilter = Callable[[list[Message], list[Message]], list[Message]]

# Flower's code for a ClientApp that raised (2; 1 is LOAD_CLIENT_APP_EXCEPTION), as in workers.
CLIENT_APP_EXCEPTION = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
# Seconds a round may take when the strategy gives no timeout (federation.round_timeout's default).
DEFAULT_ROUND_TIMEOUT = 600.0


def make_run(run_id: int, run_config: dict) -> Run:
    """The Flower Run record an in-process federation reports (no FAB: the apps are in memory)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    return Run(run_id=run_id, fab_id="fedshield", fab_version="inprocess", fab_hash="",
               override_config=dict(run_config), pending_at=now, starting_at=now,
               running_at=now, finished_at="", status=None,  # type: ignore[arg-type]
               flwr_aid="", federation_id="inprocess", primary_task_id=None, bytes_sent=0,
               bytes_recv=0, clientapp_runtime=0.0)


class InProcessGrid(Grid):
    """A Flower Grid that delivers messages to in-memory ClientApps, in order, in this process."""
    def __init__(self, client_apps: dict[int, ClientApp], run_config: dict, seed: int,
                 node_configs: dict[int, dict] | None = None,
                 reply_filter: ReplyFilter | None = None) -> None:
        """``client_apps`` maps partition id -> ClientApp (honest or not)."""
        rng = np.random.default_rng(seed)
        self.run_id = int(rng.integers(1, 2**62))
        self._run = make_run(self.run_id, run_config)
        # Node ids are random 63-bit ints as on a SuperLink; partition ids live in node_config.
        ids = rng.choice(2**62, size=len(client_apps), replace=False) + 1
        self.node_to_partition = {int(n): p for n, p in zip(ids, sorted(client_apps), strict=True)}
        self._apps = {int(n): client_apps[p] for n, p in self.node_to_partition.items()}
        num = len(client_apps)
        self._contexts = {
            n: Context(run_id=self.run_id, node_id=n,
                       node_config=(node_configs or {}).get(p) or
                       {"partition-id": p, "num-partitions": num},
                       state=RecordDict(), run_config=dict(run_config))
            for n, p in self.node_to_partition.items()}
        self._pending: dict[str, Message] = {}
        self._reply_filter = reply_filter
        self._pool: WorkerPool | None = None
        self._cost: Callable[[int], float] | None = None
        self._timeout = float(run_config.get("federation.round_timeout", DEFAULT_ROUND_TIMEOUT))
        # Messages created by the ServerApp read their sender identity from here (set by
        # Flower's runtime in a real deployment).
        TaskIdentity.task_id, TaskIdentity.run_id = 1, self.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def use_workers(self, pool: WorkerPool | None,
                    cost: Callable[[int], float] | None = None) -> None:
        """Answer messages with ``pool``'s workers (they build the same apps themselves), spread
        by ``cost`` (partition id -> expected training cost; uniform when None); None: in this
        process, one after another."""
        self._pool, self._cost = pool, cost

    # --- Grid interface --------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        """Set the Run the grid reports."""
        self._run = run

    @property
    def run(self) -> Run:
        """The Run this grid serves."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """A message to ``dst_node_id``, as Flower's Grid builds it."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The node ids of the in-memory clients."""
        return list(self._apps)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue messages for delivery; returns their ids."""
        messages = list(messages)
        # After a network hop each message owns its content. Flower's legacy workflows (SecAgg+)
        # send one RecordDict to many nodes, and its client mod edits the record it receives.
        # Workers get their own copies by pickling, and the shared model by shared memory.
        shared = Counter(id(m.content) for m in messages) if self._pool is None else Counter()
        ids = []
        for msg in messages:
            if shared[id(msg.content)] > 1:
                msg.content = copy.deepcopy(msg.content)
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self._pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Deliver the queued messages with these ids and return the replies."""
        sent = [self._pending.pop(i) for i in message_ids if i in self._pending]
        replies = self._deliver_pool(sent) if self._pool else [self._deliver(msg) for msg in sent]
        if self._reply_filter is not None and sent and sent[0].metadata.message_type == "train":
            replies = self._reply_filter(sent, replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push and pull in one call (the timeout bounds the workers' round; in-process there is
        nothing to wait for)."""
        if timeout is not None:
            self._timeout = float(timeout)
        return self.pull_messages(self.push_messages(messages))

    # --- delivery --------------------------------------------------------------------------
    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        try:
            reply = self._apps[node](msg, self._contexts[node])
        except Exception as exc:  # noqa: BLE001 — reported to the server like Flower does
            reason = f"{type(exc).__name__}: {exc}"
            reply = Message(Error(code=CLIENT_APP_EXCEPTION, reason=reason), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply

    def _deliver_pool(self, sent: list[Message]) -> list[Message]:
        assert self._pool is not None
        nodes = [m.metadata.dst_node_id for m in sent]
        pids = [self.node_to_partition[n] for n in nodes]
        costs = [self._cost(p) if self._cost else 1.0 for p in pids]
        answered = self._pool.deliver(sent, [self._contexts[n] for n in nodes], pids, costs,
                                      self._timeout)
        replies = []
        for node, (reply, context) in zip(nodes, answered, strict=True):
            self._contexts[node] = context  # the worker's copy holds any state the app kept
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            replies.append(reply)
        return replies
