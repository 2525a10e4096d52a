"""Across sites on 127.0.0.1: a real SuperLink with TLS and SuperNode authentication, three
authenticated SuperNodes training the MNIST task with DP-SGD (one reading its own CSV of raw
pixels through tasks.local), an
unregistered one that is turned away, and a site that goes down mid-run while the federation
finishes without it (~3-4 min, in CI).

The restart/resume variants (a site restarted keeps its ledger; a stopped ServerApp resumed from its
run folder) take ~5 more minutes; CI runs them too."""

import csv
import json
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from fedshield.server.checkpoint import load_checkpoint
from fedshield.tasks import evaluate, get_task
from fedshield.tasks.images import MNIST_MEAN, MNIST_STD
from fedshield.tasks.partition import cached_partitions

from fedshield import configio
from fedshield.schema import PartitionConfig
from fedshield.site import init_sites, site_status, write_node_key
from fedshield.site_local import LocalFederation, free_port, wait_for
from tests.config_support import neutral_config

NUM_SITES = 3
TASK = "mnist5k"  # the MNIST task (its 5,000-digit sample) with the DP-friendly CNN


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []


def write_site_csv(path: Path, partition: int) -> None:
    """Site 1's own data: its MNIST (5,000-digit sample) partition as a CSV: a label column and
    784 raw pixel columns (0-255), as a partner would export them."""
    train, _ = get_task(TASK).load()
    part = cached_partitions(TASK, NUM_SITES, PartitionConfig(kind="iid"), 0)[partition]
    pixels = np.clip(np.rint((train.x * MNIST_STD + MNIST_MEAN) * 255), 0, 255).astype(int)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", *(f"pixel{k}" for k in range(784))])
        for i in part:
            w.writerow([int(train.y[i]), *pixels[i].reshape(-1)])


def set_node_config(site: Path, key: str, value: str) -> None:
    toml = (site / "site.toml").read_text()
    start = toml.index(f"\n{key} = ") + 1
    end = toml.index("\n", start)
    (site / "site.toml").write_text(toml[:start] + f"{key} = {value}" + toml[end:])


def rogue_site(kit, path: Path) -> Path:
    """A copy of site 3 with a fresh key pair the coordinator never registered."""
    shutil.copytree(kit.site(NUM_SITES), path)
    for name in ("node_key", "node_key.pub"):
        (path / name).unlink()
    write_node_key(path / "node_key", "rogue")
    set_node_config(path, "port", str(free_port()))
    return path


