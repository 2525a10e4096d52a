"""`fedshield bench simulation`: one federation, every way of simulating it, side by side.

    fedshield bench simulation [--preset digits100] [--rounds 3] [--workers 2]
                               [--legs inprocess-1,inprocess-N,ray,floor] [--out DIR]
    (or: python -m fedshield.benchmarks.bench_simulation with the same options)

Legs, all on the same config and seed, each in its own subprocess (so its start-up and peak
memory are its own):

- ``inprocess-1``: fedshield's in-process grid, every client in the leg's process;
- ``inprocess-N``: the same with ``federation.workers = N`` persistent worker processes
  (``inprocess-2`` etc. name a count; ``N`` is ``--workers``, default: the cores);
- ``ray``: ``federation.engine = "ray"``, Flower's Ray backend on the same ServerApp/ClientApp;
- ``floor``: the compute floor, the same sampled clients' local training (client/fit.py
  ``fit_locally``: the task's model and the client's training function, no Flower, no server)
  called one after another in one process, each round's total divided by N (perfect
  parallelism over N cores with nothing else to do).

Per leg: start-up seconds (from launching the leg to the end of round 1, less one steady round:
imports, data loading, spawning workers or starting Ray), seconds per round (median over rounds
2..R of the wall time between consecutive rounds' metrics lines: training, aggregation and the
server's evaluation), peak memory of the leg's process tree (the leg and every descendant:
workers, Ray's raylet/GCS/actors; sampled from /proc every POLL_SECONDS, as the sum of VmRSS,
which counts shared pages once per process, and the sum of PSS, which splits them) and the
final accuracy.

Every client step runs on ``threads_per_worker(N)`` torch threads in every leg (the N workers'
count, so inprocess-1 and inprocess-N run the same kernels): the fedshield legs must then end
with bitwise-identical final weights (sha256 of model.safetensors) and accuracies; a mismatch is
a loud row and a non-zero exit. DP presets use ``privacy.reproducible_noise`` and exact
statistics (both outside the guarantee, and labelled so) so that the legs are comparable; the
cost of the secret randomness is measured by bench_dp_overhead.py. The Ray leg samples other
node ids, so its accuracy is reported, not compared. A leg that fails is a row saying why, and
the command exits 1.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedshield import configio, validation
from fedshield.errors import ConfigError
from fedshield.schema import Config

POLL_SECONDS = 0.2  # how often a leg's process tree is measured
LEG_TIMEOUT = 3600.0  # seconds a leg may run before it is killed (a row saying so)
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
LEG_NAMES = ("inprocess-1", "inprocess-N", "ray", "floor")
DEFAULT_LEGS = "inprocess-1,inprocess-N,ray,floor"

# What every preset federation shares: FedAvg, no reputation, no hand-off or tracking (the
# bench times the federation, not the deployment), no federated evaluation. No round timeout
# short of the leg's: a client cut off by it (seen: 29-38 of 100 MNIST DP clients a round at
# load 7-10, with the default 600 s) makes the result depend on the machine's speed.
BASE: dict[str, dict[str, Any]] = {
    "federation": {"fraction_evaluate": 0.0, "min_clients": 2, "round_timeout": LEG_TIMEOUT},
    "train": {"local_epochs": 1},
    "privacy": {"enabled": False, "target_epsilon": 0.0, "max_epsilon": 0.0},
    "aggregation": {"rule": "fedavg"},
    "reputation": {"enabled": False},
    "deployment": {"handoff": False, "min_accuracy": 0.0, "max_epsilon": 0.0,
                   "reference_source": "server"},
    "tracking": {"enabled": False},
}
# DP as the benchmark runs it: reproducible draws so that the legs' results can be compared
# bit for bit (loudly outside the guarantee: research on public data).
DP = {"enabled": True, "target_epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0,
      "accountant": "prv", "reproducible_noise": True,
      "release_stats": "exact-outside-guarantee"}
DP_BATCH = 12  # the MNIST DP presets' batch: at most their smallest client's 14 examples
MNIST1000: dict[str, dict[str, Any]] = {"federation": {"num_clients": 1000, "fraction_train": 0.1},
             "partition": {"kind": "dirichlet", "alpha": 0.5, "min_partition_size": 10}}


@dataclass(frozen=True)
class Federation:
    """One benchmarked federation of a preset: a name and its settings over BASE."""

    name: str
    settings: dict[str, dict[str, Any]]
    rounds: int = 5


PRESETS: dict[str, tuple[Federation, ...]] = {
    # sklearn digits, 100 IID clients of ~14 examples, all train each round (3 epochs of
    # batches of 8: ~6 steps a client, so that 3 rounds leave chance behind)
    "digits100": (Federation("digits100", {
        "task": {"name": "digits", "model": ""},
        "federation": {"num_clients": 100, "fraction_train": 1.0},
        "partition": {"kind": "iid"},
        "train": {"lr": 0.1, "momentum": 0.9, "batch_size": 8, "local_epochs": 3}}),),
    # MNIST, 1000 clients, 100 per round, Dirichlet(0.5), DP: two models, two federations.
    # Batches of DP_BATCH: DP-SGD samples at rate batch / examples <= 1 (pre-flight refuses
    # more), and the smallest of these clients has 14 training examples (median 56).
    "mnist1000-dp": (
        Federation("mnist1000-dp-scatter", {
            **MNIST1000, "task": {"name": "mnist-scattering", "model": "scatter_linear"},
            "train": {"lr": 2.0, "momentum": 0.5, "batch_size": DP_BATCH}, "privacy": DP}),
        Federation("mnist1000-dp-tanh", {
            **MNIST1000, "task": {"name": "mnist", "model": "tanh_cnn"},
            "train": {"lr": 1.0, "momentum": 0.0, "batch_size": DP_BATCH},
            "privacy": {**DP, "max_grad_norm": 0.1}})),
    "mnist1000": (Federation("mnist1000", {
        **MNIST1000, "task": {"name": "mnist", "model": ""},
        "train": {"lr": 0.05, "momentum": 0.9, "batch_size": 32}}),),
}


# --- pure parts ----------------------------------------------------------------------------
def leg_workers(leg: str, workers: int) -> int:
    """Worker processes of an in-process leg ("inprocess-N" means ``workers``)."""
    count = leg.removeprefix("inprocess-")
    return workers if count == "N" else int(count)


def parse_legs(text: str) -> list[str]:
    """The legs of ``--legs``, checked (ConfigError names a bad one)."""
    legs = [x.strip() for x in text.split(",") if x.strip()]
    for leg in legs:
        count = leg.removeprefix("inprocess-")
        if leg not in LEG_NAMES and not (leg.startswith("inprocess-") and count.isdigit()
                                         and int(count) >= 1):
            raise ConfigError(f"--legs: unknown leg {leg!r}; use {', '.join(LEG_NAMES)} or "
                              "inprocess-<count>")
    if not legs:
        raise ConfigError(f"--legs is empty; use some of {DEFAULT_LEGS}")
    if len(set(legs)) < len(legs):
        raise ConfigError(f"--legs {text!r} names a leg twice")
    return legs


def leg_order(legs: Sequence[str]) -> list[str]:
    """In-process legs first (the floor trains the cohorts they sampled), then Ray, the floor."""
    rank = {"ray": 1, "floor": 2}
    return sorted(legs, key=lambda leg: rank.get(leg, 0))


def nested_set(tree: dict[str, Any], key: str, value: Any) -> None:
    """``tree[a][b] = value`` for ``key`` "a.b" (sections created as needed)."""
    *path, last = key.split(".")
    for part in path:
        tree = tree.setdefault(part, {})
    tree[last] = value


def federation_config(fed: Federation, rounds: int | None, clients: int | None,
                      sets: Sequence[str] = ()) -> Config:
    """The federation's validated Config (BASE, its settings, then ``--rounds``, ``--clients``
    and ``--set key=value`` overrides)."""
    data: dict[str, Any] = {"name": fed.name, "seed": 0}
    for part in (BASE, fed.settings):
        for section, values in part.items():
            data[section] = {**data.get(section, {}), **values}
    data["federation"]["rounds"] = rounds or fed.rounds
    if clients:
        data["federation"]["num_clients"] = clients
    for text in sets:
        nested_set(data, *configio.parse_override(text))
    cfg = validation.from_dict(data)
    if cfg.federation.rounds < 2:
        raise ConfigError("--rounds must be at least 2: seconds per round is the median of "
                          "rounds 2..R (round 1 holds the start-up)")
    return cfg


def round_times(timestamps: Sequence[float]) -> list[float]:
    """Wall seconds of rounds 2..R: the gaps between consecutive rounds' metrics lines."""
    return [b - a for a, b in zip(timestamps, timestamps[1:], strict=False)]


