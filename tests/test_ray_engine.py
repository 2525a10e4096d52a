"""Simulated attacks on any engine (the strategy-level reply hook) and the Ray engine, on a real
two-node Ray cluster started on 127.0.0.1."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fedshield.client.app import make_client_app
from fedshield.server import hooks
from fedshield.server.app import build_server_app, run_federation
from fedshield.simulations import adversary
from fedshield.simulations.grid import InProcessGrid
from fedshield.simulations.ray_engine import NODES_FILE, backend_config, ray_client_app
from fedshield.simulations.runner import simulate
from flwr.app import Context, Message, RecordDict
from safetensors.torch import load_file

from fedshield.errors import ConfigError, RunFailed
from tests.config_support import neutral_config

RAY = Path(sys.executable).with_name("ray")


def digits_attack_config(tmp: Path, **federation) -> object:
    return neutral_config({"name": "hook", "output_dir": str(tmp), "task": {"name": "digits"},
                           "federation": {"num_clients": 4, "rounds": 2, **federation},
                           "partition": {"kind": "iid"},
                           "train": {"lr": 0.1, "batch_size": 16},
                           "attack": {"name": "alie", "byzantine_ids": "1"},
                           "deployment": {"handoff": False}})


def recording(hook, seen: list):
    """``hook``, keeping a copy of every round's replies as the strategy receives them."""
    def wrapped(sent: list[Message], replies: list[Message]) -> list[Message]:
        out = hook(sent, replies)
        seen.append([{k: v.numpy() for k, v in r.content["arrays"].items()}
                     for r in out if not r.has_error() and "arrays" in r.content])
        return out
    return wrapped


def run_inprocess(cfg, run_dir: Path, grid_filter) -> dict:
    """The ServerApp on the in-process grid; ``grid_filter`` is the old grid-level reply filter
    (None: the strategy's hook, as `fedshield simulate` installs it)."""
    apps = {p: make_client_app() for p in range(cfg.federation.num_clients)}
    apps, _ = adversary.adversarial_apps(cfg, apps)
    grid = InProcessGrid(apps, cfg.flat(), cfg.seed, reply_filter=grid_filter)
    run_dir.mkdir(parents=True)
    app = build_server_app(None, str(run_dir))
    app(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=cfg.flat()))
    return load_file(str(run_dir / "model.safetensors"))


def test_attack_hook_gives_the_replies_of_the_old_grid_filter(tmp_path):
    cfg = digits_attack_config(tmp_path)
    via_grid: list = []
    via_hook: list = []
    identity: list = []
    try:
        # Old path: the grid filters the replies; the strategy's hook is registered as a no-op.
        hooks.register_reply_hook(hooks.ATTACK, lambda _cfg: None)
        old = run_inprocess(cfg, tmp_path / "grid",
                            recording(adversary.attack_reply_hook(cfg), via_grid))
        # New path: the strategy wraps aggregate_train with the registered attack hook.
        hooks.register_reply_hook(
            hooks.ATTACK, lambda c: recording(adversary.attack_reply_hook(c), via_hook))
        new = run_inprocess(cfg, tmp_path / "hook", None)
        # Control: the same run with an attacker that changes nothing must differ.
        hooks.register_reply_hook(
            hooks.ATTACK, lambda c: recording(lambda sent, replies: replies, identity))
        honest = run_inprocess(cfg, tmp_path / "honest", None)
    finally:
        adversary.install_attack_hook()
    assert len(via_grid) == len(via_hook) == cfg.federation.rounds
    for old_round, new_round in zip(via_grid, via_hook, strict=True):
        assert len(old_round) == len(new_round) == cfg.federation.num_clients
        for a, b in zip(old_round, new_round, strict=True):
            # Same code, same inputs, same order: bit for bit.
            assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(torch.equal(old[k], new[k]) for k in old)
    assert not all(torch.equal(old[k], honest[k]) for k in old)  # the attack did something


def test_a_simulated_attack_without_its_hook_is_refused(tmp_path):
    cfg = digits_attack_config(tmp_path)
    hooks.unregister_reply_hook(hooks.ATTACK)
    try:
        with pytest.raises(ConfigError, match="no attack hook is registered"):
            run_federation(None, cfg)  # refused before the grid is touched
    finally:
        adversary.install_attack_hook()


def test_backend_config_joins_the_configured_cluster_with_the_configured_resources(tmp_path):
    cfg = digits_attack_config(tmp_path, ray_address="127.0.0.1:6390", ray_client_cpus=0.5,
                               ray_client_gpus=0.25)
    assert backend_config(cfg.federation) == {
        "client_resources": {"num_cpus": 0.5, "num_gpus": 0.25},
        "init_args": {"address": "127.0.0.1:6390"}}
    local = backend_config(digits_attack_config(tmp_path).federation)
    assert local["init_args"] == {}  # "" starts a local Ray instance