def online_nodes(fed: LocalFederation) -> int:
    nodes = fed.flwr("supernode", "list", "fedshield")["nodes"]
    return sum(n["status"] == "online" for n in nodes)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_three_sites_with_tls_auth_rejection_and_a_site_going_down(tmp_path):
    kit = init_sites(tmp_path / "kit", NUM_SITES, port=free_port(),
                     node_ports=[free_port() for _ in range(NUM_SITES)])
    data = kit.site(1) / "data.csv"
    write_site_csv(data, 0)
    set_node_config(kit.site(1), "data-path", '"data.csv"')
    rogue = rogue_site(kit, tmp_path / "rogue")
    out = tmp_path / "runs"

    with LocalFederation(kit.root, tmp_path / "logs") as fed:
        fed.start_superlink()
        fed.register()
        for k in range(1, NUM_SITES + 1):
            fed.start_site(kit.site(k))
        intruder = fed.start_site(rogue, "rogue")
        wait_for(lambda: online_nodes(fed) == NUM_SITES, 90, "three SuperNodes online")

        # (a) an unregistered key is turned away by the SuperLink
        assert intruder.wait(timeout=90) == 1, fed.log("rogue")[-2000:]
        assert "code: 2004" in fed.log("rogue")

        run_id = fed.submit(
            configio.to_run_config_overrides(neutral_config({
                "task": {"name": TASK, "model": "tanh_cnn"},
                "federation": {"num_clients": NUM_SITES, "min_clients": 2, "rounds": 3,
                               "round_timeout": 60.0},
                "partition": {"kind": "iid"},
                "train": {"lr": 0.5, "momentum": 0.5, "batch_size": 64},
                "privacy": {"enabled": True, "noise_multiplier": 1.0},
                "output_dir": str(out), "deployment": {"handoff": False}})))
        # Round 1 starts a clientapp process per site (torch import, MNIST load): give it time.
        run_dir = wait_for(lambda: next(iter(out.glob("*/metrics.jsonl")), None), 360,
                           "round 1's metrics").parent

        # (b) site 3 goes down after round 1; the others finish the run
        assert fed.stop(f"site-{NUM_SITES}", signal.SIGTERM) is not None
        info = fed.wait_run(run_id, timeout=420)
        assert info["status"] == "finished:completed", info

    lines = metrics(run_dir)
    assert [m["round"] for m in lines] == [1, 2, 3]
    assert lines[0]["accepted"] == NUM_SITES and not lines[0]["refused"], lines[0]
    assert lines[-1]["sampled"] == NUM_SITES - 1 and lines[-1]["accepted"] == NUM_SITES - 1
    assert all(m["accepted"] >= NUM_SITES - 1 for m in lines)
    assert lines[-1]["accuracy"] > lines[0]["accuracy"] and lines[-1]["accuracy"] > 0.3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    # DP-SGD on every site: epsilon reported each round, growing, and kept in each site's ledger
    assert set(lines[0]["epsilon"]) == {"0", "1", "2"}
    eps_site1 = [m["epsilon"]["0"] for m in lines]
    assert 0 < eps_site1[0] < eps_site1[1] < eps_site1[2]
    assert len(ledger_history(kit.site(1))) == 3  # one event per round it trained
    assert len(ledger_history(kit.site(NUM_SITES))) == 1  # trained round 1 only


