"""Round latency and bytes per round per client: real deployment vs simulations, 1/3/8 sites.

Three ways to run the same ServerApp/ClientApp on this machine:

- ``inprocess``: fedshield's in-process grid (no Flower runtime, no serialisation);
- ``flwr-sim``: ``flwr run`` against a SuperLink in simulation mode (Flower's simulation runtime);
- ``deployment``: a SuperLink with TLS + SuperNode authentication and one authenticated
  ``flower-supernode`` process per site (the kit from ``fedshield site init``), each with
  fedshield's long-lived ClientApp worker (fedshield/site_worker.py);
- ``deployment-per-message``: the same with ``client_process = "per-message"``: Flower's
  ``flwr-clientapp`` process per message.

Where the time goes per round: ``client_s`` is what each client measured itself (data loading,
training, encoding its reply; ``client-seconds`` in its metrics); the rest of the round is
transport, Flower's 3 s polling on both sides and, in the Flower runtimes, a new
``flwr-clientapp`` process per message (``clientapp_s``: Flower's own compute-time account of those
processes, per client-message). In a deployment, the clients' timing lines (client/timing.py) and
the server's round times split each round into ``deliver_s``, ``startup_s``, ``handler_s`` and
``return_s`` (:func:`split_rounds`). Bytes: the model's serialized ArrayRecord (what each client
downloads and uploads every round) and, for the Flower runtimes, the run's measured network
traffic from ``flwr ls`` divided by rounds x clients.

    python benchmarks/bench_deployment.py --out runs/bench-deployment --sites 1,3,8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedshield.client.timing import parse_log  # noqa: E402
from fedshield.tasks import get_task  # noqa: E402
from flwr.app import ArrayRecord  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402

from fedshield import configio, validation  # noqa: E402
from fedshield.run_records import METRICS_FILE, MetricsLine  # noqa: E402
from fedshield.run_records import read_metrics as read_run_metrics  # noqa: E402
from fedshield.site import flwr_bin, init_sites  # noqa: E402
from fedshield.site_local import LocalFederation, free_port, wait_for  # noqa: E402


def serialized_model_bytes(task_name: str) -> int:
    """Bytes of the model's ArrayRecord as Flower serialises it (record + arrays + chunks)."""
    record = ArrayRecord(get_task(task_name).build_model().state_dict())
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


def overrides(task: str, n: int, rounds: int, out: Path) -> dict:
    """The benchmark's config table: plain FedAvg on ``task`` with ``n`` clients, runs under
    ``out``."""
    # Plain FedAvg without DP (stated: the defaults are configs/default.toml's DP MNIST run).
    return {"name": f"bench-{n}", "task": {"name": task, "model": ""},
            "federation": {"num_clients": n, "min_clients": n, "rounds": rounds,
                           "round_timeout": 300.0},
            "partition": {"kind": "iid"}, "train": {"lr": 0.1, "momentum": 0.9, "batch_size": 32},
            "privacy": {"enabled": False, "target_epsilon": 0.0, "max_epsilon": 0.0},
            "aggregation": {"rule": "fedavg"},
            "output_dir": str(out),
            "deployment": {"handoff": False, "min_accuracy": 0.0, "max_epsilon": 0.0}}


def run_config_string(task: str, n: int, rounds: int, out: Path) -> str:
    """The benchmark config as Flower run-config overrides (``flwr run --run-config``)."""
    return configio.to_run_config_overrides(validation.from_dict(overrides(task, n, rounds, out)))


def read_metrics(out: Path) -> list[MetricsLine]:
    """The metrics lines of the one run folder under ``out``."""
    return read_run_metrics(next(out.glob(f"*/{METRICS_FILE}")).parent)


