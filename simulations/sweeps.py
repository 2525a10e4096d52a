"""Grids of simulations: privacy-utility sweeps and the robustness matrix.

Each grid point (cell) is the base config plus ``key=value`` overrides; every cell is a normal run
with its own run folder under ``runs/<cell>/``, and the grid writes one table (CSV + Markdown +
JSON) and a plot. The cells run in parallel processes, each row is appended to
``<table>.rows.jsonl`` as its cell finishes and a rerun of the same grid resumes from there
(simulations/grid_cells.py); the tables are rendered from those rows.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import itertools
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from fedshield.simulations.grid_cells import (
    ROWS_SUFFIX,
    Cell,
    cell_config,
    chance_warning,
    make_cell,
    run_cells,
)

from fedshield import schema, validation
from fedshield.errors import ConfigError, RunFailed
from fedshield.run_records import COMPLETED, RunSummary

log = logging.getLogger("flwr")


def run_point(base: schema.Config, overrides: dict[str, Any], out_dir: Path,
              reporter=None) -> dict:
    """Run one grid point (base config + overrides) and return its table row. Its run is
    tracked (deployment/tracking.py) as a child of the grid's open run."""
    from fedshield.simulations.runner import simulate

    cfg = cell_config(base, overrides, out_dir)
    try:
        summary = simulate(cfg, reporter)
    except RunFailed as exc:  # one failed cell is a row saying so, not the end of the grid
        if exc.summary is None:
            raise
        summary = exc.summary
    return sweep_row(overrides, summary)


def sweep_row(overrides: dict[str, Any], summary: RunSummary) -> dict:
    """One table row of a grid: the point's overrides and what its run summary says.

    Attacker detection, per cell: ``true_quarantine_rate`` is the fraction of the attackers
    quarantined (None without attackers), ``false_quarantine_rate`` the fraction of the honest
    clients quarantined (with no attack every quarantined client is honest)."""
    privacy, robustness, attack = summary.privacy, summary.robustness, summary.attack_report
    quarantined = robustness.quarantined if robustness else ()
    if attack is not None:
        true_rate, false_rate = attack.detection_rate, attack.false_quarantine_rate
    else:
        true_rate = None
        false_rate = len(quarantined) / summary.num_clients if summary.num_clients else None
    return {**overrides, "status": summary.status or COMPLETED,
            "final_accuracy": summary.final_accuracy, "best_accuracy": summary.best_accuracy,
            "epsilon_max": privacy.epsilon_max,
            # the noise the clients actually used (planned per client from the target) and the
            # unit, delta and accountant of epsilon_max
            "noise_multiplier_used": ",".join(
                f"{x:.4g}" for x in privacy.noise_multipliers_used or ()) or None,
            "epsilon_label": privacy.label,
            "rounds_completed": summary.rounds_completed,
            "rejected": robustness.rejected_total if robustness else None,
            "quarantined": len(quarantined) if robustness else None,
            "quarantined_ids": _ids(quarantined, summary.node_partitions),
            "true_quarantine_rate": true_rate, "false_quarantine_rate": false_rate,
            "backdoor_success": attack.backdoor_success if attack else None,
            "wall_seconds": summary.wall_seconds, "run_dir": summary.run_dir}


def _ids(partitions: tuple[int, ...], node_partitions: Mapping[str, int]) -> str | None:
    """Quarantined partition ids, each with its node id where known: "3 (node 8812...)"."""
    nodes = {p: n for n, p in node_partitions.items()}
    return " ".join(f"{p}" + (f" (node {nodes[p]})" if p in nodes and str(p) != nodes[p]
                              else "") for p in partitions) or None


