"""``fedshield report RUN_DIR``: (re)build a run's or a grid's self-contained report.html.

Runs and grids write theirs when they end (deployment/html_report.py, through the post-run hook
and the sweeps); this command rebuilds one, e.g. after ``fedshield privacy audit --run-dir`` added
an audit, or for a run folder written before reports existed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from fedshield.deployment.html_report import is_grid, write_grid_report, write_report
from fedshield.errors import FedShieldError
from fedshield.run_records import METRICS_FILE, SUMMARY_FILE

_err = Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> NoReturn:
    _err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def report_command(
    run_dir: str = typer.Argument(..., help="a run folder (runs/<name>-<timestamp>) or a grid's "
                                            "--out folder (runs/robustness, runs/privacy-sweep)"),
    json_out: bool = typer.Option(False, "--json", help="print {\"path\": ..., \"kind\": ...}"),
) -> None:
    """Write RUN_DIR/report.html: one page with the run's accuracy, privacy spent per client,
    client timeline, federated evaluation, model card and audit (or a grid's heatmap and
    worst cases, or privacy-utility curve). Opens offline; nothing is fetched."""
    folder = Path(run_dir)
    if not folder.is_dir():
        _fail(f"{folder} is not a folder: pass a run folder (runs/<name>-<timestamp>) or a "
              "grid's --out folder")
    grid = is_grid(folder)
    if not grid and not (folder / SUMMARY_FILE).is_file() \
            and not (folder / METRICS_FILE).is_file():
        _fail(f"{folder} holds neither summary.json/metrics.jsonl (a run) nor a grid table "
              "(robustness.json, privacy_sweep.json): point at a run or grid folder")
    try:
        path = write_grid_report(folder) if grid else write_report(folder)
    except (FedShieldError, OSError) as exc:
        _fail(f"could not write the report: {exc}")
    if json_out:
        print(json.dumps({"path": str(path), "kind": "grid" if grid else "run"}))
    else:
        Console().print(f"report written: {path}")
