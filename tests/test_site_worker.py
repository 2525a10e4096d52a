"""fedshield's long-lived ClientApp executor (fedshield/site_worker.py): the checks of a task's
FAB against the installed app, the site kit's commands, the supervisor keeping the worker up,
and (slow: ~2 min, 5 at load 11) a TLS + node-auth federation of 2 sites served by one worker
process per site across three runs, with its data loaded once and again only when it changes.

Do not edit the checkout's .py files while the slow test runs: each run's FAB is built from it,
and a site worker refuses a FAB whose code differs from what it loaded (by design)."""

import io
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fedshield.tasks import get_task
from fedshield.tasks.partition import cached_partitions

from fedshield import configio
from fedshield.errors import ConfigError
from fedshield.schema import PartitionConfig
from fedshield.site import app_dir, init_sites, supernode_command, worker_command
from fedshield.site_local import LocalFederation, free_port, wait_for
from fedshield.site_worker import fab_mismatch, installed_app
from tests.config_support import neutral_config


@pytest.fixture(scope="module")
def fab_and_app():
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir()), installed_app(app_dir())


def _replace_member(fab: bytes, name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data if info.filename == name else src.read(info.filename))
    return out.getvalue()


def test_the_installed_apps_own_fab_is_accepted_and_any_other_refused(fab_and_app):
    fab, app = fab_and_app
    assert app.fab_id == "fedshield/fedshield" and "client/app.py" in app.sources
    assert fab_mismatch(fab, app.fab_id, app.version, app) is None
    # the coordinator's app would run other client code: refused, naming the file
    changed = _replace_member(fab, "client/fit.py", b"print('not the site code')\n")
    why = fab_mismatch(changed, app.fab_id, app.version, app)
    assert why is not None and "client/fit.py" in why and "1 Python file" in why
    # another app, or another version of this one
    assert "other/app" in fab_mismatch(fab, "other/app", app.version, app)
    assert "9.9.9" in fab_mismatch(fab, app.fab_id, "9.9.9", app)
    assert "not a readable zip" in fab_mismatch(b"junk", app.fab_id, app.version, app)


def test_installed_app_needs_the_project_folder(tmp_path):
    with pytest.raises(ConfigError, match="pyproject.toml"):
        installed_app(tmp_path)


def test_the_kit_runs_the_supernode_in_process_isolation_next_to_the_worker(tmp_path):
    kit = init_sites(tmp_path / "kit", 1, port=free_port(), node_ports=[9999])
    site = kit.site(1)
    assert supernode_command(site)[1:3] == ["--isolation", "process"]
    assert worker_command(site)[1:] == ["-m", "fedshield.site_worker", "--runtime-api-address",
                                        "127.0.0.1:9999", "--poll-interval", "0.1"]
    assert "fedshield.site_worker" in (site / "COMMANDS.md").read_text()
    toml = (site / "site.toml").read_text()
    (site / "site.toml").write_text(toml.replace('client_process = "long-lived"',
                                                 'client_process = "per-message"'))
    assert "--isolation" not in supernode_command(site) and worker_command(site) is None
    (site / "site.toml").write_text(toml.replace('client_process = "long-lived"',
                                                 'client_process = "warm"'))
    with pytest.raises(ConfigError, match="client_process must be one of"):
        worker_command(site)


def test_the_worker_times_its_tasks_and_marks_them(capsys, monkeypatch):
    from fedshield.client import timing

    monkeypatch.setattr(sys, "argv", ["pytest"])
    timing.note_message("train", 1.0, 7, "1", 2.0)
    assert timing.PREFIX not in capsys.readouterr().err  # not a client process: no line
    timing.begin_task(1.5)
    try:
        timing.note_message("train", 1.0, 7, "1", 2.0)
    finally:
        timing.begin_task(None)
    (line,) = timing.parse_log(capsys.readouterr().err)
    assert line["process_start"] == 1.5 and line["worker"] and line["pid"] > 0


