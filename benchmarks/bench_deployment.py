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
training, encoding its reply; ``client-seconds`` in its metrics, absent under DP); the rest of the
round is transport, Flower's polling on both sides and, in the Flower runtimes, a new
``flwr-clientapp`` process per message (``clientapp_s``: Flower's own compute-time account of those
processes, per client-message). In a deployment, the sites' timing lines (client/timing.py: both
messages' timestamps, the client's own time and its training loop) and the server's round times
and own work (``server_seconds`` in metrics.jsonl) split each round into Flower's share (delivery,
task pulls and the replies' way back, both exchanges) and fedshield's (the handlers and the
server's work) (:func:`split_rounds`). Bytes: the model's serialized ArrayRecord (what each
client downloads and uploads every round) and, for the Flower runtimes, the run's measured
network traffic from ``flwr ls`` divided by rounds x clients. ``--dp`` keeps the default run's DP
(for ``--task mnist5k --dp``); ``--reply-poll-s 3`` restores Flower's 3 s reply polling on the
ServerApp (server/prompt_grid.py) for a before/after comparison.

    python benchmarks/bench_deployment.py --out runs/bench-deployment --sites 1,3,8 --rounds 3
    python benchmarks/bench_deployment.py --sites 3 --rounds 3 --modes deployment \
        --task mnist5k --dp
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
from typing import Any

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


def overrides(task: str, n: int, rounds: int, out: Path, dp: bool = False,
              reply_poll_s: float | None = None) -> dict:
    """The benchmark's config table: FedAvg on ``task`` with ``n`` clients, runs under ``out``.

    Without ``dp``, plain FedAvg without DP; with ``dp``, the default run's DP (``Config()``:
    DP-SGD planned to spend epsilon 3 over the run and capped there, DP releases of the class
    histogram, federated evaluation and drift reference). ``reply_poll_s``: the ServerApp's wait
    between pulls for replies (None: the default; 3.0 is Flower's own interval)."""
    cfg: dict[str, Any] = {
        "name": f"bench-{n}", "task": {"name": task, "model": ""},
        "federation": {"num_clients": n, "min_clients": n, "rounds": rounds,
                       "round_timeout": 300.0},
        "partition": {"kind": "iid"}, "train": {"lr": 0.1, "momentum": 0.9, "batch_size": 32},
        "aggregation": {"rule": "fedavg"},
        "output_dir": str(out),
        "deployment": {"handoff": False, "min_accuracy": 0.0, "max_epsilon": 0.0}}
    if not dp:
        cfg["privacy"] = {"enabled": False, "target_epsilon": 0.0, "max_epsilon": 0.0}
    if reply_poll_s is not None:
        cfg["federation"]["reply_poll_s"] = reply_poll_s
    return cfg


def run_config_string(task: str, n: int, rounds: int, out: Path, **options) -> str:
    """The benchmark config as Flower run-config overrides (``flwr run --run-config``);
    ``options``: :func:`overrides`'."""
    return configio.to_run_config_overrides(
        validation.from_dict(overrides(task, n, rounds, out, **options)))


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
    server = [m.server_seconds for m in steady if m.server_seconds is not None]
    if server:  # the ServerApp's own work, outside the round's message exchanges
        row["server_s"] = statistics.median(server)
    elif not info:  # older lines in-process: clients run one after another, the rest is the server
        row["server_s"] = statistics.median((m.seconds or 0.0) - sum(m.client_seconds.values())
                                            for m in steady)
    return row


def split_rounds(lines: list[MetricsLine], timings: list[dict]) -> dict:
    """Where a deployment round's time goes, from timestamps on both sides (median over the
    rounds after round 1). A round is two message exchanges (train, then the federated
    evaluation); each follows the client that finished last (it decides the exchange):

    - ``deliver_s``: the ServerApp created the train message -> that client's process started
      (the SuperLink, the SuperNode's 3 s pull polling, the SuperExec's task polling): Flower;
    - ``startup_s``: process start -> handler start (Python, torch and fedshield imports, Flower's
      FAB install and task pull): Flower's one process per message; with the site's long-lived
      worker (fedshield/site_worker.py) the task's acquisition -> handler start (the task pull
      and the FAB check), its "process start" being when it acquired the task;
    - ``handler_s`` / ``eval_handler_s``: the train / evaluate handler (data, model, training,
      accounting, encoding): fedshield;
    - ``return_s``: train handler end -> the server's round end: the train reply's way back,
      the whole evaluate exchange and the server's own work;
    - ``server_s``: the ServerApp's own work (decoding, screening, aggregation, server-side
      evaluation, accounting: ``server_seconds``, the round outside its message exchanges);
    - ``fedshield_s`` = handlers + server's work; ``flower_s`` = the rest of the round: delivery,
      task pulls and the replies' way back of both exchanges (Flower's transport and polling);
    - ``client_own_s`` / ``train_s``: the median client's own time and training loop per round,
      from the sites' timing lines (under DP the replies do not carry them).
    """
    by: dict[tuple[int, str], list[dict]] = {}
    for t in timings:
        if str(t.get("round", "")).isdigit():
            by.setdefault((int(t["round"]), t.get("kind", "train")), []).append(t)
    parts: dict[str, list[float]] = {k: [] for k in (
        "deliver_s", "startup_s", "handler_s", "eval_handler_s", "return_s", "server_s",
        "fedshield_s", "flower_s", "client_own_s", "train_s")}
    for m in lines[1:] or lines:
        ts = by.get((m.round, "train"))
        if not ts or m.seconds is None or any(t["process_start"] is None for t in ts):
            continue
        created = min(t["created"] for t in ts)
        last = max(ts, key=lambda t: t["handler_end"])
        handler = last["handler_end"] - last["handler_start"]
        parts["deliver_s"].append(last["process_start"] - created)
        parts["startup_s"].append(last["handler_start"] - last["process_start"])
        parts["handler_s"].append(handler)
        parts["return_s"].append(m.seconds - (last["handler_end"] - created))
        parts["client_own_s"] += [t["client_s"] for t in ts if "client_s" in t]
        parts["train_s"] += [t["train_s"] for t in ts if "train_s" in t]
        evals = by.get((m.round, "evaluate"), [])
        last_eval = max(evals, key=lambda t: t["handler_end"]) if evals else None
        eval_handler = last_eval["handler_end"] - last_eval["handler_start"] if last_eval else 0.0
        parts["eval_handler_s"].append(eval_handler)
        if m.server_seconds is not None:
            parts["server_s"].append(m.server_seconds)
            parts["fedshield_s"].append(handler + eval_handler + m.server_seconds)
            parts["flower_s"].append(m.seconds - parts["fedshield_s"][-1])
    return {k: statistics.median(v) for k, v in parts.items() if v}


def target_s(row: dict) -> float | None:
    """Issue 18's bound on a round: 8 s, or Flower's measured share + 1 s when that is higher."""
    return max(8.0, row["flower_s"] + 1.0) if row.get("flower_s") is not None else None


def bench_inprocess(task: str, n: int, rounds: int, work: Path, **options) -> dict:
    """Time the in-process simulation of the benchmark config; its summary row."""
    from fedshield.simulations.runner import simulate

    out = work / f"inprocess-{n}"
    started = time.perf_counter()
    simulate(validation.from_dict(overrides(task, n, rounds, out, **options)))
    return summarise(read_metrics(out), n, rounds, time.perf_counter() - started, None)


def bench_flwr_sim(task: str, n: int, rounds: int, work: Path, **options) -> dict:
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
                                      run_config_string(task, n, rounds, out, **options),
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
                     client_process: str = "long-lived", **options) -> dict:
    """Time the same run on a local SuperLink with ``n`` SuperNodes; its summary row.
    ``client_process``: the sites' site.toml setting (fedshield's long-lived worker, or
    Flower's process per message); ``options``: :func:`overrides`'."""
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
        run_id = fed.submit(run_config_string(task, n, rounds, out, **options))
        info = fed.wait_run(run_id, timeout=900)
        lines = read_metrics(out)
        timings = [t for site in kit.sites() for t in parse_log(fed.log(site.name))
                   if t.get("run") == run_id]
        row = {**summarise(lines, n, rounds, time.perf_counter() - started, info),
               **split_rounds(lines, timings)}
        return {**row, "target_s": target_s(row)}


