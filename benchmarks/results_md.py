"""Render benchmarks/RESULTS.md from the result JSON files under benchmarks/results/.

Every benchmark figure the docs quote lives in a JSON file written by the benchmark that measured
it; this script turns those files into tables, so no figure is hand-copied. Run it after adding
a result (``python -m benchmarks.results_md``); ``tests/test_results_md.py`` fails while
RESULTS.md differs from its output.

Values are printed as recorded, only formatted: accuracies as percentages with two decimals
(the JSON holds four), epsilons with three decimals, seconds and milliseconds with three
significant digits, speedups with one decimal and DP-overhead ratios with two.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedshield.run_records import RunSummary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUTPUT = ROOT / "benchmarks" / "RESULTS.md"

@dataclass(frozen=True)
class Recipe:
    """How a result was produced: the commands as run (checked by the docs test) and a note."""

    commands: tuple[str, ...]
    note: str = ""

    def markdown(self) -> str:
        """``Command: `...` (note)`` for the results page."""
        label = "Command" if len(self.commands) == 1 else "Commands"
        text = f"{label}: " + "; ".join(f"`{c}`" for c in self.commands)
        return text + (f" ({self.note})" if self.note else "")


def recipe(*commands: str, note: str = "") -> Recipe:
    """A Recipe from its commands and an optional note."""
    return Recipe(tuple(commands), note)


ROBUSTNESS = ("fedshield robustness configs/bench-robustness.toml --rules {rules} --attacks "
              "none,label_flip,sign_flip,gaussian,scaling,alie,ipm,minmax,minsum,backdoor "
              "--partitions dirichlet-0.5")
AGGREGATORS = recipe("fedshield bench aggregators --ns 10,100,1000 --ds 100000,1000000")
# The command that produced each result folder (or file), as run. Folders of the DP-overhead
# benchmark need none: their JSON records the arguments, and the command is rebuilt from them.
COMMANDS: dict[str, Recipe] = {
    "cpu-2026-11-26/aggregators": AGGREGATORS,
    "cpu-2026-11-27/aggregators": AGGREGATORS,
    "cpu-2026-11-27/aggregators-legacy": recipe(
        "fedshield bench aggregators --ns 100 --ds 1000000 "
        "--rules fedavg,krum,multikrum,median,trimmed_mean,bulyan"),
    "cpu-2026-11-26/bench_accuracy_fedavg.json": recipe(
        "python benchmarks/bench_accuracy.py configs/bench-mnist-fedavg.toml"),
    "cpu-2026-11-26/bench_accuracy_fedavg_no_augment.json": recipe(
        "python benchmarks/bench_accuracy.py configs/bench-mnist-fedavg.toml "
        "--set train.augment=none"),
    "cpu-2026-11-26/robustness-mnist": recipe(
        ROBUSTNESS.format(rules="bucketing+cclip")
        + " --set federation.rounds=10 --set train.lr_schedule=constant",
        ROBUSTNESS.format(rules="nnm+cclip")
        + " --set federation.rounds=10 --set train.lr_schedule=constant",
        "fedshield robustness configs/bench-robustness.toml --rules fedavg --attacks none "
        "--partitions dirichlet-0.5 --set federation.rounds=10 --set train.lr_schedule=constant"),
    "cpu-2026-11-26/robustness-mnist-20rounds": recipe(
        ROBUSTNESS.format(rules="nnm+cclip"),
        "fedshield robustness configs/bench-robustness.toml --rules fedavg --attacks none "
        "--partitions dirichlet-0.5"),
    "cpu-2026-11-27/robustness-recheck": recipe(
        "fedshield robustness configs/bench-robustness.toml --rules nnm+cclip "
        "--attacks ATTACK --partitions dirichlet-0.5", note="ATTACK is the file's name"),
    "cpu-2026-11-26/bench_serving.json": recipe("python benchmarks/bench_serving.py"),
    "cpu-2026-11-27/dp-accuracy": recipe(
        "fedshield simulate configs/bench-dp-mnist.toml --set privacy.target_epsilon=3.0 "
        "--set privacy.max_grad_norm=1.0 --set train.momentum=0.5 --set train.batch_size=B "
        "--set train.lr=LR --set federation.rounds=R",
        note="B, LR and R as in the file name; R = 30 where it names none"),
    "cpu-2026-11-27/dp-accuracy-scattering": recipe(
        "fedshield simulate configs/bench-dp-mnist-scattering.toml "
        "--set privacy.target_epsilon=E [--set ...]",
        "python benchmarks/run_suite.py dp --only dp-iid-eps1-scatter-linear",
        note="the settings beyond the config's are in the file name"),
    "cpu-2026-11-27/privacy-sweep-scattering": recipe(
        "fedshield privacy sweep configs/bench-dp-mnist-scattering.toml "
        "--epsilons 0.5,1,3,8,inf --out runs/privacy-sweep-scattering",
        note="measured before the secret DP randomness and the histogram release"),
    "cpu-2026-12-01/privacy-sweep-scattering-audit": recipe(
        "fedshield privacy sweep configs/bench-dp-mnist-scattering.toml "
        "--epsilons 0.5,1,3,8,inf --audit-canaries 1000"),
    "cpu-2026-12-01/privacy-eps1-seeds": recipe(
        "git worktree add ../old 4357f23  # 'old': the code before the secret randomness",
        "fedshield simulate configs/bench-dp-mnist-scattering.toml "
        "--set privacy.target_epsilon=1.0 --set seed=S --set name=acc-T-sS --json"
        "  # S = 1, 2; T = main (8a55954) and old",
        note="seed 0 of both is in the two privacy-sweep-scattering folders"),
    "cpu-2026-12-01/default-run": recipe(
        "fedshield simulate configs/default.toml --set task.name=mnist-scattering "
        "--set task.model=scatter_linear --set train.lr=2.0 --set train.batch_size=1024",
        note="at 413404e, whose defaults were the tanh CNN: the overrides are today's "
        "configs/default.toml (`make run`); seeds 1-2 also with --set seed=S "
        "--set deployment.handoff=false; see table.md"),
    "cpu-2026-12-02/default-run": recipe(
        "make run  # = fedshield simulate configs/default.toml; seeds 1, 2: --set seed=S",
        note="seeds 0-2 under load, and a fresh clone's make run on the quiet machine "
        "(summary-fresh-clone-seed0); see table.md"),
    "h100-2026-11-26": recipe("python benchmarks/run_suite.py fedavg dp robustness",
                              note="on an H100 machine, 14 runs at a time"),
}


@dataclass(frozen=True)
class Table:
    """A rendered table: column names and rows of already formatted cells."""

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def markdown(self) -> str:
        """The table as GitHub-flavoured Markdown."""
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def sig3(v: float) -> str:
    """Three significant digits, e.g. 0.206, 2.23, 15.2, 141 (seconds, milliseconds)."""
    if v == 0:
        return "0"
    digits = max(0, 2 - math.floor(math.log10(abs(v))))
    return f"{v:.{digits}f}"


def cell(key: str, v: Any) -> str:
    """One value formatted by what its key measures."""
    if v is None or v == "":
        return "-"
    if isinstance(v, bool) or isinstance(v, str) or isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return ", ".join(cell(key, x) for x in v) or "-"
    if not isinstance(v, float):
        return str(v)
    if math.isinf(v):
        return "inf"
    if key.endswith(("accuracy", "backdoor_success", "false_quarantine_rate")):
        return f"{100 * v:.2f}%"
    if key == "target_epsilon":
        return f"{v:g}"
    if "epsilon" in key:
        return f"{v:.3f}" if key != "audit_epsilon_lower_bound" else f"{v:.2f}"
    if key.startswith("speedup") or key == "cpu_speedup":
        return f"{v:.1f}x"
    if key.endswith("ratio"):
        return f"{v:.2f}x"
    if key.endswith("_s") or key.endswith("_ms") or "seconds" in key:
        return sig3(v)
    if key == "samples_per_s":
        return f"{v:.0f}"
    return f"{v:.4g}"


def table(records: list[dict[str, Any]], keys: list[str]) -> Table:
    """A table of the given keys that any record holds, in that order."""
    present = [k for k in keys if any(k in r for r in records)]
    return Table(tuple(present), tuple(tuple(cell(k, r.get(k)) for k in present)
                                       for r in records))


RUN_KEYS = ["job", "config", "overrides", "rule", "attack", "byzantine_fraction", "partition",
            "task", "clients", "rounds", "target_epsilon", "epsilon_max", "noise",
            "noise_multiplier_used", "final_accuracy", "best_accuracy", "backdoor_success",
            "quarantined", "false_quarantine_rate", "rejected", "audit_epsilon_lower_bound",
            "audit_canaries", "status", "wall_seconds"]
AGG_KEYS = ["rule", "n", "d", "f", "ours_s", "flower_s", "speedup", "flower_legacy_s",
            "speedup_legacy", "ours_with_flatten_s", "speedup_with_flatten"]
OVERHEAD_KEYS = ["task", "model", "examples", "mode", "seconds_min", "seconds_median",
                 "loop_seconds_min", "ratio", "loop_ratio"]
SIMULATION_KEYS = ["federation", "leg", "workers", "threads", "startup_s", "round_s",
                   "peak_rss_mb", "peak_pss_mb", "processes", "final_accuracy", "floor_ratio",
                   "speedup_vs_1", "speedup_vs_ray", "error"]
DEPLOYMENT_KEYS = ["mode", "task", "dp", "sites", "rounds_completed", "round_s", "flower_s",
                   "fedshield_s", "client_own_s", "train_s", "target_s", "deliver_s", "startup_s",
                   "handler_s", "eval_handler_s", "server_s", "return_s", "round1_s",
                   "traffic_bytes_per_round_client", "final_accuracy"]
SERVING_KEYS = ["mode", "runtime", "format", "batch", "p50_ms", "p99_ms", "mean_ms",
                "samples_per_s", "n"]


def summary_row(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """The figures of one ``summary.json`` (a ``fedshield simulate`` run)."""
    s = RunSummary.from_dict(data)
    p = s.privacy
    return {"file": name, "task": s.task, "strategy": s.strategy,
            "partition": (s.partition or {}).get("kind"), "seed": s.seed,
            "rounds_completed": s.rounds_completed,
            "target_epsilon": p.target_epsilon if p.enabled else None,
            "epsilon_max": p.epsilon_max,
            "noise": list(p.noise_multipliers_used) if p.noise_multipliers_used is not None
            else None,
            "final_accuracy": s.final.accuracy if s.final else None,
            "best_accuracy": s.best.accuracy if s.best else None,
            "best_round": s.best.round if s.best else None, "wall_seconds": s.wall_seconds}


SUMMARY_KEYS = ["file", "task", "strategy", "partition", "seed", "rounds_completed",
                "target_epsilon", "epsilon_max", "noise", "final_accuracy", "best_accuracy",
                "best_round", "wall_seconds"]


def dp_overhead_command(args: dict[str, Any]) -> str:
    """The bench_dp_overhead.py command line rebuilt from the arguments its JSON records."""
    return ("python benchmarks/bench_dp_overhead.py --tasks " + " ".join(args["tasks"])
            + " --modes " + " ".join(args["modes"])
            + f" --examples {args['examples']} --batch-size {args['batch_size']}"
            + f" --epochs {args['epochs']} --repeats {args['repeats']}"
            + f" --threads {args['threads']}")


def render_file(path: Path) -> tuple[Recipe | None, Table]:
    """(command if the file records one, table) for one result JSON that is not a summary."""
    data = json.loads(path.read_text())
    if isinstance(data, dict) and data.get("benchmark") == "dp-overhead":
        return recipe(dp_overhead_command(data["args"])), table(data["rows"], OVERHEAD_KEYS)
    if isinstance(data, dict) and data.get("benchmark") == "simulation":  # records its command
        load = data["load_average_1_5_15"]
        note = (f"{data['cpus']} CPUs, 1-minute load average {load['start'][0]:.1f} at the "
                f"start and {load['end'][0]:.1f} at the end")
        return recipe(data["command"], note=note), table(data["rows"], SIMULATION_KEYS)
    if isinstance(data, dict) and data.get("rows") and "sites" in data["rows"][0]:  # deployment
        start, end = data["loadavg_at_start"], data["loadavg_at_end"]
        note = (f"{data['cpu_count']} CPUs, 1-minute load average {start[0]:.1f} at the start "
                f"and {end[0]:.1f} at the end; median seconds per round after round 1")
        return recipe("python " + data["command"], note=note), table(data["rows"],
                                                                     DEPLOYMENT_KEYS)
    if isinstance(data, dict) and "rows" in data and data["rows"] and "rule" in data["rows"][0]:
        return None, table(data["rows"], AGG_KEYS)
    if isinstance(data, dict) and "rows" in data:
        return None, table(data["rows"], SERVING_KEYS)
    if isinstance(data, list) and data and "worst_accuracy" in data[0]:
        keys = ["rule", "partition", "byzantine_fraction", "no_attack_accuracy",
                "worst_accuracy", "worst_attack"]
        return None, table(data, keys)
    if isinstance(data, list):
        return None, table(data, RUN_KEYS)
    raise ValueError(f"{path}: a result JSON of unknown shape; teach benchmarks/results_md.py "
                     "to render it (a list of runs, a dict with 'rows', or a summary.json)")


def is_summary(path: Path) -> bool:
    """Whether the file is a ``fedshield simulate`` summary.json (one run)."""
    data = json.loads(path.read_text())
    return isinstance(data, dict) and "final" in data and "best" in data


def command_for(rel: str) -> Recipe | None:
    """The recorded command of a result file or of the folder holding it."""
    while rel:
        if rel in COMMANDS:
            return COMMANDS[rel]
        rel = rel.rpartition("/")[0]
    return None


def render(results: Path = RESULTS) -> str:
    """The whole RESULTS.md text for every JSON file under ``results``."""
    out = ["# Benchmark results", "",
           "Generated by `python -m fedshield.benchmarks.results_md` from the JSON files under",
           "`benchmarks/results/`; do not edit by hand. Each section is one result folder or",
           "file, with the command that produced it. Accuracy is the final test accuracy of the",
           "global model; epsilons are per-client, sample-level, at the run's delta.",
           "Dated folders: `cpu-*` ran on the project's 2-core CPU machine, `h100-*` on an H100",
           "machine lent to the project (accuracy does not depend on the hardware, timings do).",
           "Folders dated before 2026-12-01 were measured at or before 4357f23, before the secret",
           "DP randomness and the noised histogram release; of their figures, only the MNIST",
           "privacy sweep has been re-measured (`cpu-2026-12-01/privacy-sweep-scattering-audit`).",
           ""]
    files = sorted(results.rglob("*.json"))
    groups: dict[str, list[Path]] = {}
    for f in files:
        rel = f.relative_to(results).as_posix()
        key = rel.rpartition("/")[0] if is_summary(f) else rel
        groups.setdefault(key, []).append(f)
    for key, members in groups.items():
        out += [f"## {key}", ""]
        if is_summary(members[0]):
            command = command_for(key)
            rows = [summary_row(m.stem, json.loads(m.read_text())) for m in members]
            tab = table(rows, SUMMARY_KEYS)
        else:
            recorded, tab = render_file(members[0])
            command = recorded or command_for(key)
        out += [command.markdown() if command else "Command: not recorded.", ""]
        out += [tab.markdown(), ""]
    return "\n".join(out)


def privacy_sweep_table(path: Path) -> str:
    """The short sweep table the README shows (target, stated, noise, accuracy, audit bound)."""
    rows = json.loads(path.read_text())
    lines = ["| target epsilon | stated epsilon (max over clients) | noise multiplier | "
             "final test accuracy | audit lower bound |", "|---|---|---|---|---|"]
    for r in rows:
        dp = r["target_epsilon"] != math.inf
        lines.append("| " + " | ".join([
            cell("target_epsilon", r["target_epsilon"]) if dp else "no DP",
            cell("epsilon_max", r["epsilon_max"]), cell("noise", r["noise_multiplier_used"]),
            cell("final_accuracy", r["final_accuracy"]),
            cell("audit_epsilon_lower_bound", r["audit_epsilon_lower_bound"])]) + " |")
    return "\n".join(lines)


def main() -> None:
    """Write RESULTS.md, or with --check exit 1 if it is out of date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if RESULTS.md is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            raise SystemExit("benchmarks/RESULTS.md is out of date: run "
                             "`python -m fedshield.benchmarks.results_md`")
        return
    OUTPUT.write_text(text)


if __name__ == "__main__":
    main()
