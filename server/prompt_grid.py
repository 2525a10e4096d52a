"""A Grid wrapper whose ``send_and_receive`` pulls the replies promptly.

Flower 1.42's deployment grid (``flwr/superlink/grid/http_grid.py``, ``send_and_receive``) sleeps
3 s between two pulls of the replies, so on average every message exchange waits 1.5 s after the
last reply has reached the SuperLink, twice a round with federated evaluation. Flower has no knob
for it; its public Grid API (``push_messages``, ``pull_messages``) is enough to do the same loop
with a shorter wait, without forking or patching Flower. Flower plumbing only: the ServerApp
installs it around whatever grid it gets (server/app.py, server/secagg.py).

Cost: while an exchange has replies outstanding, one ``PullMessages`` request on the SuperLink's
runtime API every ``poll_s`` seconds (10 a second at the default 0.1 s, instead of one every 3 s),
each carrying the outstanding message ids; the replies themselves are pulled once, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

# Flower's own wait between pulls (http_grid.py): the upper end of federation.reply_poll_s.
FLOWER_PULL_INTERVAL_S = 3.0


class DelegatingGrid(Grid):
    """A Grid that hands every call to the grid it wraps; subclasses override what they change
    (PromptGrid here, ErrorWatch in server/secagg.py)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def __getattr__(self, name: str) -> Any:
        # Anything else the wrapped grid offers, e.g. the in-process grid's node_to_partition,
        # which the strategy reads (server/strategy.py sample).
        if name.startswith("__") or name == "_grid":
            raise AttributeError(name)
        return getattr(self._grid, name)

    def set_run(self, run: Run) -> None:
        """Delegated."""
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        """Delegated."""
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """Delegated."""
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegated."""
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        """Delegated."""
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegated."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegated."""
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Delegated."""
        return self._grid.send_and_receive(messages, timeout=timeout)


class PromptGrid(DelegatingGrid):
    """Delegates to ``grid``; ``send_and_receive`` pushes, then pulls every ``poll_s`` seconds.

    The contract is Flower's ``send_and_receive``: it returns every reply pulled before all
    messages were answered or ``timeout`` passed (None: no limit; 0: no pull at all, as in
    Flower), and a message counts as answered once a reply whose ``reply_to_message_id`` is its
    id has been pulled. Two differences, both for the caller: ids are pulled in the order they
    were pushed (so an in-process grid answers in the order it always did), and a message the
    grid could not push (a None or empty id; Flower logs why) is not waited for.

    ``on_exchange(seconds)`` hears how long each exchange took, push to last pull: the round's
    time outside its exchanges is the ServerApp's own work (``server_seconds`` in metrics.jsonl).
    ``clock`` and ``sleep`` are for tests.
    """

    def __init__(self, grid: Grid, poll_s: float,
                 on_exchange: Callable[[float], None] | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not 0 < poll_s <= FLOWER_PULL_INTERVAL_S:
            raise ValueError(f"poll_s = {poll_s} must be in (0, {FLOWER_PULL_INTERVAL_S:g}] s "
                             "(federation.reply_poll_s)")
        super().__init__(grid)
        self.poll_s, self._on_exchange = poll_s, on_exchange
        self._clock, self._sleep = clock, sleep

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull their replies every ``poll_s`` seconds until every
        message is answered or ``timeout`` seconds have passed since the call."""
        started = self._clock()
        try:
            return self._exchange(messages, started, timeout)
        finally:
            if self._on_exchange is not None:
                self._on_exchange(self._clock() - started)

    def _exchange(self, messages: Iterable[Message], started: float,
                  timeout: float | None) -> list[Message]:
        pushed = self._grid.push_messages(messages)
        pending = list(dict.fromkeys(i for i in pushed if i))  # push order, once each
        deadline = None if timeout is None else started + timeout
        replies: list[Message] = []
        while pending and (deadline is None or self._clock() < deadline):
            got = list(self._grid.pull_messages(list(pending)))
            replies.extend(got)
            answered = {m.metadata.reply_to_message_id for m in got}
            pending = [i for i in pending if i not in answered]
            if not pending:
                break
            wait = self.poll_s if deadline is None else min(self.poll_s,
                                                            deadline - self._clock())
            if wait > 0:  # never a busy loop: a pull at most every poll_s seconds
                self._sleep(wait)
        return replies