def bench_deployment_per_message(task: str, n: int, rounds: int, work: Path,
                                 **options) -> dict:
    """The deployment with Flower's new ``flwr-clientapp`` process per message (the old mode)."""
    return bench_deployment(task, n, rounds, work, client_process="per-message", **options)


MODES = {"inprocess": bench_inprocess, "flwr-sim": bench_flwr_sim, "deployment": bench_deployment,
         "deployment-per-message": bench_deployment_per_message}


# The table: the headline split first (issue 18), then the details behind it.
COLUMNS = (("mode", "mode"), ("sites", "sites"), ("round_s", "round"),
           ("flower_s", "Flower's share"), ("fedshield_s", "fedshield's share"),
           ("client_own_s", "client's own time"), ("train_s", "training loop"),
           ("traffic_bytes_per_round_client", "bytes / round / client"),
           ("target_s", "target (8 s or Flower + 1 s)"), ("deliver_s", "deliver"),
           ("startup_s", "task pull / start-up"), ("handler_s", "train handler"),
           ("eval_handler_s", "evaluate handler"), ("server_s", "server's work"),
           ("return_s", "return + evaluate + server"), ("round1_s", "round 1"),
           ("client_s", "client-seconds (replies)"), ("clientapp_s", "Flower clientapp-seconds"),
           ("model_bytes_each_way", "model bytes each way"), ("final_accuracy", "final accuracy"))