def startup_seconds(launched: float, first_round_end: float, per_round: float) -> float:
    """From launching the leg to the end of round 1, less one steady-state round."""
    return first_round_end - launched - per_round


def compare(rows: list[dict[str, Any]]) -> str:
    """"" when the fedshield in-process legs that finished agree bit for bit (final weights and
    accuracy), else what differs."""
    done = [r for r in rows if r["leg"].startswith("inprocess-") and r["ok"]]
    if len(done) < 2:
        return ""
    first = done[0]
    for r in done[1:]:
        if (r["model_sha256"], r["final_accuracy"]) != (first["model_sha256"],
                                                        first["final_accuracy"]):
            return (f"{r['leg']} ended at accuracy {r['final_accuracy']} (weights "
                    f"{str(r['model_sha256'])[:12]}) but {first['leg']} at "
                    f"{first['final_accuracy']} ({str(first['model_sha256'])[:12]}): the same "
                    "seed must give the same run for any number of workers")
    return ""


# --- the process tree's memory ---------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    """ppid -> pids of every process on the machine (from /proc/<pid>/stat)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone since the listing
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])  # the name may hold spaces and ")"
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += tree.get(p, [])
    return out


def _kib(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:  # the process exited
        pass
    return 0


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(sum of VmRSS, sum of PSS, processes) of ``pid``'s tree, in KiB."""
    pids = descendants(pid)
    rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
    pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return rss, pss, len(pids)


class PeakSampler(threading.Thread):
    """Samples a process tree's memory until :meth:`stop`; keeps the peaks."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.rss, self.pss, self.processes = pid, 0, 0, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Poll every POLL_SECONDS."""
        while not self._stop_event.is_set():
            rss, pss, n = tree_memory(self.pid)
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self.processes = max(self.processes, n)
            self._stop_event.wait(POLL_SECONDS)

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop_event.set()
        self.join()


# --- a leg, inside its own process -----------------------------------------------------------
@dataclass(frozen=True)
class LegSpec:
    """What the parent tells a leg's process (written as JSON beside its log)."""

    federation: str
    leg: str
    config: str  # the resolved config.toml
    workers: int  # N: the floor divides by it; the in-process legs' workers are in the config
    threads: int  # torch threads of a client step
    result: str  # where the leg writes its JSON
    cohorts: str = ""  # the floor: a JSON list of each round's sampled partition ids
    launched: float = 0.0  # unix time the parent launched the leg


def weights_sha256(path: Path) -> str | None:
    """sha256 over a safetensors file's tensors (names, dtypes, shapes, bytes; not its
    metadata, which names the run), None when there is no file."""
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    digest = hashlib.sha256()
    for name, array in sorted(load_file(str(path)).items()):
        digest.update(f"{name}:{array.dtype}:{array.shape}:".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def run_fedshield_leg(spec: LegSpec, cfg: Config) -> dict[str, Any]:
    """A fedshield run (in-process or Ray): its rounds' timestamps, cohorts and outcome."""
    from fedshield.server.outputs import RunFolder
    from fedshield.server.report import ConsoleReporter
    from fedshield.simulations.runner import simulate
    from rich.console import Console

    summary = simulate(cfg, ConsoleReporter(Console(stderr=True)))
    run_dir = Path(str(summary.run_dir))  # set by every run the runner returns
    lines = RunFolder(run_dir).read_metrics()
    out = {"run_dir": summary.run_dir, "final_accuracy": summary.final_accuracy,
           "timestamps": [line.timestamp for line in lines],
           "round_seconds_recorded": [line.seconds for line in lines],
           "cohorts": [sorted(int(k) for k in line.client_seconds) for line in lines],
           "accepted": [line.accepted for line in lines],
           "model_sha256": weights_sha256(run_dir / "model.safetensors")}
    if summary.failed:
        out["error"] = f"the run failed: {summary.failure}"
    elif len(lines) < cfg.federation.rounds:
        out["error"] = f"only {len(lines)} of {cfg.federation.rounds} rounds were recorded"
    return out


def planned_cohorts(cfg: Config) -> list[list[int]]:
    """The partition ids the server samples each round when nobody is quarantined or out of
    budget (the floor's fallback when no in-process leg recorded its cohorts)."""
    from fedshield.server.federation_state import fixed_size_sample
    from fedshield.simulations.grid import InProcessGrid
    from flwr.clientapp import ClientApp

    fed = cfg.federation
    grid = InProcessGrid({p: ClientApp() for p in range(fed.num_clients)}, cfg.flat(), cfg.seed)
    nodes = sorted(grid.node_to_partition)
    k = min(len(nodes), max(fed.min_clients, round(len(nodes) * fed.fraction_train)))
    return [sorted(grid.node_to_partition[nodes[i]]
                   for i in fixed_size_sample(len(nodes), k, cfg.seed, r))
            for r in range(1, fed.rounds + 1)]


def _loaded(data: tuple, _context: object, _cfg: Config) -> tuple:
    """A client's data loader that returns what was loaded before the clock started."""
    return data


def run_floor_leg(spec: LegSpec, cfg: Config) -> dict[str, Any]:
    """The compute floor: each round's sampled clients trained directly, total / N."""
    import torch
    from fedshield.client.data import load_client_data
    from fedshield.client.fit import fit_locally
    from fedshield.tasks import task_for
    from flwr.app import Context, RecordDict

    if spec.cohorts:
        cohorts, source = json.loads(Path(spec.cohorts).read_text()), "inprocess leg"
    else:
        cohorts, source = planned_cohorts(cfg), "planned (no inprocess leg)"
    num = cfg.federation.num_clients
    contexts = {p: Context(run_id=1, node_id=p + 1, state=RecordDict(), run_config=cfg.flat(),
                           node_config={"partition-id": p, "num-partitions": num})
                for p in sorted({p for c in cohorts for p in c})}
    data = {p: load_client_data(c, cfg) for p, c in contexts.items()}  # loaded once: start-up
    torch.manual_seed(cfg.seed)
    weights = task_for(cfg.task).build_model().state_dict()
    train = configio.flatten({"train": asdict(cfg.train)})
    timestamps: list[float] = []
    sums: list[float] = []
    for rnd, cohort in enumerate(cohorts, start=1):
        rc = {"num-rounds": cfg.federation.rounds, "run-key": f"floor-{spec.federation}",
              "server-round": rnd, **train}
        total = 0.0
        for pid in cohort:
            started = time.perf_counter()
            model, _ = fit_locally(contexts[pid], cfg, functools.partial(_loaded, data[pid]),
                                   weights, rc)
            {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}  # the reply
            total += time.perf_counter() - started
        sums.append(total)
        # a round ends once its N cores have shared the work perfectly
        last = timestamps[-1] if timestamps else time.time()
        timestamps.append(last + total / spec.workers)
    return {"final_accuracy": None, "timestamps": timestamps, "cohorts": cohorts,
            "cohorts_from": source, "client_seconds_total": sums, "model_sha256": None}


def leg_main(spec_path: str) -> None:
    """A leg's process: run it and write its result JSON (an error in it, not a traceback)."""
    import torch

    spec = LegSpec(**json.loads(Path(spec_path).read_text()))
    torch.set_num_threads(spec.threads)
    try:
        cfg = validation.load(spec.config)
        run = run_floor_leg if spec.leg == "floor" else run_fedshield_leg
        out = run(spec, cfg)
    except Exception as exc:  # noqa: BLE001 — the leg's row says why (the log has the rest)
        import traceback

        traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        out = {"error": f"{type(exc).__name__}: {first}"}
    out["threads"] = torch.get_num_threads()
    Path(spec.result).write_text(json.dumps(out))


# --- the parent: legs in subprocesses, the table -----------------------------------------
@dataclass
class Bench:
    """One invocation: the federations of a preset, the legs, where results go."""

    preset: str
    legs: list[str]
    workers: int
    out: Path
    rounds: int | None = None
    clients: int | None = None
    sets: list[str] = field(default_factory=list)
    leg_timeout: float = LEG_TIMEOUT

    def configs(self) -> list[tuple[Federation, Config]]:
        """The preset's federations and their configs (ConfigError for a bad override)."""
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        return [(f, federation_config(f, self.rounds, self.clients, self.sets))
                for f in PRESETS[self.preset]]

    def leg_config(self, cfg: Config, fed: str, leg: str) -> Config:
        """The leg's config: its engine and workers, its own output and ledger folders."""
        data = configio.unflatten(cfg.flat())
        data["name"] = f"{fed}-{leg}"
        data["output_dir"] = str(self.out / "runs")
        data["privacy"]["ledger_dir"] = str(self.out / "ledgers" / f"{fed}-{leg}")
        data["federation"]["engine"] = "ray" if leg == "ray" else "inprocess"
        if leg.startswith("inprocess-"):
            data["federation"]["workers"] = leg_workers(leg, self.workers)
        return validation.from_dict(data)

    def run_leg(self, fed: Federation, cfg: Config, leg: str, threads: int,
                cohorts: str) -> dict[str, Any]:
        """Run one leg in a subprocess; its row (``ok`` False and ``error`` when it failed)."""
        from fedshield.simulations.workers import THREAD_ENV

        tag = f"{fed.name}-{leg}"
        legs_dir = self.out / "legs"
        legs_dir.mkdir(parents=True, exist_ok=True)
        config = legs_dir / f"{tag}.toml"
        config.write_text(configio.to_toml(self.leg_config(cfg, fed.name, leg)))
        result = legs_dir / f"{tag}.json"
        result.unlink(missing_ok=True)
        spec = LegSpec(fed.name, leg, str(config), self.workers, threads, str(result),
                       cohorts if leg == "floor" else "", time.time())
        (legs_dir / f"{tag}.spec.json").write_text(json.dumps(asdict(spec)))
        env = {**os.environ, **{k: str(threads) for k in THREAD_ENV},
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve()
                                                                .parents[1]),
                                                           os.environ.get("PYTHONPATH")]))}
        log = legs_dir / f"{tag}.log"
        row: dict[str, Any] = {"federation": fed.name, "leg": leg, "ok": False,
                               "workers": leg_workers(leg, self.workers)
                               if leg.startswith("inprocess-") else None,
                               "log": str(log)}
        with open(log, "w", encoding="utf-8") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedshield.benchmarks.bench_simulation", "--leg-spec",
                 str(legs_dir / f"{tag}.spec.json")], stdout=sink, stderr=subprocess.STDOUT,
                env=env)
            sampler = PeakSampler(proc.pid)
            sampler.start()
            try:
                rc = proc.wait(self.leg_timeout)
            except subprocess.TimeoutExpired:
                for pid in reversed(descendants(proc.pid)):  # the leg's own tree only
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass
                rc = proc.wait()
            finally:
                sampler.stop()
        row.update({"peak_rss_mb": sampler.rss / 1024, "peak_pss_mb": sampler.pss / 1024,
                    "processes": sampler.processes, "rc": rc})
        got = json.loads(result.read_text()) if result.is_file() else {}
        if not got:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            got = {"error": f"the leg's process exited with code {rc} without a result "
                            f"(timeout {self.leg_timeout:g} s?): {tail[0][:200]}"}
        row.update({k: got.get(k) for k in ("final_accuracy", "model_sha256", "threads",
                                           "cohorts_from", "run_dir")})
        row["cohorts"] = got.get("cohorts")
        if "error" in got or rc != 0:
            row["error"] = got.get("error") or f"exit code {rc} (see {log})"
            return row
        per_round = round_times(got["timestamps"])
        row["round_s"] = statistics.median(per_round)
        row["rounds_s"] = per_round
        row["startup_s"] = startup_seconds(spec.launched, got["timestamps"][0], row["round_s"])
        row["ok"] = True
        return row

    def run(self) -> dict[str, Any]:
        """Every leg of every federation; the JSON the command writes."""
        from fedshield.simulations.workers import threads_per_worker

        configs = self.configs()  # refuse a bad preset or override before anything runs
        threads = threads_per_worker(self.workers)
        load_before = os.getloadavg()
        rows: list[dict[str, Any]] = []
        mismatches: dict[str, str] = {}
        self.out.mkdir(parents=True, exist_ok=True)
        print(HEADER, flush=True)
        for fed, cfg in configs:
            fed_rows: list[dict[str, Any]] = []
            cohorts = ""
            for leg in leg_order(self.legs):
                row = self.run_leg(fed, cfg, leg, threads, cohorts)
                if row["ok"] and leg.startswith("inprocess-") and not cohorts and row["cohorts"]:
                    cohorts = str(self.out / "legs" / f"{fed.name}-cohorts.json")
                    Path(cohorts).write_text(json.dumps(row["cohorts"]))
                row.pop("cohorts", None)
                fed_rows.append(row)
                print(format_row(row), flush=True)
            add_ratios(fed_rows)
            if problem := compare(fed_rows):
                mismatches[fed.name] = problem
                print(f"ACCURACY MISMATCH in {fed.name}: {problem}", file=sys.stderr, flush=True)
            rows += fed_rows
        return {"benchmark": "simulation", "preset": self.preset, "legs": self.legs,
                "workers": self.workers, "threads_per_client_step": threads,
                "rounds": configs[0][1].federation.rounds, "command": self.command(),
                "noise": "reproducible (outside the guarantee)" if any(
                    c.privacy.enabled for _, c in configs) else "no DP",
                "machine": platform.platform(), "cpus": os.cpu_count(),
                "load_average_1_5_15": {"start": load_before, "end": os.getloadavg()},
                "memory": "peak over the leg's process tree (leg + descendants), sampled "
                          f"every {POLL_SECONDS:g} s from /proc: sum of VmRSS and of PSS",
                "accuracy_mismatch": mismatches, "rows": rows}

    def command(self) -> str:
        """The command line that reproduces this invocation."""
        parts = [f"fedshield bench simulation --preset {self.preset}",
                 f"--legs {','.join(self.legs)}", f"--workers {self.workers}"]
        if self.rounds:
            parts.append(f"--rounds {self.rounds}")
        if self.clients:
            parts.append(f"--clients {self.clients}")
        parts += [f"--set {s}" for s in self.sets]
        return " ".join(parts)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per-round ratios against the floor, inprocess-1 and Ray (where those legs finished)."""
    base = {r["leg"]: r.get("round_s") for r in rows if r["ok"]}
    for r in rows:
        if not r["ok"]:
            continue
        if base.get("floor"):
            r["floor_ratio"] = r["round_s"] / base["floor"]
        if base.get("inprocess-1") and r["leg"].startswith("inprocess-"):
            r["speedup_vs_1"] = base["inprocess-1"] / r["round_s"]
        if base.get("ray") and r["leg"] != "ray":
            r["speedup_vs_ray"] = base["ray"] / r["round_s"]


HEADER = ("| federation | leg | start-up s | s/round | peak RSS MB | peak PSS MB | procs "
          "| final acc | vs floor | vs inprocess-1 | vs ray |")


def _num(v: Any, fmt: str, unit: str = "") -> str:
    return "-" if v is None else format(v, fmt) + unit


def format_row(r: dict[str, Any]) -> str:
    """One Markdown table row (a failed leg: FAILED and why)."""
    if not r["ok"]:
        return (f"| {r['federation']} | {r['leg']} | FAILED: {r.get('error', '')} | | "
                f"{_num(r.get('peak_rss_mb'), '.0f')} | {_num(r.get('peak_pss_mb'), '.0f')} | "
                f"{r.get('processes', '-')} | | | | |")
    acc = "-" if r["final_accuracy"] is None else f"{100 * r['final_accuracy']:.2f}%"
    return (f"| {r['federation']} | {r['leg']} | {r['startup_s']:.2f} | {r['round_s']:.3f} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_pss_mb']:.0f} | {r['processes']} | {acc} | "
            f"{_num(r.get('floor_ratio'), '.2f', 'x')} | "
            f"{_num(r.get('speedup_vs_1'), '.2f', 'x')} | "
            f"{_num(r.get('speedup_vs_ray'), '.1f', 'x')} |")


def markdown(result: dict[str, Any]) -> str:
    """results.md: the command, the load, the table and any mismatch."""
    load = result["load_average_1_5_15"]
    lines = [f"Command: `{result['command']}`", "",
             f"Load average (1/5/15 min) at start {', '.join(f'{x:.2f}' for x in load['start'])}"
             f", at end {', '.join(f'{x:.2f}' for x in load['end'])}; {result['cpus']} CPUs; "
             f"{result['threads_per_client_step']} torch thread(s) per client step; "
             f"DP noise: {result['noise']}.", "", HEADER, "|" + "---|" * 11]
    lines += [format_row(r) for r in result["rows"]]
    for fed, problem in result["accuracy_mismatch"].items():
        lines += ["", f"**ACCURACY MISMATCH in {fed}**: {problem}"]
    return "\n".join(lines) + "\n"


def run(bench: Bench) -> int:
    """Run the bench, write results.json and results.md; 0 when every leg finished and the
    fedshield legs agree, else 1."""
    result = bench.run()
    (bench.out / RESULTS_JSON).write_text(json.dumps(result, indent=2))
    (bench.out / RESULTS_MD).write_text(markdown(result))
    print(f"wrote {bench.out / RESULTS_JSON} and {bench.out / RESULTS_MD}", flush=True)
    failed = [f"{r['federation']}/{r['leg']}" for r in result["rows"] if not r["ok"]]
    if failed:
        print(f"FAILED legs: {', '.join(failed)} (logs in {bench.out / 'legs'})",
              file=sys.stderr, flush=True)
    return 1 if failed or result["accuracy_mismatch"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (the same options as ``fedshield bench simulation``)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leg-spec", help=argparse.SUPPRESS)  # a leg's own process
    parser.add_argument("--preset", default="digits100", choices=list(PRESETS))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--legs", default=DEFAULT_LEGS)
    parser.add_argument("--workers", type=int, default=0, help="N (0 = one per core)")
    parser.add_argument("--clients", type=int, default=None, help="override num_clients")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="override key=value on every federation (repeatable)")
    parser.add_argument("--out", default="runs/bench-simulation")
    args = parser.parse_args(argv)
    if args.leg_spec:
        leg_main(args.leg_spec)
        return 0
    from fedshield.simulations.workers import resolve_workers

    try:
        bench = Bench(args.preset, parse_legs(args.legs), resolve_workers(args.workers),
                      Path(args.out), args.rounds, args.clients, args.sets)
        bench.configs()
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(bench)


if __name__ == "__main__":  # workers are spawned and re-import this module: keep the guard
    sys.exit(main())