def write_table(rows: list[dict], out_dir: Path, stem: str,
                note: str | None = None) -> tuple[Path, Path]:
    """Write the rows as CSV and Markdown under ``out_dir``; the two paths. ``note``: a warning
    printed above the Markdown table (e.g. that every cell sits at chance)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    csv_path = out_dir / f"{stem}.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    # The Markdown table leaves out what says nothing: the run folders, and columns empty in
    # every row (e.g. epsilon in a grid without DP). The CSV and JSON keep every column.
    shown = [k for k in keys if k != "run_dir" and any(r.get(k) is not None for r in rows)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k in shown) + " |")
    if note:
        lines = [f"> **WARNING:** {note}", ""] + lines
    md_path = out_dir / f"{stem}.md"
    md_path.write_text("\n".join(lines) + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    return csv_path, md_path


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4f}"
    return str(v)


# --- privacy-utility sweep --------------------------------------------------------------------
def privacy_sweep(base: schema.Config, epsilons: list[float], seeds: list[int], out_dir: Path,
                  reporter=None, audit_canaries: int = 0, *, parallel: int = 1,
                  resume: bool = True, progress: bool = False) -> list[dict]:
    """Target epsilon (inf = no DP) x seeds; returns one row per run. With ``audit_canaries`` each
    row also gets the one-run canary audit's empirical epsilon lower bound at the same settings
    (simulations/audit.py: the server's view of client 0's updates), next to the stated one.
    The sweep is one MLflow run, its points the child runs (deployment/tracking.py).
    ``parallel`` cells at a time (0 = one per core), ``resume`` from privacy_sweep.rows.jsonl
    (simulations/grid_cells.py); ``reporter`` shows each run's rounds when ``parallel`` is 1."""
    from fedshield.deployment.tracking import grid_run

    cells = []
    for eps, seed in itertools.product(epsilons, seeds):
        overrides: dict[str, Any] = {"seed": seed, "privacy.enabled": math.isfinite(eps)}
        if math.isfinite(eps):
            # a resumed cell spends on the same ledger: what the killed try released stays in
            overrides.update({"privacy.target_epsilon": eps, "privacy.noise_multiplier": 0.0,
                              "privacy.max_epsilon": 0.0,
                              "privacy.ledger_dir": str(out_dir / "ledgers"
                                                        / f"eps{eps:g}-s{seed}")})
        # the row names the point by seed and target; the other overrides are plumbing
        cells.append(make_cell(base, {"seed": seed, "target_epsilon": eps}, overrides, out_dir,
                               {"audit_canaries": audit_canaries}))
    job = functools.partial(_cell_job, base, out_dir, audit_canaries,
                            reporter if parallel == 1 else None)
    with grid_run(base, "privacy sweep", out_dir,
                  {"epsilons": ",".join(f"{e:g}" for e in epsilons),
                   "seeds": ",".join(map(str, seeds)), "audit_canaries": audit_canaries}) as grid:
        rows = run_cells(cells, job, out_dir / f"privacy_sweep{ROWS_SUFFIX}", parallel=parallel,
                         resume=resume, label="privacy sweep", progress=progress,
                         parent=grid.parent, engine=base.federation.engine)
        note = _chance(rows, base)
        write_table(rows, out_dir, "privacy_sweep", note)
        plot_privacy_utility(rows, out_dir / "privacy_utility.png",
                             f"delta {base.privacy.delta:g}, {base.privacy.accountant} >= pld")
        grid_report(out_dir)
        grid.finish(grid_files(out_dir, "privacy_sweep"))
    return rows


def _cell_job(base: schema.Config, out_dir: Path, audit_canaries: int, reporter, cell: Cell,
              workers: int | None) -> dict:
    """A cell's row body (grid_cells.CellJob): its run, and its audit when asked; module-level
    so that cell processes can import it."""
    overrides = dict(cell.overrides)
    if workers is None:
        row = _without(run_point(base, overrides, out_dir, reporter), overrides)
    else:  # a cell process: its clients in it (cells x threads = cores), its console to a file
        from fedshield.server.report import ConsoleReporter
        from rich.console import Console

        overrides["federation.workers"] = workers
        folder = Path(overrides["output_dir"])
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "console.log", "a") as fh:  # the terminal shows the grid's progress
            quiet = ConsoleReporter(Console(file=fh, width=100))
            row = _without(run_point(base, overrides, out_dir, quiet), overrides)
    if audit_canaries:
        row.update(audit_point(base, overrides, audit_canaries, out_dir))
    return row


def grid_chance(rows: list[dict], base: schema.Config) -> str | None:
    """The grid's at-chance warning (grid_cells.chance_warning at the base task's classes), or
    None."""
    from fedshield.tasks import task_for

    try:
        classes = task_for(base.task).num_classes
    except Exception:  # noqa: BLE001 — an unknown class count (e.g. hf: offline) skips the check
        return None
    return chance_warning(rows, classes)


def _chance(rows: list[dict], base: schema.Config) -> str | None:
    """grid_chance, logged loudly (the Markdown tables carry it too)."""
    note = grid_chance(rows, base)
    if note:
        log.warning("WARNING: %s", note)
    return note


def _without(row: dict, overrides: dict[str, Any]) -> dict:
    """The row less the override keys (a grid names its point in its own short columns)."""
    return {k: v for k, v in row.items() if k not in overrides}