def summarise(lines: list[MetricsLine], n: int, rounds: int, wall: float,
              info: dict | None) -> dict:
    """One benchmark row from a run's metrics lines (and Flower's run info, when given)."""
    steady = lines[1:] or lines  # round 1 also pays start-up (imports, first connections)
    client = [s for m in steady for s in m.client_seconds.values()]
    round_s = statistics.median(m.seconds or 0.0 for m in steady)
    client_s = statistics.median(client) if client else None
    row = {"rounds_completed": len(lines), "accepted_min": min(m.accepted for m in lines),
           "round1_s": lines[0].seconds, "round_s": round_s, "client_s": client_s,
           "final_accuracy": lines[-1].accuracy, "wall_s": round(wall, 1),
           "overhead_s": round_s - client_s if client_s is not None else None}
    if info:
        traffic, compute = info["network-traffic"], info["compute-time"]
        row["traffic_bytes_per_round_client"] = traffic["total-bytes"] / (rounds * n)
        row["clientapp_s"] = compute["clientapp-seconds"] / (rounds * n)
    else:  # in-process: clients run one after another, so the rest is the server's own work
        row["server_s"] = statistics.median((m.seconds or 0.0) - sum(m.client_seconds.values())
                                            for m in steady)
    return row


def split_rounds(lines: list[MetricsLine], timings: list[dict]) -> dict:
    """Where a deployment round's time goes, from timestamps on both sides (median over the
    rounds after round 1), following the client that finished last (it decides the round):

    - ``deliver_s``: the ServerApp created the message -> that client's process started (the
      SuperLink, the SuperNode's 3 s pull polling, the SuperExec's task polling): Flower;
    - ``startup_s``: process start -> handler start (Python, torch and fedshield imports, Flower's
      FAB install and task pull): Flower's one process per message; with the site's long-lived
      worker (fedshield/site_worker.py) the task's acquisition -> handler start (the task pull
      and the FAB check), its "process start" being when it acquired the task;
    - ``handler_s``: the handler (data, model, training, accounting, encoding): fedshield;
    - ``return_s``: handler end -> the server's round end (the reply's way back: SuperNode push,
      the ServerApp's 3 s pull polling) plus the server's own aggregation, screening and
      evaluation (``server_s`` of the in-process row: milliseconds for these models).
    """
    by_round: dict[int, list[dict]] = {}
    for t in timings:
        if str(t.get("round", "")).isdigit():
            by_round.setdefault(int(t["round"]), []).append(t)
    parts: dict[str, list[float]] = {"deliver_s": [], "startup_s": [], "handler_s": [],
                                     "return_s": []}
    for m in lines[1:] or lines:
        ts = by_round.get(m.round)
        if not ts or m.seconds is None or any(t["process_start"] is None for t in ts):
            continue
        created = min(t["created"] for t in ts)
        last = max(ts, key=lambda t: t["handler_end"])
        parts["deliver_s"].append(last["process_start"] - created)
        parts["startup_s"].append(last["handler_start"] - last["process_start"])
        parts["handler_s"].append(last["handler_end"] - last["handler_start"])
        parts["return_s"].append(m.seconds - (last["handler_end"] - created))
    return {k: statistics.median(v) for k, v in parts.items() if v}


def bench_inprocess(task: str, n: int, rounds: int, work: Path) -> dict:
    """Time the in-process simulation of the benchmark config; its summary row."""
    from fedshield.simulations.runner import simulate

    out = work / f"inprocess-{n}"
    started = time.perf_counter()
    simulate(validation.from_dict(overrides(task, n, rounds, out)))
    return summarise(read_metrics(out), n, rounds, time.perf_counter() - started, None)


