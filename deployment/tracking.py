"""Every run tracked in MLflow, after it ends, from its typed records.

The post-run hook :func:`track_run` (registered by deployment/hooks.py, run after the hand-off
and the HTML report: server/hooks.py ``POST_RUN_ORDER``) reads the run folder's records
(``read_metrics``, ``read_summary``) and logs one MLflow run:

- params: the resolved config, flattened (``train.lr``), values cut to :data:`PARAM_LIMIT`;
- metrics per round (step = round, timestamp = when the round was recorded): server accuracy and
  loss, epsilon max/mean (their unit is the tag ``epsilon.unit``), sampled/accepted/rejected/
  refused/quarantined counts, seconds, and the federated evaluation's distribution when it ran;
- final metrics (no step): final/best accuracy, wall time, rejections, the attack report's true
  and false quarantine rates;
- artifacts: the run folder's summary, metrics, config, plots, model card, audit and report.

The store is ``tracking.uri``, by default the registry's (``deployment.registry_uri``): when the
hand-off registered a version, its run (the one ``create_model_version`` links to) is the run
tracked here, so a version's run shows the whole training. Grids (simulations/sweeps.py) open a
parent run with :func:`grid_run`; the runs of their cells are its children
(``mlflow.parentRunId``).

Tracking never fails a run: a failure (no MLflow, a locked or unreachable store) is warned about
once per process, saying what to do, and the run's results stay in its folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedshield.privacy.accounting import SAMPLE_LEVEL, USER_LEVEL

from fedshield.run_records import (
    METRICS_FILE,
    SUMMARY_FILE,
    MetricsLine,
    RunSummary,
    read_metrics,
    read_summary,
)
from fedshield.schema import Config

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

log = logging.getLogger("flwr")  # Flower's console logger: the warning shows where the run logs

# Values longer than this are cut: 500 is the limit of MLflow servers before 2.x (6000 since),
# and a user may point tracking.uri at one; the marker says the value is not the whole config.
PARAM_LIMIT = 500
TRUNCATED = "...[truncated]"
# MLflow's batch limits (mlflow.utils.validation): 100 params/tags, 1000 metrics per log_batch.
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000
# The run folder's files logged as artifacts, when present (report.html: deployment/html_report).
RUN_FILES = (SUMMARY_FILE, METRICS_FILE, "config.toml", "audit.json", "report.html",
             "handoff.json")
CARD_FILES = ("model_card.md", "model_card.json", "attributions.png")  # export/ (the card)
EXPORT_DIR = "export"
PARENT_TAG = "mlflow.parentRunId"

NO_MLFLOW = ("MLflow is not installed, so runs are not tracked; install it with "
             "`pip install 'fedshield[deploy]'`, or set tracking.enabled = false")

_parents: list[tuple[str, str]] = []  # (store uri, run id) of the open grid runs, innermost last
_warned: set[str] = set()  # failures already warned about in this process


@dataclass(frozen=True)
class TrackedRun:
    """An MLflow run fedshield logged to: its id, the store, and the experiment."""

    run_id: str
    uri: str
    experiment_id: str

    def to_dict(self) -> dict[str, str]:
        """What the run summary records under ``tracking``."""
        return {"run_id": self.run_id, "uri": self.uri, "experiment_id": self.experiment_id}


# --- what is logged: pure functions of the records ----------------------------------------------
def truncate(value: Any, limit: int = PARAM_LIMIT) -> str:
    """``value`` as a param string, cut to ``limit`` characters with a marker when longer."""
    text = str(value)
    return text if len(text) <= limit else text[:limit - len(TRUNCATED)] + TRUNCATED


def config_params(cfg: Config) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, values as strings (cut if long)."""
    return {key: truncate(value) for key, value in sorted(cfg.flat().items())}


def round_values(line: MetricsLine) -> dict[str, float]:
    """One round's metrics, by MLflow key (absent when the round did not record them)."""
    values: dict[str, float | None] = {
        "accuracy": line.accuracy, "loss": line.loss, "client_accuracy": line.client_accuracy,
        "train_loss": line.train_loss, "epsilon_max": line.epsilon_max,
        "epsilon_mean": line.epsilon_mean, "central_epsilon": line.central_epsilon,
        "sampled": line.sampled, "accepted": line.accepted, "rejected": len(line.rejected),
        "refused": len(line.refused), "quarantined": len(line.quarantined),
        "newly_quarantined": len(line.newly_quarantined), "seconds": line.seconds}
    if (ev := line.evaluation) is not None:
        values.update({"eval_mean": ev.mean, "eval_worst": ev.worst,
                       "eval_worst_decile": ev.worst_decile, "eval_spread": ev.spread,
                       "eval_clients": len(ev.accuracy)})
    return {k: float(v) for k, v in values.items() if v is not None}