def test_the_supervisor_restarts_a_failing_worker_and_stops_it_with_the_supernode(tmp_path):
    from fedshield.site_supervisor import RestartPolicy, alive, read_state, supervise

    # the worker stand-in fails on its first start, then runs until stopped; the SuperNode
    # stand-in exits cleanly after 4 s, which ends the supervisor and the worker with it
    worker = [sys.executable, "-c",
              "import os, pathlib, sys, time; p = pathlib.Path(sys.argv[1]); "
              "first = not p.exists(); p.write_text('x'); "
              "print('worker up', os.getpid(), flush=True); "
              "sys.exit(3) if first else time.sleep(600)", str(tmp_path / "started")]
    node = [sys.executable, "-c", "import time; time.sleep(4)"]
    pids: list[int] = []

    def pause(_seconds: float) -> None:  # no real wait; note the worker that failed
        pids.append(-1)

    started = time.monotonic()
    code = supervise(node, {}, tmp_path, RestartPolicy(first=0.1), sleep=pause, worker=worker)
    assert code == 0 and time.monotonic() - started < 30
    state = read_state(tmp_path)
    assert state["worker_restarts"] == 1 and pids == [-1]
    assert state["stopped"] and state["worker_pid"] is None and state["restarts"] == 0
    log = (tmp_path / "logs" / "supernode.log").read_text()
    assert "worker exited with 3" in log
    up = [int(x.split()[-1]) for x in log.splitlines() if x.startswith("worker up")]
    assert len(up) == 2 and not any(alive(p) for p in up)  # the worker went with the SuperNode


# --- a real federation ------------------------------------------------------------------------
def write_digits_npz(path: Path, partition: int, sites: int, keep: int | None = None) -> None:
    """A site's own data: its digits partition as an .npz (the first ``keep`` examples)."""
    train, _ = get_task("digits").load()
    part = cached_partitions("digits", sites, PartitionConfig(kind="iid"), 0)[partition][:keep]
    np.savez(path, x=train.x[part], y=train.y[part])


def timing_lines(fed: LocalFederation, site: str) -> list[dict]:
    from fedshield.client.timing import parse_log

    return parse_log(fed.log(site))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_one_worker_process_serves_every_run_and_reloads_only_changed_data(tmp_path):
    sites = 2
    kit = init_sites(tmp_path / "kit", sites, port=free_port(),
                     node_ports=[free_port() for _ in range(sites)])  # TLS + node auth
    data = kit.site(1) / "data.npz"
    write_digits_npz(data, 0, sites)
    toml = (kit.site(1) / "site.toml").read_text()
    (kit.site(1) / "site.toml").write_text(toml.replace('data-path = ""',
                                                        'data-path = "data.npz"'))
    out = tmp_path / "runs"

    def run_config(name: str, dp: bool, rounds: int) -> str:
        return configio.to_run_config_overrides(neutral_config({
            "task": {"name": "digits"}, "output_dir": str(out / name),
            "federation": {"num_clients": sites, "min_clients": sites, "round_timeout": 60.0,
                           "rounds": rounds},
            "partition": {"kind": "iid"}, "train": {"lr": 0.1},
            "privacy": {"enabled": dp, "noise_multiplier": 1.0, "ledger_scope": "federation"},
            "deployment": {"handoff": False}}))

    def one_run(name: str, dp: bool, rounds: int = 1) -> list[dict]:
        run_id = fed.submit(run_config(name, dp, rounds))
        assert fed.wait_run(run_id, 150)["status"] == "finished:completed"
        path = next((out / name).glob("*/metrics.jsonl"))
        return [json.loads(x) for x in path.read_text().splitlines() if x]

    with LocalFederation(kit.root, tmp_path / "logs") as fed:
        fed.start_superlink()
        fed.register()
        fed.start_site(kit.site(1), supervised=True)  # as a partner runs it: `fedshield site run`
        fed.start_site(kit.site(2))
        wait_for(lambda: sum(n["status"] == "online" for n in
                             fed.flwr("supernode", "list", "fedshield")["nodes"]) == sites,
                 90, "SuperNodes online")
        dp_run = one_run("dp", dp=True, rounds=2)
        plain_run = one_run("plain", dp=False)  # nothing of the DP run carries over
        write_digits_npz(data, 0, sites, keep=200)  # the partner replaces its data
        changed_run = one_run("changed", dp=False)

    assert all(m["accepted"] == sites for m in dp_run + plain_run + changed_run)
    assert all(m["epsilon"] for m in dp_run) and not any(m["epsilon"] for m in plain_run)
    for k in range(1, sites + 1):
        lines = [t for t in timing_lines(fed, f"site-{k}") if t["kind"] == "train"]
        assert len(lines) == 4 and all(t["worker"] for t in lines)
        assert len({t["pid"] for t in lines}) == 1, lines  # one process for every message
    log = fed.log("site-1")
    loads = [line for line in log.splitlines() if "data cache: loaded from the source" in line]
    # read from the file once, then from memory, and again once the file changed
    assert len(loads) == 2 and loads[0].rsplit("(data ", 1)[1] != loads[1].rsplit("(data ", 1)[1]
    assert log.count("fedshield data cache: hit in memory") >= 2
    assert "refused the run" not in log
    # only the DP run spent from the site's ledger
    from tests.test_sites import ledger_history

    assert {e["run_id"] for e in ledger_history(kit.site(1))} == {
        next((out / "dp").iterdir()).name}


