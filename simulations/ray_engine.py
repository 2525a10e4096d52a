"""``federation.engine = "ray"``: the same ServerApp and ClientApps on Flower's Ray backend.

Flower's current simulation runtime (the ``flwr-simulation`` process that ``flwr run`` starts
for a local simulation federation) installs the app, writes the fused run config into the
ServerApp's Context and a ``Run``'s ``override_config``, and calls the simulation engine with an
app directory whose pyproject.toml the SuperNodes' contexts read their run config from. The
deprecated ``run_simulation`` does none of that: the apps saw the pyproject defaults, not the
experiment. Here fedshield makes the same call as ``flwr-simulation``: a temporary app directory
holding this run's config, the ServerApp Context carrying it, the in-memory apps (no FAB).

A cluster is joined through the backend's ``init_args`` (``address``), which Flower's Ray
backend passes to ``ray.init``; client resources are Ray resources per ClientApp actor.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import cast

import numpy as np
from fedshield.client.app import make_client_app
from fedshield.simulations.adversary import simulated_client_data
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedshield import schema
from fedshield.configio import to_flwr_table
from fedshield.errors import FedShieldError, RunFailed

NODES_FILE = "ray_nodes.jsonl"  # which Ray node and process trained each client, per round
CLIENT_APP_EXCEPTION = 1  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION (as the in-process grid)


def backend_config(fed: schema.FederationConfig) -> dict:
    """Flower's Ray backend config: resources per ClientApp, and the cluster to join."""
    init_args: dict[str, str] = {}
    if fed.ray_address:  # ray.init(address=...): join `ray start`'s cluster, start none
        init_args["address"] = fed.ray_address
    return {"client_resources": {"num_cpus": fed.ray_client_cpus,
                                 "num_gpus": fed.ray_client_gpus},
            "init_args": init_args}


def cluster_problem(address: str, timeout: float = 10.0) -> str | None:
    """Why the head at ``host:port`` cannot be reached, or None. ``ray.init`` retries an
    unreachable address for many minutes; a closed port should fail the run at once.
    ("auto" and ray:// addresses are left to Ray.)"""
    if not address or address == "auto" or address.startswith("ray://"):
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return (f"no Ray head answers at federation.ray_address = {address!r} "
                f"({type(exc).__name__}: {exc}); start one with `ray start --head --port "
                f"{port}` or fix the address")


def write_app_dir(app_dir: Path, cfg: schema.Config) -> None:
    """A minimal Flower App directory whose run config is ``cfg`` (what a SuperNode's Context
    reads through ``get_fused_config_from_dir``); the apps themselves are passed in memory."""
    (app_dir / "pyproject.toml").write_text(
        '[project]\nname = "fedshield-simulation"\nversion = "0.0.0"\n\n'
        '[tool.flwr.app]\npublisher = "fedshield"\n\n'
        '[tool.flwr.app.components]\nserverapp = "fedshield.flower:serverapp"\n'
        'clientapp = "fedshield.simulations.flower_apps:clientapp"\n\n'
        "[tool.flwr.app.config]\n" + to_flwr_table(cfg), encoding="utf-8")


def _ray_node() -> str:
    """The Ray node this process runs on ("" outside a Ray worker)."""
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id()) if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 — provenance only: never fail a client over it
        return ""


def ray_client_app(nodes_file: Path | None = None) -> ClientApp:
    """The ClientApp every simulated node runs on Ray: the honest app on the data the run's
    simulated attack gives it (adversary.simulated_client_data), recording which Ray node and
    process trained each client (``nodes_file``, on a filesystem the nodes share), and turning
    a client's exception into an error reply with a one-line reason (no Ray traceback reaches
    metrics.jsonl)."""
    inner = make_client_app(load_data=simulated_client_data)
    app = ClientApp()

    def guarded(msg: Message, context: Context) -> Message:
        try:
            return inner(msg, context)
        except Exception as exc:  # noqa: BLE001 — reported to the server like the in-process grid
            return Message(Error(code=CLIENT_APP_EXCEPTION,
                                 reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if nodes_file is not None:
            config = msg.content.config_records.get("config")
            line = {"round": int(cast(int, config.get("server-round", 0))) if config else 0,
                    "partition": int(context.node_config["partition-id"]),
                    "ray_node": _ray_node(), "host": socket.gethostname(), "pid": os.getpid()}
            with open(nodes_file, "a", encoding="utf-8") as out:  # one short append: atomic
                out.write(json.dumps(line) + "\n")
        return guarded(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return guarded(msg, context)

    return app


def run_on_ray(cfg: schema.Config, server_app: ServerApp, run_dir: Path) -> None:
    """Run ``server_app`` against ``num_clients`` simulated nodes on Flower's Ray backend.

    Raises RunFailed when the runtime or the ServerApp failed (the ServerApp's own RunFailed
    passes through unchanged)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    run_config = cfg.flat()
    rng = np.random.default_rng(cfg.seed)
    run = Run.create_empty(run_id=int(rng.integers(1, 2**62)))
    run.primary_task_id = int(rng.integers(1, 2**62))
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(run_config)
    # Messages the ServerApp creates read their sender from here (as flwr-simulation sets it).
    TaskIdentity.task_id, TaskIdentity.run_id = 1, run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=dict(run_config))
    problem = cluster_problem(cfg.federation.ray_address)
    if problem is not None:
        raise RunFailed(f"{problem} (run folder {run_dir})")
    client_app = ray_client_app(run_dir / NODES_FILE)
    with TemporaryDirectory(prefix="fedshield-ray-app-") as app_dir:
        write_app_dir(Path(app_dir), cfg)
        try:
            _run_simulation(num_supernodes=cfg.federation.num_clients,
                            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                            client_app=client_app, server_app=server_app, backend_name="ray",
                            backend_config=backend_config(cfg.federation),
                            server_app_context=context, app_dir=app_dir, run=run, is_app=True)
        except FedShieldError:
            raise
        except Exception as exc:  # Ray's errors: one typed error that says what went wrong
            cause = exc.__cause__ or exc
            where = (f"the Ray cluster at federation.ray_address = {cfg.federation.ray_address!r}"
                     if cfg.federation.ray_address else "a local Ray instance")
            raise RunFailed(f"the Ray engine failed on {where}: {type(cause).__name__}: "
                            f"{str(cause).splitlines()[0] if str(cause) else ''} (run folder "
                            f"{run_dir}); check the cluster with `ray status`") from exc