def round_times(lines: list[MetricsLine], end: float) -> list[float]:
    """Each round's unix time: the recorded ``timestamp``, else (lines from before the field)
    ``end`` minus the seconds of the rounds after it."""
    out, later = [], 0.0
    for line in reversed(lines):
        out.append(line.timestamp if line.timestamp is not None else end - later)
        later += line.seconds or 0.0
    return out[::-1]


def round_metrics(lines: list[MetricsLine], end: float) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp in ms, step = round) for every round's metrics."""
    return [(key, value, int(t * 1000), line.round)
            for line, t in zip(lines, round_times(lines, end), strict=True)
            for key, value in round_values(line).items()]


def summary_values(summary: RunSummary) -> dict[str, float]:
    """The run's final numbers (logged once, without a step)."""
    robustness, attack = summary.robustness, summary.attack_report
    values: dict[str, float | None] = {
        "final_accuracy": summary.final_accuracy, "best_accuracy": summary.best_accuracy,
        "best_round": summary.best.round if summary.best else None,
        "rounds_completed": summary.rounds_completed, "wall_seconds": summary.wall_seconds,
        "final_epsilon_max": summary.privacy.epsilon_max,
        "final_epsilon_mean": summary.privacy.epsilon_mean,
        "rejected_total": robustness.rejected_total if robustness else None,
        "refused_total": robustness.refused_total if robustness else None,
        "quarantined_total": len(robustness.quarantined) if robustness else None}
    if attack is not None:
        values.update({"true_quarantine_rate": attack.detection_rate,
                       "false_quarantine_rate": attack.false_quarantine_rate,
                       "backdoor_success": attack.backdoor_success})
    return {k: float(v) for k, v in values.items() if v is not None}


def run_tags(summary: RunSummary, run_dir: Path) -> dict[str, str]:
    """What the run is, as tags: name, folder, status, task, rule, attack, the epsilon's unit."""
    privacy = summary.privacy
    attack = summary.attack
    tags = {"mlflow.runName": summary.name or run_dir.name,
            "fedshield.run_dir": str(run_dir.resolve()),
            "fedshield.status": summary.status or "completed",
            "fedshield.task": summary.task or "", "fedshield.rule": summary.strategy or "",
            "fedshield.attack": str(attack.get("name", "none") if isinstance(attack, Mapping)
                                    else attack or "none"),
            # what epsilon_max / epsilon_mean measure (central_epsilon: user-level)
            "epsilon.unit": f"{SAMPLE_LEVEL}, per client" if privacy.enabled else "no DP",
            "central_epsilon.unit": USER_LEVEL if privacy.central_dp else "no central DP"}
    if privacy.enabled:
        tags.update({"epsilon.delta": f"{privacy.delta:g}" if privacy.delta else "",
                     "epsilon.accountant": privacy.accountant or ""})
    if privacy.label:
        tags["epsilon.label"] = privacy.label
    if summary.failure:
        tags["fedshield.failure"] = truncate(summary.failure, 5000)
    if summary.handoff and summary.handoff.version:
        tags["fedshield.registered_model"] = f"{summary.handoff.model_name}/" \
                                             f"{summary.handoff.version}"
    return tags


def run_artifacts(run_dir: Path) -> list[tuple[Path, str | None]]:
    """(file, artifact folder) for every file of the run folder that is logged, when present."""
    files: list[tuple[Path, str | None]] = [(run_dir / n, None) for n in RUN_FILES]
    files += [(p, None) for p in sorted(run_dir.glob("*.png"))]
    files += [(run_dir / EXPORT_DIR / n, EXPORT_DIR) for n in CARD_FILES]
    return [(p, where) for p, where in files if p.is_file()]