def bench_flwr_sim(task: str, n: int, rounds: int, work: Path) -> dict:
    """``flwr run`` against our own simulation-mode SuperLink (started and stopped here)."""
    home, out = work / f"flwr-sim-{n}-home", work / f"flwr-sim-{n}"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = open(home / "superlink.log", "wb")  # noqa: SIM115
    link = subprocess.Popen([flwr_bin("flower-superlink"), "--insecure", "--simulation",
                             "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                             "--port", str(port), "--database", str(home / "state.db")],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    flwr = [flwr_bin("flwr")]
    try:
        wait_for(lambda: "Uvicorn running" in (home / "superlink.log").read_text(), 60,
                 "the simulation SuperLink")
        started = time.perf_counter()
        proc = subprocess.run(flwr + ["run", str(ROOT), "sim", "--format", "json", "--run-config",
                                      run_config_string(task, n, rounds, out),
                                      "--federation-config",
                                      f"num-supernodes={n} client-resources-num-cpus=1"],
                              env=env, capture_output=True, text=True, timeout=120)
        run_id = json.loads(proc.stdout)["run-id"]

        def finished():
            ls = subprocess.run(flwr + ["ls", "sim", "--run-id", str(run_id), "--format", "json"],
                                env=env, capture_output=True, text=True, timeout=60)
            info = json.loads(ls.stdout)["runs"][0]
            return info if info["status"].startswith("finished") else None

        info = wait_for(finished, 900, f"flwr-sim run with {n} nodes", poll=2)
        return summarise(read_metrics(out), n, rounds, time.perf_counter() - started, info)
    finally:
        os.killpg(link.pid, 15)
        link.wait(timeout=30)
        log.close()


def bench_deployment(task: str, n: int, rounds: int, work: Path,
                     client_process: str = "long-lived") -> dict:
    """Time the same run on a local SuperLink with ``n`` SuperNodes; its summary row.
    ``client_process``: the sites' site.toml setting (fedshield's long-lived worker, or
    Flower's process per message)."""
    kit = init_sites(work / f"kit-{n}-{client_process}", n, port=free_port(),
                     node_ports=[free_port() for _ in range(n)])
    for site in kit.sites():
        toml = (site / "site.toml").read_text()
        (site / "site.toml").write_text(toml.replace('client_process = "long-lived"',
                                                     f'client_process = "{client_process}"'))
    out = work / f"deployment-{n}-{client_process}"
    with LocalFederation(kit.root) as fed:
        fed.start_superlink()
        fed.register()
        for site in kit.sites():
            fed.start_site(site)
        wait_for(lambda: sum(x["status"] == "online" for x in
                             fed.flwr("supernode", "list", "fedshield")["nodes"]) == n,
                 120, f"{n} SuperNodes online", poll=1)
        started = time.perf_counter()
        run_id = fed.submit(run_config_string(task, n, rounds, out))
        info = fed.wait_run(run_id, timeout=900)
        lines = read_metrics(out)
        timings = [t for site in kit.sites() for t in parse_log(fed.log(site.name))
                   if t.get("run") == run_id]
        return {**summarise(lines, n, rounds, time.perf_counter() - started, info),
                **split_rounds(lines, timings)}


def bench_deployment_per_message(task: str, n: int, rounds: int, work: Path) -> dict:
    """The deployment with Flower's new ``flwr-clientapp`` process per message (the old mode)."""
    return bench_deployment(task, n, rounds, work, client_process="per-message")


MODES = {"inprocess": bench_inprocess, "flwr-sim": bench_flwr_sim, "deployment": bench_deployment,
         "deployment-per-message": bench_deployment_per_message}


def main() -> None:
    """Command line: run the chosen modes for each site count and write the result tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench-deployment")
    parser.add_argument("--task", default="digits")
    parser.add_argument("--sites", default="1,3,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_bytes = serialized_model_bytes(args.task)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-deployment-") as tmp:
        for mode in args.modes.split(","):
            for n in (int(s) for s in args.sites.split(",")):
                print(f"== {mode}, {n} site(s)", flush=True)
                row = {"mode": mode, "sites": n, "task": args.task, "rounds": args.rounds,
                       "model_bytes_each_way": model_bytes,
                       **MODES[mode](args.task, n, args.rounds, Path(tmp))}
                rows.append(row)
                print(json.dumps(row), flush=True)
    load = os.getloadavg()
    result = {"rows": rows, "cpu_count": os.cpu_count(), "loadavg_at_end": load,
              "command": " ".join(sys.argv)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    cols = ("mode", "sites", "round1_s", "round_s", "client_s", "deliver_s", "startup_s",
            "handler_s", "return_s", "server_s", "clientapp_s", "traffic_bytes_per_round_client",
            "model_bytes_each_way", "final_accuracy")
    table = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        table.append(" | ".join(f"{r.get(c):.3g}" if isinstance(r.get(c), float) else str(r.get(c))
                                for c in cols))
    text = "\n".join(table) + f"\n\nload average at end: {load}\n"
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
