"""Per-message timestamps on the client side of a deployment, for the latency benchmark.

Each train and evaluate message's handler prints one ``fedshield timing {json}`` line on stderr
(Flower's ``flwr-clientapp`` passes it into the SuperNode's log) with wall-clock times: when the
ServerApp created the message (Flower's ``metadata.created_at``), when this process started, when
the handler started and ended; a train line also has the training loop's seconds (``train_s``:
DP-SGD's loop under DP, ``train_local`` without) and the client's own time (``client_s``), which
under DP the reply does not carry. With the server's round times and its own work
(``server_seconds``) they split a round into Flower's share (delivery and polling before the
process, the process start-up, the reply's way back) and fedshield's (the handlers, the server).
Nothing here leaves the site: it is a local log line, not part of the reply.
"""

from __future__ import annotations

import json
import os
import sys
import time

PREFIX = "fedshield timing "
# Set by fedshield's long-lived site worker (fedshield/site_worker.py) while it serves a task: when
# it acquired the task, which then stands in for the process start (its process serves them all).
_TASK_START: list[float | None] = [None]
# Local-only seconds of the message being handled (the training loop, the client's own time):
# under DP they never leave the site in the reply, so the timing line is where they are read.
_LOCAL: dict[str, float] = {}


def begin_task(acquired: float | None) -> None:
    """Mark that this process serves one task acquired at ``acquired`` (None: task done)."""
    _TASK_START[0] = acquired


def process_start_time() -> float | None:
    """Wall-clock start of this process (Linux /proc), None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    # /proc/stat's boot time is whole seconds; uptime and start ticks are 10 ms.
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def note_local(**seconds: float) -> None:
    """Seconds of the message being handled (``train_s``, ``client_s``) for its timing line."""
    _LOCAL.update(seconds)


def note_message(kind: str, created_at: float, run_id: int, server_round: str, started: float,
                 **extra: object) -> None:
    """Print the timing line of one handled message (``started``: time.time() at entry), only
    in a ``flwr-clientapp`` process or the site worker: simulations run thousands of handlers in
    one process. ``process_start`` is the worker's task acquisition there, ``pid`` the process."""
    worker_task = _TASK_START[0]
    local = dict(_LOCAL)
    _LOCAL.clear()  # one message's seconds, never the next one's
    if worker_task is None and (not sys.argv or not sys.argv[0].endswith("flwr-clientapp")):
        return
    record = {"kind": kind, "run": run_id, "round": server_round, "created": created_at,
              "process_start": worker_task if worker_task is not None else process_start_time(),
              "handler_start": started, "handler_end": time.time(), "pid": os.getpid(),
              "worker": worker_task is not None, **local, **extra}
    print(PREFIX + json.dumps(record, sort_keys=True), file=sys.stderr, flush=True)


def parse_log(text: str) -> list[dict]:
    """The timing records in a SuperNode log, in order."""
    out = []
    for line in text.splitlines():
        at = line.find(PREFIX)
        if at >= 0:
            try:
                out.append(json.loads(line[at + len(PREFIX):]))
            except ValueError:
                continue  # a line cut by a crash: skip it
    return out