# --- logging to MLflow ----------------------------------------------------------------------------
def tracking_uri(cfg: Config) -> str:
    """``tracking.uri``, or the registry's store when it is "" (sqlite paths made absolute)."""
    from fedshield.deployment.mlflow_store import normalise_uri

    return normalise_uri(cfg.tracking.uri or cfg.deployment.registry_uri)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _log(client, run_id: str, params: Mapping[str, str] | None = None,
         metrics: list[tuple[str, float, int, int]] | None = None,
         tags: Mapping[str, str] | None = None) -> None:
    """log_batch within MLflow's per-call limits."""
    from mlflow.entities import Metric, Param, RunTag

    p = [Param(k, v) for k, v in (params or {}).items()]
    t = [RunTag(k, v) for k, v in (tags or {}).items()]
    for i in range(0, len(p), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=p[i:i + PARAMS_PER_BATCH])
    for i in range(0, len(t), PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=t[i:i + PARAMS_PER_BATCH])
    m = [Metric(k, v, ts, step) for k, v, ts, step in metrics or ()]
    for i in range(0, len(m), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=m[i:i + METRICS_PER_BATCH])


def _warn_once(what: str, exc: BaseException, uri: str, run_dir: Path | None) -> dict:
    key = f"{what}:{type(exc).__name__}:{uri}"
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if key not in _warned:
        _warned.add(key)
        kept = f"; the results are in {run_dir}" if run_dir else ""
        log.warning("MLflow tracking of %s failed (%s)%s. Check that %s is reachable and not "
                    "locked by another process (or point tracking.uri elsewhere); set "
                    "tracking.enabled = false to stop tracking", what, reason, kept, uri)
    return {"error": reason, "uri": uri}


def _registered_run(client, summary: RunSummary, uri: str, cfg: Config) -> str | None:
    """The run the hand-off's registered version links to, when it is in this store."""
    from fedshield.deployment.mlflow_store import normalise_uri

    handoff = summary.handoff
    if not (handoff and handoff.version and handoff.model_name) or \
            normalise_uri(cfg.deployment.registry_uri) != uri:
        return None
    return client.get_model_version(handoff.model_name, handoff.version).run_id


def log_run(run_dir: Path, cfg: Config, parent: str | None = None) -> TrackedRun:
    """Log a finished run folder to ``cfg``'s tracking store (raises on a store failure)."""
    from fedshield.deployment.mlflow_store import experiment_id

    run_dir = Path(run_dir)
    summary, lines = read_summary(run_dir), read_metrics(run_dir)
    uri = tracking_uri(cfg)
    client = _client(uri)
    metrics_file = run_dir / METRICS_FILE
    end = metrics_file.stat().st_mtime if metrics_file.is_file() else time.time()
    run_id = _registered_run(client, summary, uri, cfg)
    if run_id is None:
        exp = experiment_id(client, cfg.tracking.experiment, uri)
        start = end - (summary.wall_seconds or 0.0)
        run_id = client.create_run(exp, start_time=int(start * 1000)).info.run_id
        known: set[str] = set()
    else:  # params are write-once: keep what the registration logged
        run = client.get_run(run_id)
        exp, known = run.info.experiment_id, set(run.data.params)
    tags = run_tags(summary, run_dir)
    if parent:
        tags[PARENT_TAG] = parent
    now = int(time.time() * 1000)
    final = [(k, v, now, 0) for k, v in summary_values(summary).items()]
    params = {k: v for k, v in config_params(cfg).items() if k not in known}
    _log(client, run_id, params, round_metrics(lines, end) + final, tags)
    for path, where in run_artifacts(run_dir):
        client.log_artifact(run_id, str(path), where)
    client.set_terminated(run_id, "FAILED" if summary.failed else "FINISHED")
    return TrackedRun(run_id, uri, exp)


def mlflow_installed() -> bool:
    """Whether MLflow can be imported here (a base install has no ``[deploy]`` extra)."""
    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):  # a blocked or half-installed module
        return False


def current_parent(uri: str) -> str | None:
    """The innermost open grid run on store ``uri`` (cells of a grid are its children)."""
    return next((run for store, run in reversed(_parents) if store == uri), None)


def adopt_parent(uri: str, run_id: str) -> None:
    """In a grid's cell process (simulations/grid_cells.py): runs tracked here become children
    of the grid's open run ``run_id`` on store ``uri`` (a spawned process starts with none)."""
    _parents.append((uri, run_id))


