"""Run a site kit's SuperLink and SuperNodes as processes on this machine.

For trying a kit before sending it out, for the deployment tests and for the deployment benchmark.
Every process starts in its own session, so stopping it reaches the Flower processes it spawned
(``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from fedshield.site import (
    CONNECTION,
    Layout,
    app_dir,
    flwr_bin,
    flwr_env,
    register_sites,
    superlink_command,
    supernode_command,
    supernode_env,
    worker_command,
)


def free_port() -> int:
    """A TCP port free on localhost right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalFederation:
    """Processes of one kit: ``start_superlink``, ``start_site``, ``submit``, ``wait_run``;
    ``close`` (or the ``with`` block's end) ends every process it started."""

    def __init__(self, kit: str | Path, logs: str | Path | None = None,
                 threads_per_site: int | None = 1) -> None:
        self.layout = Layout(Path(kit))
        conn = tomllib.loads((self.layout.flwr_home / "config.toml").read_text())
        conn = conn["superlink"][CONNECTION]
        self.host, port = conn["address"].rsplit(":", 1)
        self.port, self.insecure = int(port), bool(conn.get("insecure", False))
        self.logs = Path(logs) if logs else self.layout.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.site_logs: dict[str, Path] = {}  # supervised sites log into their own folder
        self.env = flwr_env(self.layout)
        # Sites sharing this machine's cores: torch's default of one thread per core in every
        # site's process oversubscribes them (a tiny model then trains 100x slower); a real site
        # has its own machine. None keeps torch's default.
        self.threads = threads_per_site

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- processes ------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str],
               log: str | None = None) -> subprocess.Popen:
        cmd = [flwr_bin(cmd[0]), *cmd[1:]] if cmd[0] != sys.executable else cmd
        out = open(self.logs / f"{log or name}.log", "ab")  # noqa: SIM115 (closed with it)
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        out.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        """The log of process ``name`` so far ("" before it wrote one)."""
        path = self.site_logs.get(name, self.logs / f"{name}.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def start_superlink(self, timeout: float = 60) -> None:
        """Start the SuperLink and wait until it serves (RuntimeError after ``timeout``)."""
        self._spawn("superlink", superlink_command(self.layout, self.host, self.port,
                                                   self.insecure), self.env)
        deadline = time.monotonic() + timeout
        while "Uvicorn running" not in self.log("superlink"):
            if self.procs["superlink"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("SuperLink did not start:\n" + self.log("superlink")[-3000:])
            time.sleep(0.3)

    def register(self) -> dict[str, str]:
        """Register the kit's sites with the SuperLink; site name -> node id."""
        return register_sites(self.layout.root)

    def start_site(self, site_dir: str | Path, name: str | None = None,
                   supervised: bool = False) -> subprocess.Popen:
        """Start a site's SuperNode with its own FLWR_HOME; its process. ``supervised``: through
        ``fedshield site run`` (restarts on failure; its log is the site's logs/supernode.log)."""
        site_dir = Path(site_dir)
        name = name or site_dir.name
        home = site_dir / "flwr-home"  # the SuperNode's own FLWR_HOME, nothing under ~/.flwr
        home.mkdir(exist_ok=True)
        env = {**self.env, **supernode_env(site_dir), "FLWR_HOME": str(home.resolve())}
        if self.threads:
            env.setdefault("OMP_NUM_THREADS", str(self.threads))
        if not supervised:
            proc = self._spawn(name, supernode_command(site_dir), env)
            if (worker := worker_command(site_dir)) is not None:  # the same log, stopped with it
                self._spawn(f"{name}:worker", worker, env, log=name)
            return proc
        from fedshield.site_supervisor import LOG_FILE

        self.site_logs[name] = site_dir / LOG_FILE
        return self._spawn(name, [sys.executable, "-m", "fedshield.cli", "site", "run",
                                  str(site_dir.resolve())], env)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        """Send ``sig`` to a process group we started; SIGKILL it if it outlives ``timeout``."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if f"{name}:worker" in self.procs:  # an unsupervised site's worker goes with it
            self.stop(f"{name}:worker", sig, timeout)
        try:
            os.killpg(proc.pid, sig)
            return proc.wait(timeout=timeout)
        except ProcessLookupError:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait(timeout=timeout)

    def close(self) -> None:
        """Stop every SuperNode, then the SuperLink."""
        for name in [n for n in self.procs if n != "superlink"] + ["superlink"]:
            try:
                self.stop(name, timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass

    # --- runs -----------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 60) -> dict:
        """Run a ``flwr`` CLI command with ``--format json``; its parsed output."""
        proc = subprocess.run([flwr_bin("flwr"), *args, "--format", "json"], env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        try:
            out = json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"flwr {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}") \
                from exc
        if not out.get("success", False):
            raise RuntimeError(f"flwr {' '.join(args)}: {out}")
        return out

    def submit(self, run_config: str) -> int:
        """``flwr run`` the fedshield app with ``--run-config`` overrides; returns the run id."""
        out = self.flwr("run", str(app_dir()), CONNECTION, "--run-config", run_config)
        return int(out["run-id"])

    def run_info(self, run_id: int) -> dict:
        """The ``flwr ls`` record of run ``run_id``."""
        return self.flwr("ls", CONNECTION, "--run-id", str(run_id))["runs"][0]

    def wait_run(self, run_id: int, timeout: float, poll: float = 2.0) -> dict:
        """Poll until the run finishes; its last ``flwr ls`` record."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.run_info(run_id)
            if info["status"].startswith("finished"):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {info['status']} after {timeout:.0f} s")
            time.sleep(poll)

    def stop_run(self, run_id: int) -> None:
        """Stop run ``run_id`` on the SuperLink."""
        self.flwr("stop", str(run_id), CONNECTION)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    """Poll ``predicate`` until it returns something truthy; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
