"""Typer commands the ``fedshield`` CLI mounts: ``registry list|show|promote``, ``serve``,
``monitor`` and ``predict`` (the last two live in predict_monitor.py; orchestration layer: they
drive deployment/, which never imports them).

Mount with ``app.add_typer(registry_app, name="registry")``, ``app.command("serve")(serve_command)``
and the like; ``python -m fedshield.commands.deploy`` runs them alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedshield import schema, validation
from fedshield.commands.predict_monitor import monitor_command, predict_command
from fedshield.errors import FedShieldError

__all__ = ["monitor_command", "predict_command", "registry_app", "serve_command"]

DEFAULTS = schema.DeploymentConfig()
DEFAULT_URI = DEFAULTS.registry_uri
console = Console()

registry_app = typer.Typer(help="Model registry (MLflow, local sqlite): list, show and promote "
                                "versions.",
                           no_args_is_help=True)

ModelName = typer.Option(..., "--model-name", "-m",
                         help="Registered model name, e.g. fedshield-digits.")
RegistryUri = typer.Option(DEFAULT_URI, "--registry-uri", help="MLflow tracking/registry URI.")
AsJson = typer.Option(False, "--json", help="Print JSON for scripts.")


def _registry_failures() -> tuple[type[Exception], ...]:
    """Ours, and what a corrupt or foreign registry raises from inside MLflow: reported, not a
    traceback (one tuple: mypy can't type an ``except (A, *rest)``)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return FedShieldError, MlflowException, SQLAlchemyError, ValueError


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(1)


def _policy(config_path: Path | None) -> schema.DeploymentConfig | None:
    """An explicit extra policy, or None: then the policy stored with the version applies alone."""
    return validation.load(config_path).deployment if config_path else None


@registry_app.command("list")
def registry_list(model_name: str = ModelName, registry_uri: str = RegistryUri,
                  as_json: bool = AsJson) -> None:
    """List a model's versions with aliases and gate results.

    Example: fedshield registry list -m fedshield-digits
    """
    from fedshield.deployment.registry import list_versions

    try:
        rows = list_versions(registry_uri, model_name)
    except _registry_failures() as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{model_name} ({registry_uri})")
    for col in ("version", "aliases", "gate", "test_accuracy", "epsilon_max", "created"):
        table.add_column(col)
    for r in rows:
        eps = str(r["epsilon_max"])
        eps = f"[bold red]{eps}[/bold red]" if r.get("warning") else eps
        table.add_row(r["version"], ",".join(r["aliases"]), r["gate"], str(r["test_accuracy"]),
                      eps, r["created"])
    console.print(table)
    for r in rows:
        if r.get("warning"):
            console.print(f"[bold red]version {r['version']}: {r['warning']}[/bold red]")


@registry_app.command("show")
def registry_show(version: str = typer.Argument(..., help="Version number."),
                  model_name: str = ModelName,
                  registry_uri: str = RegistryUri) -> None:
    """Show a version's aliases, tags (hashes, gate reasons) and export record as JSON.

    Example: fedshield registry show 3 -m fedshield-digits
    """
    from fedshield.deployment.registry import show

    try:
        typer.echo(json.dumps(show(registry_uri, model_name, version), indent=2))
    except _registry_failures() as exc:
        _fail(exc)


@registry_app.command("promote")
def registry_promote(version: str = typer.Argument(..., help="Version number."),
                     model_name: str = ModelName,
                     registry_uri: str = RegistryUri,
                     config: Path = typer.Option(
                         None, "--config", "-c", help="TOML whose \\[deployment] table adds checks "
                         "to the policy stored with the version (it can tighten, never loosen "
                         "it)."),
                     force: bool = typer.Option(False, "--force",
                                                help="Promote despite policy failures "
                                                "(never despite a hash mismatch, a failed run or "
                                                "reproducible noise); needs --reason."),
                     reason: str = typer.Option(
                         "", "--reason", help="Why --force is used; recorded with who and when as "
                         "gate.forced.* tags."),
                     as_json: bool = AsJson) -> None:
    """Re-run the promotion gate on a version with the policy stored at registration; champion if
    it passes (or --force --reason).

    Example: fedshield registry promote 3 -m fedshield-digits
    Example: fedshield registry promote 3 -m fedshield-digits --force --reason "hotfix, see #42"
    """
    from fedshield.deployment.gate import promote

    try:
        decision = promote(registry_uri, model_name, version, _policy(config), force, reason)
    except _registry_failures() as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(decision.to_dict(), indent=2))
    else:
        console.print(f"policy ({decision.policy_source}): {decision.policy}")
        for check in decision.checks:
            mark = "[green]pass[/green]" if check["passed"] else "[red]FAIL[/red]"
            console.print(f"{mark} {check['name']}: {check['detail']}")
        status = ("champion" + (" (forced)" if decision.forced else "")
                  if decision.passed or decision.forced else "candidate")
        console.print(f"version {version} -> [bold]{status}[/bold]")
    if not (decision.passed or decision.forced):
        raise typer.Exit(2)