def cell(value) -> str:
    """One table cell: floats to 3 significant digits, a missing value as '-'."""
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (medians of seconds per round after round 1)."""
    out = [" | ".join(label for _, label in COLUMNS), " | ".join("---" for _ in COLUMNS)]
    for r in rows:
        out.append(" | ".join(cell(r.get(c)) for c, _ in COLUMNS))
    return "\n".join(out)


def main() -> None:
    """Command line: run the chosen modes for each site count and write the result tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench-deployment")
    parser.add_argument("--task", default="digits")
    parser.add_argument("--sites", default="1,3,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--dp", action="store_true",
                        help="keep the default run's DP (DP-SGD planned to epsilon 3, DP releases) "
                        "instead of plain FedAvg; e.g. --task mnist5k --dp")
    parser.add_argument("--reply-poll-s", type=float, default=None,
                        help="federation.reply_poll_s (default: the config's; 3.0 = Flower's own "
                        "3 s pull interval, the 'before')")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_bytes = serialized_model_bytes(args.task)
    options = {"dp": args.dp, "reply_poll_s": args.reply_poll_s}
    poll = validation.from_dict(overrides(args.task, 1, 1, out, **options)).federation.reply_poll_s
    load_start = os.getloadavg()
    print(f"load average at start: {load_start}; reply_poll_s {poll}; DP {args.dp}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-deployment-") as tmp:
        for mode in args.modes.split(","):
            for n in (int(s) for s in args.sites.split(",")):
                print(f"== {mode}, {n} site(s)", flush=True)
                row = {"mode": mode, "sites": n, "task": args.task, "dp": args.dp,
                       "reply_poll_s": poll, "rounds": args.rounds,
                       "model_bytes_each_way": model_bytes,
                       **MODES[mode](args.task, n, args.rounds, Path(tmp), **options)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    load = os.getloadavg()
    result = {"rows": rows, "cpu_count": os.cpu_count(), "loadavg_at_start": load_start,
              "loadavg_at_end": load, "command": " ".join(sys.argv)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    text = (f"`{' '.join(sys.argv)}` (task {args.task}, DP {args.dp}, reply_poll_s {poll}); "
            "median seconds per round after round 1\n\n" + table(rows) +
            f"\n\nload average at start: {load_start}, at end: {load}\n")
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
