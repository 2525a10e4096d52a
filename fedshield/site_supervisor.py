"""Keep a partner site's SuperNode running: start it, restart it when it fails, record its state.

``fedshield site run SITE_DIR`` runs :func:`supervise` on the command ``fedshield site command``
prints. The SuperNode is restarted after a non-zero exit, after a growing pause (a SuperNode
killed without leaving is refused by the SuperLink until two 30 s heartbeats pass, so quick
retries would only fail). A clean exit (0), or SIGTERM/SIGINT to the supervisor, ends it: the
signal is passed on so the SuperNode leaves the federation at once. ``supervisor.json`` in the site
folder says what runs (``fedshield site status`` reads it); the SuperNode's output is appended to
``logs/supernode.log``. With ``client_process = "long-lived"`` (site.toml, the default) the
SuperNode runs with ``--isolation process`` next to fedshield's long-lived ClientApp executor
(fedshield/site_worker.py), supervised the same way: restarted when it exits, stopped with the
SuperNode, logging into the same file.

Everything the site must keep (its privacy ledger, its data cache) is on disk, so a restarted
SuperNode rejoins with its ledger intact; nothing is held only in the supervisor.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "supervisor.json"
LOG_FILE = "logs/supernode.log"


@dataclass(frozen=True)
class RestartPolicy:
    """Pauses between restarts: ``first`` seconds, doubled after each quick failure up to
    ``longest``; a run longer than ``healthy`` seconds resets the pause. ``max_restarts`` quick
    failures in a row end the supervisor (a wrong key or address does not fix itself)."""

    first: float = 5.0
    longest: float = 60.0
    healthy: float = 120.0
    max_restarts: int = 20

    def pause(self, quick_failures: int) -> float:
        """Seconds to wait before the next start after ``quick_failures`` in a row."""
        return min(self.first * 2 ** max(quick_failures - 1, 0), self.longest)


@dataclass
class SupervisorState:
    """What ``supervisor.json`` holds."""

    supervisor_pid: int
    command: list[str]
    supernode_pid: int | None = None
    started_at: float | None = None  # this SuperNode process's start (time.time())
    restarts: int = 0
    exits: list[dict] = field(default_factory=list)  # the last few {at, code}
    stopped: bool = False
    worker_command: list[str] | None = None  # the long-lived ClientApp executor, if any
    worker_pid: int | None = None
    worker_restarts: int = 0

    def write(self, path: Path) -> None:
        """Write atomically (status may read it at any time)."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)


def read_state(site_dir: Path) -> dict | None:
    """The site's ``supervisor.json``, None when no supervisor ever ran there."""
    try:
        return json.loads((site_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    """Whether process ``pid`` exists (and is not a zombie)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


def supervise(command: list[str], env: dict[str, str], site_dir: Path,
              policy: RestartPolicy = RestartPolicy(), sleep=time.sleep,
              worker: list[str] | None = None) -> int:
    """Run ``command`` until it exits 0, the supervisor is told to stop, or ``max_restarts``
    quick failures in a row; returns the last exit code.

    ``worker``: fedshield's long-lived ClientApp executor (fedshield/site_worker.py) for a
    SuperNode run with ``--isolation process``; restarted on its own when it exits (the
    SuperNode keeps running), stopped with the SuperNode. It logs into the same file."""
    state = SupervisorState(os.getpid(), command, worker_command=worker)
    state_path = site_dir / STATE_FILE
    log_path = site_dir / LOG_FILE
    log_path.parent.mkdir(parents=True, exist_ok=True)
    children: dict[str, subprocess.Popen] = {}
    stopping: list[int] = []
    lock = threading.Lock()  # the worker's thread and the SuperNode's loop share the state

    def stop(signum, _frame) -> None:
        stopping.append(signum)
        for child in list(children.values()):
            if child.poll() is None:
                child.send_signal(signum)  # the SuperNode leaves the federation, then exits

    def started(name: str, child: subprocess.Popen) -> None:
        with lock:
            children[name] = child
            if name == "SuperNode":
                state.supernode_pid, state.started_at = child.pid, time.time()
            else:
                state.worker_pid = child.pid
            state.write(state_path)

    def exited(name: str, code: int, ran: float, pause: float | None) -> None:
        with lock:
            if name == "SuperNode":
                state.exits = (state.exits + [{"at": time.time(), "code": code}])[-10:]
                state.supernode_pid = None
                state.restarts += pause is not None
            else:
                state.worker_pid = None
                state.worker_restarts += pause is not None
            state.write(state_path)
        if pause is not None:
            with open(log_path, "a") as text:
                text.write(f"\nfedshield site run: {name} exited with {code} after {ran:.0f} s;"
                           f" restart in {pause:.0f} s\n")

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    helper = None
    if worker is not None:  # the worker's restarts must not wait on the SuperNode's
        helper = threading.Thread(target=_keep_running, daemon=True, args=(
            "worker", worker, env, log_path, policy, stopping, started, exited, sleep, False))
        helper.start()
    try:
        code = _keep_running("SuperNode", command, env, log_path, policy, stopping, started,
                             exited, sleep, True)
    finally:
        stopping.append(0)  # the worker follows the SuperNode out
        child = children.get("worker")
        if child is not None and child.poll() is None:
            child.terminate()
        if helper is not None:
            helper.join(timeout=30)
        state.stopped = True
        state.supernode_pid = state.worker_pid = None
        state.write(state_path)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code


def _keep_running(name: str, command: list[str], env: dict[str, str], log_path: Path,
                  policy: RestartPolicy, stopping: list[int], started, exited, sleep,
                  clean_exit_ends: bool) -> int:
    """Start ``command`` again after each exit (``policy``'s pauses) until ``stopping``, a
    clean exit where ``clean_exit_ends``, or too many quick failures; the last exit code."""
    quick, code = 0, 0
    while not stopping:
        with open(log_path, "ab") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        began = time.time()
        started(name, child)
        code = child.wait()
        ran = time.time() - began
        if stopping or (code == 0 and clean_exit_ends):
            exited(name, code, ran, None)
            break
        quick = quick + 1 if ran < policy.healthy else 1
        if quick > policy.max_restarts:
            exited(name, code, ran, None)
            break
        exited(name, code, ran, policy.pause(quick))
        sleep(policy.pause(quick))
    return code
