"""A partner site's long-lived ClientApp executor: one Python process serves every message.

Flower 1.42 runs each ClientApp message in a new ``flwr-clientapp --token ...`` process, started
by ``flower-superexec`` (docs/partner-sites.md, "Why every message is a new process"): Python,
Flower, torch and fedshield are imported again, and the site's data is read again, every round.
``flower-supernode --isolation process`` leaves starting the executor to the operator; this module
is that executor for fedshield's ClientApp. In a loop, in this one process, it does what
flower-superexec's loop plus one ``flwr-clientapp`` do per task, calling Flower's own functions:

- ``RuntimeHttpClient.AcquireTask`` on the SuperNode's Runtime API, as
  ``supercore/superexec/run_superexec.py:256`` does, for ``flwr-clientapp`` tasks only;
- with the task's token: ``pull_task_input``, ``push_message`` and ``push_task_output`` from
  ``supernode/runtime/run_clientapp.py`` (imported, not copied) and Flower's task heartbeat,
  as ``run_clientapp`` (``:82-234``) does;
- in between, the ClientApp ``fedshield.clientapp:app``, imported once when the worker starts.

Security model: the worker runs the SITE's installed fedshield, never code from the FAB the
coordinator submitted (``flwr-clientapp`` would install and import the FAB). A task whose FAB is
not this app -- another Flower app id or version, or any ``.py`` file that differs from the
installed one -- is refused with an error reply naming the files, so a site never trains under
code it did not install, and a coordinator never gets replies from code it did not ship.

A task that fails (the ClientApp raises, the FAB is refused, the worker is stopped mid-task) gets
an error reply, as in ``run_clientapp``; a worker killed outright leaves the task to the
SuperNode, which answers with an error reply when the task's heartbeat expires. ``fedshield site
run`` restarts a worker that exits (fedshield/site_supervisor.py).

Per-process caches (the data cache's memory, the tasks' datasets) stay warm across messages and
runs; nothing run-scoped is kept here: each task's Context comes from the SuperNode, and goes back
to it, as with ``flwr-clientapp``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import signal
import sys
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

TASK_TYPE = "flwr-clientapp"  # Flower's TaskType.CLIENT_APP
PREFIX = "fedshield site worker: "


@dataclass(frozen=True)
class InstalledApp:
    """What a task's FAB must match: the Flower app id and version of the installed project and
    the SHA-256 of each of its Python files by FAB path, taken when the worker started (the code
    it has loaded; an upgrade on disk needs a worker restart, and is refused until then)."""

    root: Path
    fab_id: str
    version: str
    sources: dict[str, str]


def _py_hashes(fab: bytes) -> dict[str, str]:
    """FAB member path -> SHA-256 of each Python file in a FAB (a zip archive)."""
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        return {n: hashlib.sha256(z.read(n)).hexdigest() for n in z.namelist()
                if n.endswith(".py")}


def installed_app(root: Path) -> InstalledApp:
    """The installed app at ``root`` (a folder with fedshield's pyproject.toml), read through
    Flower's own FAB builder: the files ``flwr run`` would ship from this folder."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import get_metadata_from_config

    from fedshield.errors import ConfigError

    path = root / "pyproject.toml"
    try:
        config = tomllib.loads(path.read_text())
        fab_id, version = get_metadata_from_config(config)
        sources = _py_hashes(build_fab_from_disk(root))
    except Exception as exc:  # whatever Flower's builder raises: one clear error
        raise ConfigError(f"{path}: cannot read the installed app ({exc}); the site worker "
                          "needs fedshield installed from its project folder (the one with "
                          "pyproject.toml)") from exc
    return InstalledApp(root, fab_id, version, sources)


def fab_mismatch(fab: bytes, fab_id: str, fab_version: str, app: InstalledApp) -> str | None:
    """Why a task's FAB is not the installed app (None when it is): another app id or version,
    or Python files that differ from, or are missing in, the installed project."""
    if (fab_id, fab_version) != (app.fab_id, app.version):
        return (f"the run's app is {fab_id} {fab_version}, this site runs {app.fab_id} "
                f"{app.version}: install the coordinator's version, or switch the site to "
                "client_process = \"per-message\" in site.toml")
    try:
        members = _py_hashes(fab)
    except (zipfile.BadZipFile, OSError) as exc:
        return f"the run's FAB is not a readable zip archive ({exc})"
    differ = sorted(n for n, digest in members.items() if app.sources.get(n) != digest)
    if differ:
        shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
        return (f"the run's FAB differs from the code this site installed in {len(differ)} "
                f"Python file(s): {shown}. The site runs only its installed fedshield: install the "
                "coordinator's exact version (same commit) here and restart `fedshield site run`")
    return None


def fab_fingerprint(fab: bytes) -> str:
    """SHA-256 of a FAB (Flower's fab hash), for log lines."""
    return hashlib.sha256(fab).hexdigest()


def log_line(text: str) -> None:
    """One line on stderr (the site's log)."""
    print(PREFIX + text, file=sys.stderr, flush=True)


class Stop(BaseException):  # a request, not an error: never caught as an Exception
    """SIGTERM/SIGINT: answer the task in hand with an error reply, then leave."""


class TaskAborted(Exception):
    """SIGINT during a task: that task gets an error reply, the worker goes on serving."""


class FabRefused(Exception):
    """The task's FAB is not the installed app (:func:`fab_mismatch` says why)."""


class Worker:
    """Serves ClientApp tasks from one SuperNode's Runtime API until stopped."""

    def __init__(self, runtime_api_address: str, poll_interval: float = 0.1,
                 app_root: Path | None = None) -> None:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor

        from fedshield.clientapp import app  # imported once: torch, fedshield, the ClientApp
        from fedshield.site import app_dir

        self.address = runtime_api_address
        self.poll_interval = poll_interval
        self.app = app
        self.installed = installed_app(app_root or app_dir())
        self.checked: dict[str, str | None] = {}  # FAB hash -> fab_mismatch's answer
        self.tasks = 0
        self.in_task = False  # inside run_task (SIGINT then aborts the task, not the worker)
        # The Runtime API on 127.0.0.1 is plain HTTP (the SuperNode starts its own SuperExec the
        # same way, start_client_internal.py:207-222); the component name is the SuperExec's.
        self.acquirer = RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address, insecure=True, root_certificates=None,
            interceptors=[RuntimeTracingInterceptor(),
                          RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker())

    def acquire(self) -> str | None:
        """A ClientApp task's token from the SuperNode, None when there is none yet."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest

        res = self.acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TASK_TYPE]))
        return res.token if res.HasField("task") and res.token else None

    def run_task(self, token: str) -> bool:
        """Serve one task (what ``run_clientapp`` does in its process); whether it completed."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
        from flwr.supernode.runtime.run_clientapp import (
            pull_task_input,
            push_message,
            push_task_output,
        )

        from fedshield.client import timing

        acquired = time.time()
        self.in_task = True
        retry = make_simple_http_retry_invoker()
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeTracingInterceptor(),
                          RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=retry)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        message = context = reply = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            heartbeat.start()
            message, context, run, fab = pull_task_input(client)
            pulled = time.time()
            digest = fab_fingerprint(fab.content)  # our own hash of the bytes we check
            if digest not in self.checked:  # one check per FAB, not per message
                self.checked[digest] = fab_mismatch(fab.content, run.fab_id, run.fab_version,
                                                    self.installed)
            problem = self.checked[digest]
            if problem:
                raise FabRefused(problem)
            timing.begin_task(acquired)
            log_line(f"task of run {run.run_id}: pulled in {pulled - acquired:.2f} s, FAB checked "
                     f"in {time.time() - pulled:.2f} s")
            reply = self.app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
        except BaseException as ex:  # every failure is an error reply (Stop re-raised)
            code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, FabRefused)
                    else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
            reason = (f"fedshield site worker refused the run: {ex}" if isinstance(ex, FabRefused)
                      else f"{type(ex)}:<'{ex}'>")  # run_clientapp's format
            log_line(f"task failed: {reason}")
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
            if not isinstance(ex, Exception):
                retry.max_tries = 1  # stopping: do not block on retries
                raise
        finally:
            timing.begin_task(None)
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001 (logged; the SuperNode's expiry answers)
                log_line(f"could not push the reply: {ex}")
            # Heartbeats stop before the task is closed: one sent with the closed task's token
            # gets a 401, on which Flower's HTTP retry SIGINTs its own process (http_retry.py).
            if heartbeat.is_running:
                heartbeat.stop()
            try:
                push_task_output(client=client, context=context, sub_status=sub_status,
                                 details=details)
            except Exception as ex:  # noqa: BLE001 (a stopped run: nothing left to close)
                log_line(f"could not close the task: {ex}")
            client.close()
            self.tasks += 1
            self.in_task = False
        return sub_status == SubStatus.COMPLETED

    def serve(self, max_tasks: int | None = None) -> None:
        """Acquire and serve tasks until stopped (or ``max_tasks`` were served)."""
        log_line(f"pid {os.getpid()} serving ClientApp tasks of {self.address} with "
                 f"{self.installed.fab_id} {self.installed.version} from {self.installed.root}")
        waiting_since: float | None = None
        while max_tasks is None or self.tasks < max_tasks:
            try:
                token = self.acquire()
            except Exception as exc:  # noqa: BLE001 (SuperNode restarting: wait for it)
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    log_line(f"Runtime API at {self.address} not answering ({exc}); retrying")
                time.sleep(1.0)
                continue
            if waiting_since is not None:
                log_line(f"Runtime API back after {time.monotonic() - waiting_since:.0f} s")
                waiting_since = None
            if token is None:
                time.sleep(self.poll_interval)
                continue
            try:
                self.run_task(token)
            except Exception as exc:  # noqa: BLE001 (its reply is sent; keep serving)
                log_line(f"task ended with {type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    """``python -m fedshield.site_worker --runtime-api-address 127.0.0.1:PORT``."""
    parser = argparse.ArgumentParser(description="fedshield's long-lived ClientApp executor for "
                                     "a `flower-supernode --isolation process`")
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API (its --host:--port), e.g. "
                             "127.0.0.1:9094")
    parser.add_argument("--poll-interval", type=float, default=0.1,
                        help="seconds between checks for a new task (0.01-60)")
    args = parser.parse_args(argv)
    if not 0.01 <= args.poll_interval <= 60:
        parser.error(f"--poll-interval must be in [0.01, 60], got {args.poll_interval}")

    worker: Worker | None = None

    def stop(signum, _frame) -> None:
        raise Stop(signal.Signals(signum).name)

    def interrupt(signum, frame) -> None:
        # Flower's HTTP retry SIGINTs its own process on a 401 (a task token the SuperNode no
        # longer knows): that ends the task in hand, not the worker. Idle, SIGINT (Ctrl-C) stops.
        if worker is not None and worker.in_task:
            raise TaskAborted("interrupted (SIGINT: Ctrl-C, or Flower's retry on HTTP 401)")
        stop(signum, frame)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, interrupt)
    from fedshield.errors import FedShieldError

    try:
        worker = Worker(args.runtime_api_address, args.poll_interval)
        worker.serve()
    except FedShieldError as exc:
        log_line(f"error: {exc}")
        return 2
    except Stop as why:
        log_line(f"stopped ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