def serve_command(
    model: str = typer.Option(..., "--model",
                              help="models:/NAME@champion, models:/NAME/VERSION or a run folder."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Bind address; non-loopback needs --token."),
    port: int = typer.Option(8080, "--port"),
    token: str = typer.Option(None, "--token", envvar="FEDSHIELD_SERVE_TOKEN",
                              help="Bearer token clients must send (prefer the environment "
                                   "variable)."),
    registry_uri: str = typer.Option(None, "--registry-uri",
                                     help="MLflow registry URI (default: the run "
                                     f"folder's config, else {DEFAULT_URI})."),
    int8: bool = typer.Option(False, "--int8", help="Serve the int8-quantised ONNX model."),
    max_batch: int = typer.Option(1024, "--max-batch", help="Most examples per /predict request."),
    window_log: Path = typer.Option(None, "--window-log",
                                    help="Append drift windows here (JSONL) for `monitor`."),
    drift_window: int = typer.Option(DEFAULTS.drift_window, "--drift-window",
                                     help="Examples per drift window."),
    drift_threshold: float = typer.Option(DEFAULTS.drift_threshold, "--drift-threshold",
                                          help="PSI threshold."),
    drift_patience: int = typer.Option(DEFAULTS.drift_patience, "--drift-patience",
                                       help="Drifting windows in a row before a retraining "
                                            "trigger."),
    retrain_config: str = typer.Option(None, "--retrain-config",
                                       help="On a retraining trigger, fine-tune from this model "
                                            "with this federation config (fedshield simulate)."),
    retrain_rounds: int = typer.Option(3, "--retrain-rounds",
                                       help="Rounds of the fine-tuning run."),
    body_timeout: float = typer.Option(10.0, "--body-timeout", min=0.1,
                                       help="Seconds a request body may take (then 408)."),
    strict_inputs: bool = typer.Option(False, "--strict-inputs",
                                       help="Refuse (422) inputs far outside the evaluation range "
                                            "instead of answering with a warning header."),
    retrain_cooldown: float = typer.Option(3600.0, "--retrain-cooldown", min=0.0,
                                           help="Seconds after a retraining trigger during which "
                                                "further triggers are logged but suppressed."),
    log_level: str = typer.Option("info", "--log-level",
                                  help="debug, info (start-up, access and drift lines), warning "
                                       "(drift and triggers only) or error."),
    log_format: str = typer.Option("json", "--log-format",
                                   help="json (one object per line) or text."),
) -> None:
    """Serve a model over HTTP (FastAPI + onnxruntime): /predict /explain /drift /metadata
    /metrics /health, API docs at /docs.

    Example: FEDSHIELD_SERVE_TOKEN=... fedshield serve --model models:/fedshield-digits@champion
    --port 8080
    """
    from fedshield.deployment.serving import serve
    from fedshield.deployment.serving_logs import FORMATS, LEVELS

    if log_level.lower() not in LEVELS or log_format not in FORMATS:
        _fail(ValueError(f"--log-level must be one of {', '.join(LEVELS)} and --log-format one "
                         f"of {', '.join(FORMATS)}"))
    on_trigger = None
    if retrain_config:
        from fedshield.deployment.retrain import launch_retraining

        def on_trigger(trigger):  # the fine-tuning run goes through the same hand-off and gate
            launch_retraining(trigger, retrain_config, model, registry_uri or DEFAULT_URI,
                              retrain_rounds, Path("runs") / "retrain")  # logs its start
    try:
        serve(model, host, port, token, log_level=log_level, log_format=log_format,
              tracking_uri=registry_uri, quantized=int8, max_batch=max_batch,
              window_log=window_log, drift_window=drift_window, drift_threshold=drift_threshold,
              drift_patience=drift_patience, on_trigger=on_trigger, body_timeout=body_timeout,
              strict_inputs=strict_inputs, trigger_cooldown=retrain_cooldown)
    except _registry_failures() as exc:
        _fail(exc)


app = typer.Typer(help="fedshield deployment commands.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
app.command("serve")(serve_command)
app.command("monitor")(monitor_command)
app.command("predict")(predict_command)

if __name__ == "__main__":
    app()