@pytest.fixture
def offline_worker(monkeypatch, fab_and_app):
    """A Worker whose Runtime API calls are Flower's functions replaced by recorders: the task
    pulled is one train message of run 5 with the installed app's own FAB."""
    import dataclasses

    from flwr.app import Context, Message, RecordDict
    from flwr.supercore import heartbeat
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.runtime import run_clientapp

    from fedshield.site_worker import Worker

    fab, app = fab_and_app
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 5, 1, 3
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as pull_task_input sets it
    context = Context(run_id=5, node_id=1, node_config={}, state=RecordDict(), run_config={})
    run = dataclasses.replace(Run.create_empty(5), fab_id=app.fab_id, fab_version=app.version)
    pushed: list = []

    class Beat:  # Flower's heartbeat thread would call the (absent) SuperNode
        def __init__(self, _fn) -> None:
            self.is_running = False

        def start(self) -> None:
            self.is_running = True

        def stop(self) -> None:
            self.is_running = False
            pushed.append(("heartbeat stopped",))

    monkeypatch.setattr(heartbeat, "HeartbeatSender", Beat)
    monkeypatch.setattr(run_clientapp, "pull_task_input",
                        lambda _c: (msg, context, run, Fab("h", pushed_fab[0], {})))
    monkeypatch.setattr(run_clientapp, "push_message",
                        lambda _c, reply, ctx: pushed.append(("reply", reply, ctx)))
    monkeypatch.setattr(run_clientapp, "push_task_output",
                        lambda client, context, sub_status, details:
                        pushed.append(("output", sub_status, details)))
    pushed_fab = [fab]
    worker = Worker("127.0.0.1:1", app_root=app.root)
    return worker, pushed, pushed_fab


def test_a_failing_task_comes_back_as_an_error_reply(offline_worker):
    worker, pushed, _ = offline_worker

    def broken(message, context):
        raise ValueError("boom")

    worker.app = broken
    assert worker.run_task("token") is False
    (_, reply, _), beat, (_, status, details) = pushed
    # the heartbeat ends before the task is closed (a late one would get a 401: SIGINT)
    assert beat == ("heartbeat stopped",)
    assert reply.has_error() and reply.error.code == 2 and "boom" in reply.error.reason
    assert status == "failed" and "boom" in details


def test_a_foreign_fab_is_refused_with_an_error_reply(offline_worker):
    worker, pushed, fab = offline_worker
    fab[0] = _replace_member(fab[0], "client/app.py", b"raise SystemExit('coordinator code')\n")
    called = []
    worker.app = lambda message, context: called.append(1)
    assert worker.run_task("token") is False and not called  # the site's app never ran
    reply = pushed[0][1]
    assert reply.error.code == 1 and "refused the run" in reply.error.reason
    assert "client/app.py" in reply.error.reason


def test_a_stop_mid_task_still_answers_then_leaves(offline_worker):
    from fedshield.site_worker import Stop

    worker, pushed, _ = offline_worker

    def stopped(message, context):
        raise Stop("SIGTERM")

    worker.app = stopped
    with pytest.raises(Stop):
        worker.run_task("token")
    assert pushed[0][1].has_error() and pushed[-1][1] == "failed"


def test_sigint_in_a_task_aborts_that_task_only(offline_worker):
    from fedshield.site_worker import TaskAborted

    worker, pushed, _ = offline_worker

    def interrupted(message, context):
        raise TaskAborted("interrupted")

    worker.app = interrupted
    assert worker.run_task("token") is False and not worker.in_task  # the worker goes on
    assert "interrupted" in pushed[0][1].error.reason and pushed[-1][1] == "failed"