def track_run(run_dir: Path, cfg: Config) -> dict:
    """The post-run hook: log the run (a grid's cell as a child of the grid's run); the summary's
    ``tracking`` entry. Never raises: a failure warns once and is recorded instead."""
    if not cfg.tracking.enabled:
        return {}
    uri = cfg.tracking.uri or cfg.deployment.registry_uri
    if not mlflow_installed():
        if NO_MLFLOW not in _warned:
            _warned.add(NO_MLFLOW)
            log.warning("tracking skipped: %s", NO_MLFLOW)
        return {"skipped": NO_MLFLOW}
    try:
        uri = tracking_uri(cfg)
        return log_run(run_dir, cfg, current_parent(uri)).to_dict()
    except Exception as exc:  # noqa: BLE001 — tracking must never fail the run
        return _warn_once(f"run {Path(run_dir).name}", exc, uri, run_dir)


def log_outcome(tracked: Mapping[str, Any] | None, summary: RunSummary, run_dir: Path) -> None:
    """Add what was known only after the ServerApp ended (the attack report) to a tracked run:
    its final metrics and the rewritten summary.json. Never raises."""
    if not tracked or "run_id" not in tracked:
        return
    uri = str(tracked.get("uri", ""))
    try:
        client = _client(uri)
        now = int(time.time() * 1000)
        _log(client, tracked["run_id"],
             metrics=[(k, v, now, 0) for k, v in summary_values(summary).items()])
        if (Path(run_dir) / SUMMARY_FILE).is_file():
            client.log_artifact(tracked["run_id"], str(Path(run_dir) / SUMMARY_FILE))
    except Exception as exc:  # noqa: BLE001 — tracking must never fail the run
        _warn_once(f"run {Path(run_dir).name}", exc, uri, Path(run_dir))


class GridRun:
    """A grid's open MLflow run (``run_id`` None when tracking is off or failed)."""

    def __init__(self, cfg: Config, kind: str, out_dir: Path, params: Mapping[str, Any]) -> None:
        self.run_id: str | None = None
        self.uri = cfg.tracking.uri or cfg.deployment.registry_uri
        self.out_dir = out_dir
        if not cfg.tracking.enabled:
            return
        try:
            from fedshield.deployment.mlflow_store import experiment_id

            self.uri = tracking_uri(cfg)
            self.client = _client(self.uri)
            exp = experiment_id(self.client, cfg.tracking.experiment, self.uri)
            tags = {"mlflow.runName": f"{kind}: {out_dir.name}", "fedshield.grid": kind,
                    "fedshield.run_dir": str(out_dir.resolve())}
            if parent := current_parent(self.uri):
                tags[PARENT_TAG] = parent
            self.run_id = self.client.create_run(exp, tags=tags).info.run_id
            base = {f"base.{k}": v for k, v in config_params(cfg).items()}
            _log(self.client, self.run_id, {**base, **{k: truncate(v)
                                                       for k, v in params.items()}})
        except Exception as exc:  # noqa: BLE001 — tracking must never fail the grid
            _warn_once(f"grid {out_dir.name}", exc, self.uri, out_dir)
            self.run_id = None

    @property
    def parent(self) -> tuple[str, str] | None:
        """(store uri, run id) for the grid's cell processes (``adopt_parent``), None untracked."""
        return (self.uri, self.run_id) if self.run_id is not None else None

    def finish(self, files: list[Path], failed: bool = False) -> None:
        """Log the grid's tables and plots and close the run."""
        if self.run_id is None:
            return
        try:
            for path in files:
                if path.is_file():
                    self.client.log_artifact(self.run_id, str(path))
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
        except Exception as exc:  # noqa: BLE001 — tracking must never fail the grid
            _warn_once(f"grid {self.out_dir.name}", exc, self.uri, self.out_dir)


@contextlib.contextmanager
def grid_run(cfg: Config, kind: str, out_dir: Path,
             params: Mapping[str, Any]) -> Iterator[GridRun]:
    """An MLflow run for a grid; runs tracked inside the block become its children. Call
    ``finish(files)`` with the grid's outputs; an exception closes the run as FAILED."""
    grid = GridRun(cfg, kind, out_dir, params)
    if grid.run_id is not None:
        _parents.append((grid.uri, grid.run_id))
    try:
        yield grid
    except BaseException:
        grid.finish([], failed=True)
        raise
    finally:
        if grid.run_id is not None:
            _parents.remove((grid.uri, grid.run_id))