def grid_report(out_dir: Path) -> None:
    """The grid's report.html (deployment/html_report.py ``write_grid_report``), before the
    grid's run logs it; skipped when that module is not installed, warned about when it fails."""
    if importlib.util.find_spec("fedshield.deployment.html_report") is None:
        return
    try:
        module = importlib.import_module("fedshield.deployment.html_report")
        module.write_grid_report(out_dir)
    except Exception as exc:  # noqa: BLE001 — the grid's tables are written: keep them
        log.warning("the grid report for %s failed: %s: %s", out_dir, type(exc).__name__, exc)


def grid_files(out_dir: Path, stem: str) -> list[Path]:
    """A grid's outputs logged to its MLflow run: its tables, plots and report."""
    return [out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "json")] + \
        [out_dir / f"{stem}{ROWS_SUFFIX}"] + \
        [out_dir / "worst_case.md", out_dir / "report.html"] + sorted(out_dir.glob("*.png"))


def audit_point(base: schema.Config, overrides: dict[str, Any], canaries: int,
                out_dir: Path) -> dict:
    """The canary audit of one sweep point: the bound the server's view of client 0's updates
    certifies (its ``update`` adversary), at 95% confidence."""
    from fedshield.simulations.audit import canary_audit

    # the audit keeps its own ledgers
    cfg = validation.from_run_config({**base.flat(), **overrides})
    (result,) = canary_audit(cfg, canaries, adversaries=("update",), workdir=out_dir)
    return {"audit_epsilon_lower_bound": result.bound.epsilon, "audit_canaries": canaries}


def plot_privacy_utility(rows: list[dict], path: Path, accounting: str = "delta fixed") -> None:
    """Plot accuracy against spent epsilon (mean and std over seeds) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = sorted({r["target_epsilon"] for r in rows if math.isfinite(r["target_epsilon"])})
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    if private:
        # failed cells (no accuracy or epsilon) are rows of the table, not points of the plot
        done = [r for r in rows if r.get("final_accuracy") is not None
                and r.get("epsilon_max") is not None]
        private = [e for e in private if any(r["target_epsilon"] == e for r in done)]
        accs = [[r["final_accuracy"] for r in done if r["target_epsilon"] == e] for e in private]
        spent = [np.mean([r["epsilon_max"] for r in done if r["target_epsilon"] == e])
                 for e in private]
        ax.errorbar(spent, [np.mean(a) for a in accs], yerr=[np.std(a) for a in accs], fmt="o-",
                    capsize=3, label="sample-level DP per client, add/remove (epsilon spent, "
                                     "max over clients)")
        for e, x, a in zip(private, spent, accs, strict=True):
            bounds = [r["audit_epsilon_lower_bound"] for r in rows if r["target_epsilon"] == e
                      and r.get("audit_epsilon_lower_bound") is not None]
            if bounds:  # the empirical lower bound next to the stated epsilon
                ax.annotate(f"audit >= {max(bounds):.2f}", (x, np.mean(a)), fontsize=7,
                            textcoords="offset points", xytext=(4, -10))
    baseline = [r["final_accuracy"] for r in rows if math.isinf(r["target_epsilon"])
                and r.get("final_accuracy") is not None]
    if baseline:
        ax.axhline(np.mean(baseline), color="gray", ls="--", label="non-private")
    ax.set_xlabel(f"epsilon ({accounting})")
    ax.set_ylabel("final test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- robustness matrix ------------------------------------------------------------------------
def robustness_matrix(base: schema.Config, rules: list[str], attacks: list[str],
                      fractions: list[float], partitions: list[str], out_dir: Path,
                      reporter=None, *, parallel: int = 1, resume: bool = True,
                      progress: bool = False) -> dict:
    """rule x attack x Byzantine fraction x partition; plus each rule's worst case over attacks.
    ``parallel``, ``resume`` and ``reporter`` as in :func:`privacy_sweep` (robustness.rows.jsonl).
    The result's ``chance``: the at-chance warning, or None."""
    from fedshield.deployment.tracking import grid_run

    cells = []
    for rule, part, frac, attack in itertools.product(rules, partitions, fractions, attacks):
        overrides: dict[str, Any] = {"aggregation.rule": rule, **_partition(part)}
        if attack == "none" or frac == 0:
            if attack != "none":
                continue  # no attacker at fraction 0: the "none" column covers it
            overrides.update({"attack.name": "none", "attack.byzantine_fraction": 0.0})
        else:
            overrides.update({"attack.name": attack, "attack.byzantine_fraction": frac})
        # the cell's own columns first; the overrides would repeat them under config names
        cells.append(make_cell(base, {"rule": rule, "partition": part, "attack": attack,
                                      "byzantine_fraction": frac if attack != "none" else 0.0},
                               overrides, out_dir))
    job = functools.partial(_cell_job, base, out_dir, 0, reporter if parallel == 1 else None)
    with grid_run(base, "robustness", out_dir,
                  {"rules": ",".join(rules), "attacks": ",".join(attacks),
                   "fractions": ",".join(f"{f:g}" for f in fractions),
                   "partitions": ",".join(partitions)}) as grid:
        rows = run_cells(cells, job, out_dir / f"robustness{ROWS_SUFFIX}", parallel=parallel,
                         resume=resume, label="robustness", progress=progress,
                         parent=grid.parent, engine=base.federation.engine)
        note = _chance(rows, base)
        write_table(rows, out_dir, "robustness", note)
        worst = worst_cases(rows)
        write_table(worst, out_dir, "worst_case", note)
        plot_heatmap(rows, out_dir / "robustness_heatmap.png")
        grid_report(out_dir)
        grid.finish(grid_files(out_dir, "robustness"))
    return {"rows": rows, "worst_case": worst, "chance": note}


