"""The ``fedshield`` command line. Each command is a thin shell over a library function."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

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
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override key=value (repeatable)"),
    json_out: bool = typer.Option(False, "--json", help="print the run summary as JSON"),
) -> None:
    """Run a federated simulation on this machine and write runs/<name>-<timestamp>/."""
    from fedshield import config as fcfg

    try:
        cfg = fcfg.load(config, set_ or [])
        from server.report import ConsoleReporter
        from simulations.runner import simulate as run

        summary = run(cfg, ConsoleReporter(Console(stderr=json_out)))
    except FedShieldError as exc:
        fail(str(exc))
    if json_out:
        print(json.dumps(summary, indent=2))


from fedshield.site import site_app  # noqa: E402 (sub-command group; imports only typer/rich)

app.add_typer(site_app, name="site")


def main() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    sys.exit(app())


if __name__ == "__main__":
    main()
