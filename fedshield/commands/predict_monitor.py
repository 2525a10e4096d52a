"""``fedshield predict`` (batch predictions from a file) and ``fedshield monitor`` (a live drift
table from a serving process's ``/drift``, or a replay of a ``--window-log`` file).

The monitor draws with plain ANSI (clear screen, colour for drifting windows) and no terminal
library: it refreshes every ``--every`` seconds on a terminal, and prints one table and exits
with ``--once`` or when its output is not a terminal (a pipe, a test).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import typer

from fedshield import schema
from fedshield.errors import FedShieldError

DEFAULTS = schema.DeploymentConfig()
CLEAR = "\x1b[H\x1b[2J"
RED, YELLOW, BOLD, RESET = "\x1b[31m", "\x1b[33m", "\x1b[1m", "\x1b[0m"


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def predict_command(
    model: str = typer.Argument(..., metavar="MODEL",
                                help="A registry name (NAME = @champion, NAME@3, NAME@ALIAS), "
                                     "models:/NAME@ALIAS, a run folder or an export folder: "
                                     "whatever `fedshield serve --model` takes."),
    source: Path = typer.Argument(..., metavar="INPUT",
                                  help="INPUT.npy (rows, *input_shape) or INPUT.csv (one "
                                       "flattened example per line, optional header)."),
    output: Path = typer.Option(..., "--output", "-o",
                                help="OUT.csv: row, prediction, probability_0, ..."),
    registry_uri: str = typer.Option(None, "--registry-uri",
                                     help="MLflow registry URI (default: the run folder's config, "
                                          "else sqlite:///.fedshield/registry.db)."),
    int8: bool = typer.Option(False, "--int8", help="Use the int8-quantised ONNX model."),
    chunk_size: int = typer.Option(1024, "--chunk-size", min=1,
                                   help="Rows read, checked and predicted at a time."),
    strict_inputs: bool = typer.Option(False, "--strict-inputs",
                                       help="Refuse inputs far outside the evaluation range "
                                            "(default: a warning naming the first such row)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Predict every row of a .npy or .csv file with the checks /predict applies.

    Example: fedshield predict fedshield-digits@champion rows.csv -o predictions.csv
    Example: fedshield predict runs/digits-20261201-120000 batch.npy -o out.csv --json
    """
    from mlflow.exceptions import MlflowException

    from fedshield.deployment.batch_predict import predict_file
    from fedshield.deployment.serving import load_served_model

    try:
        served = load_served_model(model, registry_uri, int8)
        result = predict_file(served, source, output, chunk_size, strict_inputs)
    except (FedShieldError, MlflowException, OSError) as exc:
        _fail(str(exc))
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        typer.echo(f"wrote {result.rows} predictions of {result.model} version {result.version} "
                   f"to {result.output} in {result.seconds:.2f} s")


@dataclass
class DriftView:
    """What one screen of the monitor shows."""
    title: str
    policy: str
    counts: str
    rows: list[list[str]] = field(default_factory=list)
    states: list[str] = field(default_factory=list)  # ok / drift / trigger, for the colours
    footer: list[str] = field(default_factory=list)


COLUMNS = ("window", "examples", "{stat}", "ks_max", "js_mean", "pred_psi", "state",
           "drifted features")


def _row(report: dict, statistic: str, threshold: float, state: str) -> list[str]:
    scores = report.get("scores", {})
    top = [f"{n} ({float(v):.2f})" for n, v in scores.get("top_features", [])
           if float(v) > threshold][:3] if state != "ok" else []  # a clean window drifts nowhere

    def num(key: str) -> str:
        value = scores.get(key)
        return f"{float(value):.4f}" if isinstance(value, int | float) else "-"
    return [str(report.get("index", "?")), str(report.get("examples", "?")), num(statistic),
            num("ks_max"), num("js_mean"), num("prediction_psi"), state, ", ".join(top) or "-"]


def server_state(report: dict, patience: int) -> str:
    """The state the server recorded for a window: ok, DRIFT k/p, TRIGGER, suppressed."""
    note = str(report.get("note", ""))
    if note.startswith("retraining triggered"):
        return "TRIGGER"
    if note.startswith("retraining trigger suppressed"):
        return "suppressed"
    if "no privacy budget" in note:
        return "no budget"
    if report.get("over_threshold"):
        return f"DRIFT {report.get('streak', 0)}/{patience}"
    return "ok"


def view_from_server(url: str, state: dict) -> DriftView:
    """A screen from ``GET /drift``'s answer."""
    title = f"fedshield monitor  {state.get('model')} version {state.get('version')}  {url}"
    if not state.get("monitoring"):
        return DriftView(title, "drift monitoring is off", str(state.get("reason", "")))
    stat, threshold, patience = state["statistic"], state["threshold"], state["patience"]
    view = DriftView(title, f"{stat} > {threshold:g} in {patience} windows in a row triggers "
                            f"retraining (cooldown {state.get('cooldown_s', 0):g} s)",
                     f"windows scored {state['windows']}, next window {state['buffered']}/"
                     f"{state['window']} examples; triggers fired {state['triggers']}, "
                     f"suppressed {state['suppressed']}")
    for report in state.get("recent", []):
        label = server_state(report, patience)
        view.rows.append(_row(report, stat, threshold, label))
        view.states.append("trigger" if label == "TRIGGER" else
                           "drift" if label != "ok" else "ok")
    if not view.rows:
        view.footer.append(f"no full window yet: {state['buffered']} of {state['window']} "
                           "examples served")
    return view


