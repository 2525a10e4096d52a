"""The ``fedshield`` command line. Each command is a thin shell over a library function."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from fedshield.errors import FedShieldError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Privacy-preserving, poisoning-resistant federated training on Flower.")
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Privacy-preserving, poisoning-resistant federated training on Flower."""


def fail(message: str) -> None:
    """One clear line on stderr and exit code 2: no traceback for an error the user can fix."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


@app.command(epilog="Example: fedshield simulate configs/default.toml --set federation.rounds=3")
def simulate(
    config: str = typer.Argument(..., help="TOML experiment config, e.g. configs/default.toml"),
    set_: list[str] | None = typer.Option(None, "--set", help="override key=value (repeatable)"),
    json_out: bool = typer.Option(False, "--json", help="print the run summary as JSON"),
) -> None:
    """Run a federated simulation on this machine and write runs/<name>-<timestamp>/."""
    from fedshield import validation

    try:
        cfg = validation.load(config, set_ or [])
        from fedshield.server.report import ConsoleReporter
        from fedshield.simulations.runner import simulate as run

        summary = run(cfg, ConsoleReporter(Console(stderr=json_out)))
    except FedShieldError as exc:  # RunFailed included: every round failed, nothing registered
        fail(str(exc))
    if json_out:
        print(summary.to_json())
    if summary.failed:  # e.g. Ray's runtime, which logs the ServerApp's error
        fail(f"run failed: {summary.failure} (run folder {summary.run_dir})")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{text!r} is not a comma-separated list of numbers")
        raise


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


PARALLEL_HELP = ("cells run at a time, each in its own process with federation.workers = 1 and "
                 "cores/PARALLEL torch threads (0 = one per core; 1 = one after another in this "
                 "process, with the config's federation.workers)")
RESUME_HELP = ("reuse the rows of cells already finished in OUT for the same full config (its "
               "digest); --no-resume runs every cell again")


ROBUST_RULES = "fedavg,median,trimmed_mean,krum,geomed,bucketing+cclip,nnm+cclip"
ALL_ATTACKS = "none,label_flip,sign_flip,gaussian,scaling,alie,ipm,minmax,minsum,backdoor"


@app.command(epilog="Example: fedshield robustness configs/bench-robustness.toml --rules "
                    "fedavg,nnm+cclip --attacks none,alie,ipm --fractions 0.2 --partitions "
                    "dirichlet-0.5")
def robustness(
    config: str = typer.Argument(..., help="base TOML config (task, clients, rounds, training)"),
    rules: str = typer.Option(ROBUST_RULES, help="comma-separated aggregation specs"),
    attacks: str = typer.Option(ALL_ATTACKS, help="comma-separated attack names ('none' = clean)"),
    fractions: str = typer.Option("0.2", help="comma-separated Byzantine fractions"),
    partitions: str = typer.Option("iid,dirichlet-0.5,dirichlet-0.1",
                                   help="comma-separated: iid, shards, dirichlet-<alpha>"),
    set_: list[str] | None = typer.Option(None, "--set", help="override key=value on the base"),
    out: str = typer.Option("runs/robustness", help="folder for the table, heatmap and runs"),
    parallel: int = typer.Option(0, min=0, help=PARALLEL_HELP),
    resume: bool = typer.Option(True, "--resume/--no-resume", help=RESUME_HELP),
) -> None:
    """Run the rule x attack x fraction x partition matrix; write CSV/Markdown, a heatmap and
    each rule's worst case over attacks. Cells run in parallel, each row is kept in
    OUT/robustness.rows.jsonl as it finishes, and a rerun resumes from there."""
    from pathlib import Path

    from fedshield import validation
    from fedshield.simulations.sweeps import robustness_matrix

    try:
        base = validation.load(config, set_ or [])
        result = robustness_matrix(base, _names(rules), _names(attacks), _floats(fractions),
                                   _names(partitions), Path(out), parallel=parallel,
                                   resume=resume, progress=True)
    except FedShieldError as exc:
        fail(str(exc))
    from rich.table import Table

    table = Table(title="worst case over attacks (final test accuracy)")
    for col in ("rule", "partition", "f", "no attack", "worst", "worst attack"):
        table.add_column(col)
    for r in result["worst_case"]:
        table.add_row(r["rule"], r["partition"], f"{r['byzantine_fraction']:g}",
                      _acc(r["no_attack_accuracy"]), _acc(r["worst_accuracy"]), r["worst_attack"])
    Console().print(table)
    Console().print(f"tables and heatmap in {out}/")
    _grid_outcome(result["rows"], result["chance"])


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _grid_outcome(rows: list[dict], chance: str | None) -> None:
    """Say loudly when a grid measured nothing; exit 1 when every cell failed."""
    from fedshield.simulations.grid_cells import failed

    if chance:
        console.print(f"[bold yellow]WARNING:[/] {chance}")
    bad = [r for r in rows if failed(r)]
    if bad:
        console.print(f"[bold red]{len(bad)} of {len(rows)} cells failed[/] (their rows say why; "
                      "a rerun retries the cells that errored)")
    if rows and len(bad) == len(rows):
        raise typer.Exit(1)


def privacy_sweep(
    config: str = typer.Argument(..., help="base TOML config"),
    epsilons: str = typer.Option("1,3,8,inf", help="comma-separated target epsilons; inf = no DP"),
    seeds: str = typer.Option("0", help="comma-separated seeds"),
    set_: list[str] | None = typer.Option(None, "--set", help="override key=value on the base"),
    out: str = typer.Option("runs/privacy-sweep", help="folder for the table, plot and runs"),
    audit_canaries: int = typer.Option(
        0, help="also run the one-run canary audit with this many canaries at every point and "
                "report its empirical epsilon lower bound (0 = no audit; 1000 is typical)"),
    parallel: int = typer.Option(0, min=0, help=PARALLEL_HELP),
    resume: bool = typer.Option(True, "--resume/--no-resume", help=RESUME_HELP),
) -> None:
    """Privacy-utility sweep: target epsilon x seeds; writes privacy_sweep.csv/.md and
    privacy_utility.png (accuracy vs epsilon, with the non-private line). Cells run in parallel,
    each row is kept in OUT/privacy_sweep.rows.jsonl as it finishes, and a rerun resumes."""
    from pathlib import Path

    from fedshield import validation
    from fedshield.simulations.sweeps import privacy_sweep as sweep

    try:
        base = validation.load(config, set_ or [])
        rows = sweep(base, _floats(epsilons), [int(s) for s in _floats(seeds)], Path(out),
                     audit_canaries=audit_canaries, parallel=parallel, resume=resume,
                     progress=True)
    except FedShieldError as exc:
        fail(str(exc))
    for r in rows:
        spent = r.get("epsilon_label") or "no DP"
        noise = f", noise multiplier {r['noise_multiplier_used']}" if r.get(
            "noise_multiplier_used") else ""
        audited = (f", audit lower bound {r['audit_epsilon_lower_bound']:.3f}"
                   if r.get("audit_epsilon_lower_bound") is not None else "")
        accuracy = "-" if r["final_accuracy"] is None else f"{r['final_accuracy']:.4f}"
        Console().print(f"target eps {r['target_epsilon']:g} seed {r['seed']}: accuracy "
                        f"{accuracy}, spent {spent}{noise}{audited}")
    Console().print(f"table and plot in {out}/")
    from fedshield.simulations.sweeps import grid_chance

    _grid_outcome(rows, grid_chance(rows, base))


bench_app = typer.Typer(no_args_is_help=True,
                        help="Benchmarks: print a table and write JSON/Markdown under runs/.")


@bench_app.command("aggregators",
                   epilog="Example: fedshield bench aggregators --ns 10,100 --ds 1000000")
def bench_aggregators(
    ns: str = typer.Option("10,100,1000", help="comma-separated numbers of clients"),
    ds: str = typer.Option("100000,1000000", help="comma-separated update sizes (parameters)"),
    rules: str = typer.Option("", help="comma-separated aggregation specs, e.g. krum,nnm+cclip "
                                       "(default: every rule)"),
    repeats: int = typer.Option(3, min=1, help="best of this many timings (1 for inputs >= 1e8)"),
    out: str = typer.Option("runs/bench-aggregators",
                            help="folder for results.json and results.md"),
) -> None:
    """Time each aggregation rule against Flower 1.42's built-in strategy aggregation on the
    same updates, as a speed ratio per rule, n and d."""
    from fedshield.benchmarks.bench_aggregators import HEADER, SPECS, assumed_f, run

    specs = _names(rules) or SPECS
    sizes = [int(v) for v in _floats(ns)], [int(v) for v in _floats(ds)]
    if min(min(sizes[0]), min(sizes[1])) < 1:
        fail("--ns and --ds need sizes >= 1")
    try:
        for spec in specs:  # refuse a bad spec before the first (possibly long) timing
            assumed_f(spec, max(sizes[0]))
    except FedShieldError as exc:
        fail(str(exc))
    print(HEADER)
    run(*sizes, out, repeats, specs)


@bench_app.command("simulation",
                   epilog="Example: fedshield bench simulation --preset digits100 --rounds 3")
def bench_simulation(
    preset: str = typer.Option("digits100", help="digits100, mnist1000-dp or mnist1000"),
    rounds: int | None = typer.Option(None, help="rounds per federation (default: the "
                                                 "preset's; at least 2)"),
    legs: str = typer.Option("inprocess-1,inprocess-N,ray,floor",
                             help="comma-separated legs: inprocess-1, inprocess-N (or "
                                  "inprocess-<count>), ray, floor"),
    workers: int = typer.Option(0, min=0, help="N: workers of inprocess-N and the floor's "
                                               "divisor (0 = one per core)"),
    clients: int | None = typer.Option(None, min=1, help="override federation.num_clients"),
    set_: list[str] | None = typer.Option(None, "--set", help="override key=value on every "
                                                               "federation (repeatable)"),
    out: str = typer.Option("runs/bench-simulation", help="folder for results.json/.md, the "
                                                          "legs' logs and runs"),
) -> None:
    """Run one federation in-process with 1 and N workers, on Flower's Ray engine and as the
    bare compute floor, each leg in its own process; print start-up, seconds per round, peak
    memory and final accuracy per leg. Exits 1 when a leg fails or the fedshield legs'
    results differ."""
    from pathlib import Path

    from fedshield.benchmarks.bench_simulation import Bench, parse_legs, run
    from fedshield.simulations.workers import resolve_workers

    try:
        bench = Bench(preset, parse_legs(legs), resolve_workers(workers), Path(out), rounds,
                      clients, list(set_ or []))
        bench.configs()  # a bad preset or override fails here, before any leg runs
    except FedShieldError as exc:
        fail(str(exc))
    code = run(bench)
    if code:
        raise typer.Exit(code)


def _mount() -> None:
    """Sub-commands from fedshield/commands/ and fedshield/site.py (all orchestration)."""
    from fedshield.commands.deploy import (
        monitor_command,
        predict_command,
        registry_app,
        serve_command,
    )
    from fedshield.site import site_app

    app.add_typer(registry_app, name="registry", help="List, show and promote registered models.")
    app.command("serve")(serve_command)
    app.command("monitor")(monitor_command)
    app.command("predict")(predict_command)
    app.add_typer(site_app, name="site")
    from fedshield.commands.privacy import privacy_app

    privacy_app.command("sweep", epilog="Example: fedshield privacy sweep configs/default.toml "
                        "--epsilons 1,3,8,inf --seeds 0,1")(privacy_sweep)
    app.add_typer(privacy_app, name="privacy")
    app.add_typer(bench_app, name="bench")
    from fedshield.commands.report import report_command

    app.command("report", epilog="Example: fedshield report runs/default-20261201-120000")(
        report_command)


_mount()


def main() -> None:
    """Entry point of the ``fedshield`` command (quiet MLflow/datasets defaults first)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    sys.exit(app())


if __name__ == "__main__":
    main()
