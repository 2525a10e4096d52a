"""MLflow as the model registry: a local sqlite store (no server), artifacts beside the database.

A registered version's artifacts are ``model/`` (the export folder: weights, ONNX, card, drift
reference) and ``run/`` (summary.json, metrics.jsonl, config.toml). Its tags hold the sha256 of
every model artifact (``sha256.<file>``): serving and the gate compare downloaded files against them.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from deployment.artifacts import EXPORT_JSON, read_json, verify  # noqa: E402
from deployment.card import ModelCard, read_run  # noqa: E402
from deployment.export import ExportResult  # noqa: E402
from fedshield.config import flatten  # noqa: E402
from fedshield.errors import ConfigError, FedShieldError  # noqa: E402

EXPERIMENT = "fedshield"
HASH_TAG = "sha256."
MODEL_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


class RegistryError(FedShieldError):
    """The registry has no such model, version or alias."""


def normalise_uri(tracking_uri: str) -> str:
    """Make a relative ``sqlite:///`` path absolute and create its folder."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):]).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return tracking_uri


def artifact_root(tracking_uri: str) -> str | None:
    """``<db folder>/registry-artifacts`` for sqlite stores; the server's default otherwise."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri[len("sqlite:///"):]).parent / "registry-artifacts")
    return None


def client_for(tracking_uri: str) -> MlflowClient:
    uri = normalise_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client: MlflowClient, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(EXPERIMENT, artifact_location=artifact_root(normalise_uri(tracking_uri)))


def _params(config: dict) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in sorted(flatten(config).items())]


def _metrics(rounds: list[dict], export: ExportResult) -> list[Metric]:
    now = int(time.time() * 1000)
    out = []
    for r in rounds:
        for key in ("accuracy", "loss", "epsilon_max", "epsilon_mean", "seconds"):
            if isinstance(r.get(key), (int, float)):
                out.append(Metric(f"round_{key}", float(r[key]), now, int(r.get("round", 0))))
    out += [Metric("test_onnx_accuracy", export.parity["onnx_accuracy"], now, 0),
            Metric("onnx_parity_max_abs_diff", export.parity["max_abs_diff"], now, 0)]
    if export.int8:
        out.append(Metric("test_int8_accuracy", export.int8["accuracy"], now, 0))
    return out


def register(run_dir: str | Path, export: ExportResult, card: ModelCard, tracking_uri: str,
             model_name: str) -> str:
    """Log the run (params, metrics, card, artifacts) and register a new version; returns it."""
    client = client_for(tracking_uri)
    summary, config, rounds = read_run(run_dir)
    run = client.create_run(_experiment_id(client, tracking_uri), run_name=summary.get("name"),
                            tags={"task": export.task, "run_dir": str(Path(run_dir).resolve())})
    run_id = run.info.run_id
    client.log_batch(run_id, metrics=_metrics(rounds, export), params=_params(config))
    client.log_artifacts(run_id, export.out_dir, "model")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("summary.json", "metrics.jsonl", "config.toml"):
            src = Path(run_dir) / name
            if src.is_file():
                (Path(tmp) / name).write_bytes(src.read_bytes())
        client.log_artifacts(run_id, tmp, "run")
    client.set_terminated(run_id)
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="fedshield federated model")
    privacy = summary.get("privacy") or {}
    tags = {f"{HASH_TAG}{n}": h for n, h in export.sha256.items()} | {
        "task": export.task, "test_accuracy": f"{export.accuracy:.6f}",
        "epsilon_max": str(privacy.get("epsilon_max") if privacy.get("enabled") else "none"),
        "card": "model/model_card.md"}
    version = client.create_model_version(model_name, source=f"{run.info.artifact_uri}/model",
                                          run_id=run_id, tags=tags,
                                          description=f"run {summary.get('name')} ({export.task})")
    return str(version.version)


@dataclass
class ResolvedModel:
    name: str
    version: str
    local_dir: Path
    sha256: dict[str, str]
    tags: dict[str, str]


def parse_ref(model_ref: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, alias, version)."""
    match = MODEL_REF.match(model_ref)
    if not match:
        raise ConfigError(f"model reference {model_ref!r} is not models:/NAME@ALIAS or models:/NAME/VERSION, "
                          f"e.g. models:/fedshield-digits@champion")
    return match["name"], match["alias"], match["version"]


def get_version(client: MlflowClient, name: str, alias: str | None = None, version: str | None = None):
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        what = f"alias @{alias}" if alias else f"version {version}"
        raise RegistryError(f"model {name!r} has no {what} in the registry ({exc.message.splitlines()[0]}); "
                            f"see `fedshield registry list`") from None


def expected_hashes(tags: dict[str, str]) -> dict[str, str]:
    return {k[len(HASH_TAG):]: v for k, v in tags.items() if k.startswith(HASH_TAG)}


def download(client: MlflowClient, mv, dst: str | Path | None = None) -> Path:
    dst = Path(dst or tempfile.mkdtemp(prefix="fedshield-model-"))
    return Path(client.download_artifacts(mv.run_id, "model", str(dst)))


def resolve(model_ref: str, tracking_uri: str, dst: str | Path | None = None) -> ResolvedModel:
    """Download a registered model and verify every artifact against the registry's sha256 tags."""
    client = client_for(tracking_uri)
    name, alias, version = parse_ref(model_ref)
    mv = get_version(client, name, alias, version)
    local = download(client, mv, dst)
    hashes = expected_hashes(mv.tags)
    verify(local, hashes)
    return ResolvedModel(name, str(mv.version), local, hashes, dict(mv.tags))


def list_versions(tracking_uri: str, model_name: str) -> list[dict]:
    client = client_for(tracking_uri)
    try:
        aliases = client.get_registered_model(model_name).aliases  # alias -> version
    except MlflowException:
        raise RegistryError(f"no model named {model_name!r} in {tracking_uri}; run a federation with "
                            f"deployment.handoff = true first, or pass --model-name") from None
    rows = []
    for mv in client.search_model_versions(f"name='{model_name}'"):
        rows.append({"version": str(mv.version),
                     "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)), "gate": mv.tags.get("gate", ""),
                     "test_accuracy": mv.tags.get("test_accuracy"), "epsilon_max": mv.tags.get("epsilon_max"),
                     "created": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(mv.creation_timestamp / 1000)),
                     "run_id": mv.run_id})
    return sorted(rows, key=lambda r: int(r["version"]))


def show(tracking_uri: str, model_name: str, version: str) -> dict:
    """A version's aliases, tags and export record (hashes, parity, sizes)."""
    client = client_for(tracking_uri)
    mv = get_version(client, model_name, version=version)
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(mv.run_id, f"model/{EXPORT_JSON}", tmp)
        export = read_json(path)
    return {"name": model_name, "version": str(mv.version), "aliases": list(mv.aliases), "tags": dict(mv.tags),
            "source": mv.source, "run_id": mv.run_id, "export": export}