def ledger_history(site: Path, releases: bool = False) -> list[dict]:
    """The site's training events (``releases``: its statistics-release events instead)."""
    from fedshield.client.releases import RELEASE_TAG

    files = list((site / "ledger").rglob("client-*.json"))
    assert len(files) == 1, files
    return [e for e in json.loads(files[0].read_text())["events"]
            if (RELEASE_TAG in e["run_id"]) == releases]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dp_ledger_survives_site_restart_and_server_resume(tmp_path):
    """(c) a restarted SuperNode keeps its cumulative epsilon; (d) a stopped ServerApp resumed from
    its run folder continues at the next round with the checkpointed weights, and no round's
    privacy cost is recorded twice."""
    sites = 2
    kit = init_sites(tmp_path / "kit", sites, port=free_port(),
                     node_ports=[free_port() for _ in range(sites)])
    # Each run plans its sample rate from the class histogram's noised total (std ~160 examples
    # on ~420-example sites), so what a round costs is chance; this test is about the ledger
    # surviving restarts, not the cap (tests/test_dp_run.py): the partners raise theirs.
    for k in range(1, sites + 1):
        toml = kit.site(k) / "site.toml"
        toml.write_text(re.sub(r"(?m)^max-epsilon = .*$", "max-epsilon = 100.0", toml.read_text()))
    out = tmp_path / "runs"
    def run_config(rounds: int, output_dir: Path, resume: str = "") -> str:
        """Every key given, so the runs do not depend on configs/default.toml."""
        return configio.to_run_config_overrides(neutral_config({
            "task": {"name": "digits"}, "output_dir": str(output_dir), "resume": resume,
            "federation": {"num_clients": sites, "min_clients": sites, "round_timeout": 90.0,
                           "rounds": rounds},
            "partition": {"kind": "iid"}, "train": {"lr": 0.1},
            "privacy": {"enabled": True, "noise_multiplier": 1.0, "ledger_scope": "federation"},
            "deployment": {"handoff": False}}))

    with LocalFederation(kit.root, tmp_path / "logs") as fed:
        fed.start_superlink()
        fed.register()
        for k in range(1, sites + 1):  # site 1 as a partner runs it: `fedshield site run`
            fed.start_site(kit.site(k), supervised=k == 1)
        wait_for(lambda: online_nodes(fed) == sites, 90, "SuperNodes online")

        # (c) one DP run, restart site 1, a second run: its epsilon keeps growing
        first = fed.submit(run_config(1, out / "first"))
        assert fed.wait_run(first, 240)["status"] == "finished:completed"
        eps_first = metrics(next((out / "first").iterdir()))[-1]["epsilon"]["0"]
        events_first = ledger_history(kit.site(1))
        status = site_status(kit.site(1))
        assert status["connection"].startswith("connected")
        assert status["last_round_served"] == {"run": first, "round": "1"}
        assert status["privacy"]["sites"][0]["total_epsilon"] == pytest.approx(eps_first,
                                                                                rel=1e-3)
        assert fed.stop("site-1", signal.SIGTERM) is not None
        assert site_status(kit.site(1))["connection"] == "not running"
        fed.start_site(kit.site(1), supervised=True)
        # `flwr supernode list` still shows the stopped SuperNode online until its heartbeats
        # lapse (two of 30 s), and the SuperLink refuses the restarted one (code 2004) until
        # then: wait for the restarted process's own accepted connection.
        wait_for(lambda: site_status(kit.site(1))["connection"].startswith("connected"), 240,
                 "site 1 back online")
        assert ledger_history(kit.site(1)) == events_first  # nothing lost on restart

        # (d) a run stopped after round 1 and resumed from its run folder
        second = fed.submit(run_config(3, out / "second"))
        run_dir = wait_for(lambda: next(iter((out / "second").glob("*/metrics.jsonl")), None),
                           120, "the run folder").parent
        wait_for(lambda: len(metrics(run_dir)) >= 1, 240, "round 1")
        fed.stop_run(second)
        assert fed.wait_run(second, 120)["status"].startswith("finished")
        done = metrics(run_dir)
        checkpoint = json.loads((run_dir / "checkpoint.json").read_text())
        assert checkpoint["round"] == len(done) < 3
        # the checkpoint the resume starts from holds the weights of the last completed round
        task = get_task("digits")
        model = task.build_model()
        model.load_state_dict(load_checkpoint(run_dir).weights)
        assert evaluate(model, task.load()[1])["accuracy"] == pytest.approx(done[-1]["accuracy"])
        resumed = fed.submit(run_config(3, out / "second", resume=str(run_dir)))
        assert fed.wait_run(resumed, 300)["status"] == "finished:completed"

    lines = metrics(run_dir)
    assert [m["round"] for m in lines] == [1, 2, 3]
    assert lines[:len(done)] == done  # completed rounds are kept as they were
    # every round after the first run read the sites' parsed data from their cache
    for k in range(1, sites + 1):
        log = fed.log(f"site-{k}")
        assert log.count("fedshield data cache: loaded from the source") == 1, log[-3000:]
        assert log.count("fedshield data cache: hit") >= 3
    # A round the stopped server had sent is a second release when the resumed one sends it
    # again: the client refuses it (noise derived from the run would repeat) or, with fresh
    # noise, records it as a new event. It is never released unrecorded.
    for m in lines:
        assert m["accepted"] + len(m["refused"]) == sites
        assert all(r.startswith("already-released") for r in m["refused"].values())
    assert eps_first > 0 and lines[0]["epsilon"]["0"] > eps_first  # cumulative across runs
    assert lines[-1]["epsilon"]["0"] > lines[0]["epsilon"]["0"]
    for k in range(1, sites + 1):
        history = ledger_history(kit.site(k))
        keys = [(e["run_id"], e["round"], e.get("release", 0)) for e in history]
        assert len(keys) == len(set(keys))
        # one run of 1 round, then rounds 1..3 of the resumed run, each release recorded
        assert sorted({r for run, r, _ in keys if run == run_dir.name}) == [1, 2, 3]
        assert len({run for run, _, _ in keys}) == 2 and len(history) >= 4, history
        # and one class-histogram release per run, the resume reusing the stopped run's
        assert len(ledger_history(kit.site(k), releases=True)) == 2