def test_a_failing_client_on_ray_replies_a_one_line_reason(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):  # a server-built message needs them
        monkeypatch.setattr(TaskIdentity, name, 1)
    app = ray_client_app(None)
    cfg = digits_attack_config(tmp_path)
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")  # no arrays: it raises
    reply = app(msg, Context(run_id=1, node_id=1, node_config={"partition-id": 0,
                                                               "num-partitions": 4},
                             state=RecordDict(), run_config=cfg.flat()))
    assert reply.has_error()
    assert "\n" not in reply.error.reason and "Traceback" not in reply.error.reason


def test_an_unreachable_cluster_fails_the_run_at_once(tmp_path):
    port = _free_port()  # closed again once returned: nothing listens there
    cfg = digits_attack_config(tmp_path, engine="ray", ray_address=f"127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(RunFailed, match="no Ray head answers at federation.ray_address"):
        simulate(cfg)
    assert time.monotonic() - start < 120  # not ray.init's minutes of retries


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_node(args: list[str], log: Path) -> subprocess.Popen:
    # Its own session: stopping the node kills exactly its process group (gcs, raylet, workers),
    # never another Ray on this machine, as a plain `ray stop` would.
    return subprocess.Popen([str(RAY), "start", "--block", "--num-cpus", "1",
                             "--object-store-memory", str(80 * 2**20), "--disable-usage-stats",
                             *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def _stop_node(node: subprocess.Popen) -> None:
    if node.poll() is None:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=30)


def _wait_for_nodes(address: str, count: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = subprocess.run([str(RAY), "status", "--address", address], capture_output=True,
                             text=True, timeout=120).stdout
        if out.count(" node_") >= count:
            return
        time.sleep(3)
    raise AssertionError(f"the Ray cluster at {address} did not reach {count} nodes:\n{out}")


@pytest.mark.slow
@pytest.mark.skipif(not RAY.exists(), reason="the ray CLI is not installed")
def test_attacked_federation_on_a_two_node_ray_cluster(tmp_path):
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # Short temp dirs: Ray's unix socket paths must stay under 108 characters.
    dirs = [tempfile.mkdtemp(prefix="fsray", dir="/tmp") for _ in range(2)]
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(_start_node(
            ["--head", "--port", str(port), "--temp-dir", dirs[0], "--include-dashboard",
             "false", "--dashboard-port", str(_free_port()), "--ray-client-server-port",
             str(_free_port()), "--dashboard-agent-listen-port", str(_free_port())],
            tmp_path / "head.log"))
        _wait_for_nodes(address, 1)
        nodes.append(_start_node(
            ["--address", address, "--temp-dir", dirs[1], "--dashboard-agent-listen-port",
             str(_free_port())], tmp_path / "worker.log"))
        _wait_for_nodes(address, 2)
        cfg = digits_attack_config(tmp_path, engine="ray", ray_address=address)
        summary = simulate(cfg)
    finally:
        for node in reversed(nodes):
            _stop_node(node)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    run_dir = Path(summary.run_dir)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not summary.failed, summary.failure
    assert [m["round"] for m in lines] == [1, 2]  # federation.rounds = 2, not Config()'s 8
    assert all(m["accepted"] == 4 for m in lines), lines  # num_clients = 4 all trained
    assert lines[-1]["accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert summary.attack_report is not None and summary.attack_report.byzantine_ids == (1,)
    ran = [json.loads(x) for x in (run_dir / NODES_FILE).read_text().splitlines()]
    assert sorted({r["partition"] for r in ran}) == [0, 1, 2, 3]
    assert len({r["ray_node"] for r in ran}) == 2, ran  # both nodes trained clients


def test_the_flwr_run_components_register_the_attack_hook(monkeypatch):
    monkeypatch.delitem(sys.modules, "fedshield.simulations.flower_apps", raising=False)
    hooks.unregister_reply_hook(hooks.ATTACK)
    try:
        import fedshield.simulations.flower_apps as components
        from flwr.clientapp import ClientApp
        from flwr.serverapp import ServerApp

        assert isinstance(components.serverapp, ServerApp)
        assert isinstance(components.clientapp, ClientApp)
        assert hooks._REPLY_HOOKS[hooks.ATTACK] is adversary.attack_reply_hook
    finally:
        adversary.install_attack_hook()


def test_a_byzantine_partition_of_a_data_attack_loads_poisoned_data(tmp_path):
    cfg = neutral_config({"task": {"name": "digits"}, "output_dir": str(tmp_path),
                          "federation": {"num_clients": 4},
                          "attack": {"name": "label_flip", "byzantine_ids": "1"}})

    def data(pid: int):
        ctx = Context(run_id=1, node_id=1, node_config={"partition-id": pid,
                                                        "num-partitions": 4},
                      state=RecordDict(), run_config=cfg.flat())
        _, train, _ = adversary.simulated_client_data(ctx, cfg)
        honest_cfg = neutral_config({"task": {"name": "digits"}, "output_dir": str(tmp_path),
                                     "federation": {"num_clients": 4}})
        _, clean, _ = adversary.load_client_data(ctx, honest_cfg)
        return train, clean

    poisoned, clean = data(1)
    assert np.array_equal(poisoned.y, 9 - clean.y)  # label_flip: y -> num_classes - 1 - y
    honest, clean = data(0)
    assert np.array_equal(honest.y, clean.y)