def view_from_log(path: Path, statistic: str, threshold: float, patience: int) -> DriftView:
    """A screen replaying a window log under the given trigger policy."""
    from fedshield.deployment.drift import replay_windows

    try:
        reports = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        triggers = replay_windows(reports, statistic, threshold, patience)
    except (ValueError, KeyError, TypeError) as exc:
        raise FedShieldError(f"{path} is not a window log written by serve --window-log "
                             f"({type(exc).__name__}: {exc})") from None
    fired = {t.windows[-1] for t in triggers}
    view = DriftView(f"fedshield monitor  {path}",
                     f"{statistic} > {threshold:g} in {patience} windows in a row triggers "
                     "retraining (replayed)",
                     f"windows {len(reports)}; triggers {len(triggers)}")
    for report in reports:
        over = float(report["scores"][statistic]) > threshold
        label = "TRIGGER" if report["index"] in fired else "DRIFT" if over else "ok"
        view.rows.append(_row(report, statistic, threshold, label))
        view.states.append("trigger" if label == "TRIGGER" else "drift" if over else "ok")
    view.footer += [f"retrain trigger windows {t.windows}: {t.reason}" for t in triggers]
    if not triggers:
        view.footer.append("no retraining trigger")
    return view


def render(view: DriftView, statistic: str, color: bool, clock: str = "") -> str:
    """The screen as text: a title, the policy, a fixed-width table, the footer."""
    header = [c.format(stat=statistic) for c in COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in view.rows)) if view.rows else len(h)
              for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    paint = {"ok": "", "drift": YELLOW, "trigger": RED + BOLD}
    lines = [(BOLD if color else "") + view.title + (RESET if color else ""),
             view.policy + (f"  ({clock})" if clock else ""), view.counts, "", line(header)]
    for cells, state in zip(view.rows, view.states, strict=True):
        text = line(cells)
        lines.append(paint[state] + text + RESET if color and paint[state] else text)
    lines += ["", *view.footer] if view.footer else []
    return "\n".join(lines) + "\n"


def fetch_drift(url: str, token: str | None) -> dict:
    """``GET URL/drift``, or FedShieldError saying why not."""
    import httpx

    base = url.rstrip("/")
    base = base[: -len("/drift")] if base.endswith("/drift") else base
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(base + "/drift", headers=headers, timeout=10.0)
    except httpx.HTTPError as exc:
        raise FedShieldError(f"cannot reach {base}/drift ({exc}); is `fedshield serve` running "
                             "there?") from None
    if response.status_code == 401:
        raise FedShieldError(f"{base} wants a bearer token: pass --token or set "
                             "FEDSHIELD_SERVE_TOKEN")
    if response.status_code != 200:
        raise FedShieldError(f"{base}/drift answered {response.status_code}: "
                             f"{response.text[:200]}; is this a fedshield serve process?")
    return response.json()


def monitor_command(
    source: str = typer.Argument(..., help="A server URL (reads its /drift) or a drift-window "
                                           "JSONL (serve --window-log)."),
    statistic: str = typer.Option("psi_mean", "--statistic",
                                  help="Score the trigger watches (window logs; a URL shows the "
                                       "server's own policy)."),
    threshold: float = typer.Option(DEFAULTS.drift_threshold, "--threshold",
                                    help="Drift when the statistic exceeds this (window logs)."),
    patience: int = typer.Option(DEFAULTS.drift_patience, "--patience",
                                 help="Consecutive drifting windows before retraining (window "
                                      "logs)."),
    token: str = typer.Option(None, "--token", envvar="FEDSHIELD_SERVE_TOKEN"),
    every: float = typer.Option(5.0, "--every", min=0.5, help="Seconds between refreshes."),
    once: bool = typer.Option(False, "--once",
                              help="Print one table and exit (also when output is not a "
                                   "terminal)."),
    as_json: bool = typer.Option(False, "--json", help="Print the data as JSON once."),
) -> None:
    """Show a live drift table: per window the scores, state and drifted features.

    Example: fedshield monitor http://127.0.0.1:8080 --every 2
    Example: fedshield monitor runs/served-windows.jsonl --threshold 0.2 --patience 3 --once
    """
    from fedshield.deployment.drift import STATISTICS

    if statistic not in STATISTICS:
        _fail(f"--statistic must be one of {', '.join(STATISTICS)}")
    remote = source.startswith(("http://", "https://"))
    path = Path(source)
    if not remote and not path.is_file():
        _fail(f"{path} does not exist; pass a server URL (http://127.0.0.1:8080) or the file "
              "of serve --window-log")
    tty = sys.stdout.isatty()
    live = tty and not once and not as_json
    color = tty and "NO_COLOR" not in os.environ

    def screen() -> tuple[str, dict | None]:
        if remote:
            state = fetch_drift(source, token)
            view = view_from_server(source, state)
            return render(view, state.get("statistic", statistic), color,
                          time.strftime("%H:%M:%S")), state
        view = view_from_log(path, statistic, threshold, patience)
        return render(view, statistic, color, time.strftime("%H:%M:%S")), None

    if as_json:
        try:
            if remote:
                typer.echo(json.dumps(fetch_drift(source, token)))
                return
            from fedshield.deployment.drift import replay_windows

            reports = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            triggers = replay_windows(reports, statistic, threshold, patience)
            typer.echo(json.dumps({"windows": reports,
                                   "triggers": [t.to_dict() for t in triggers]}))
        except (FedShieldError, ValueError, KeyError, TypeError) as exc:
            _fail(str(exc))
        return
    if not live:
        try:
            typer.echo(screen()[0], nl=False)
        except FedShieldError as exc:
            _fail(str(exc))
        return
    try:
        while True:
            try:
                text = screen()[0]
            except FedShieldError as exc:  # a restarting server: keep watching
                text = f"{RED}{exc}{RESET}\nretrying in {every:g} s\n"
            sys.stdout.write(CLEAR + text)
            sys.stdout.flush()
            time.sleep(every)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