def _partition(name: str) -> dict[str, Any]:
    if name == "iid":
        return {"partition.kind": "iid"}
    if name.startswith("dirichlet"):
        return {"partition.kind": "dirichlet", "partition.alpha": float(name.split("-", 1)[1])}
    if name == "shards":
        return {"partition.kind": "shards"}
    raise ConfigError(f"partition {name!r}: use iid, shards or dirichlet-<alpha>, e.g. "
                      "dirichlet-0.5")


def worst_cases(rows: list[dict]) -> list[dict]:
    """Per (rule, partition, fraction): the lowest final accuracy over attacks, and which attack."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["attack"] != "none":
            groups.setdefault((r["rule"], r["partition"], r["byzantine_fraction"]), []).append(r)
    for (rule, part, frac), rs in sorted(groups.items()):
        # a failed cell (no accuracy) is the worst case
        worst = min(rs, key=lambda r: -1.0 if r["final_accuracy"] is None else r["final_accuracy"])
        clean = [r["final_accuracy"] for r in rows
                 if r["rule"] == rule and r["partition"] == part and r["attack"] == "none"]
        out.append({"rule": rule, "partition": part, "byzantine_fraction": frac,
                    "no_attack_accuracy": clean[0] if clean else None,
                    "worst_accuracy": worst["final_accuracy"], "worst_attack": worst["attack"]})
    return out


def heatmap_cells(rows: list[dict]) -> tuple[list[str], list[str], np.ndarray]:
    """The heatmap's row labels (rule | partition), column labels (attack@fraction) and final
    accuracy in percent (NaN where no cell ran)."""
    def column(r: dict) -> str:
        return r["attack"] if r["attack"] == "none" else \
            f"{r['attack']}@{r['byzantine_fraction']:g}"

    labels_y = list(dict.fromkeys(f"{r['rule']} | {r['partition']}" for r in rows))
    labels_x = list(dict.fromkeys(column(r) for r in rows))
    grid = np.full((len(labels_y), len(labels_x)), np.nan)
    for r in rows:
        if r["final_accuracy"] is not None:
            grid[labels_y.index(f"{r['rule']} | {r['partition']}"),
                 labels_x.index(column(r))] = 100.0 * r["final_accuracy"]
    return labels_y, labels_x, grid


def plot_heatmap(rows: list[dict], path: Path) -> dict:
    """Plot final accuracy per (rule, partition) x attack as a heatmap to ``path``: cell labels
    and colour bar both in percent. Returns what was drawn (colour range, bar label, cell texts)
    so a test can check the two agree."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels_y, labels_x, grid = heatmap_cells(rows)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(labels_x), 1.0 + 0.45 * len(labels_y)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=100.0, aspect="auto")
    ax.set_xticks(range(len(labels_x)), labels_x, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels_y)), labels_y, fontsize=8)
    texts = []
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                texts.append(f"{grid[i, j]:.1f}")
                ax.text(j, i, texts[-1], ha="center", va="center", fontsize=7)
    bar = fig.colorbar(im, ax=ax, label="final test accuracy (%)")
    drawn = {"clim": im.get_clim(), "bar_label": bar.ax.get_ylabel(), "cells": texts}
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn
