"""Toy ClientApps for the worker-pool tests: spawned workers import them by name, so this module
imports only Flower (not the fedshield apps: a worker starts in a fraction of the time)."""

from __future__ import annotations

import os
import signal
import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp


def _toy_app(pid: int) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if pid == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if pid == 2:
            raise RuntimeError("client 2 is broken")
        if pid == 3:
            time.sleep(60)
        if pid == 4:  # reads the run config and changes it: the change must come back
            context.run_config["seen"] = 4.0
            return Message(RecordDict({"metrics": MetricRecord(
                {"k": float(context.run_config["k"])})}), reply_to=msg)
        total = float(sum(a.numpy().sum() for a in msg.content["arrays"].values()))
        context.state["seen"] = MetricRecord({"rounds": 1})
        return Message(RecordDict({"metrics": MetricRecord({"sum": total, "pid": os.getpid()})}),
                       reply_to=msg)

    return app


def toy_apps() -> dict[int, ClientApp]:
    """Partition 0 answers with the sum of the model it got and its process id, 1 kills its own
    process, 2 raises, 3 sleeps for a minute, 4 answers with its run config's "k" and adds
    "seen" to it (spawned workers import this by name)."""
    return {pid: _toy_app(pid) for pid in range(5)}


def failing_factory() -> dict[int, ClientApp]:
    """A factory that cannot build its apps."""
    raise OSError("no data here")


