"""MLflow as the model registry: a local sqlite store (no server), artifacts beside the database.

A registered version's artifacts are ``model/`` (the export folder: weights, ONNX, export.json,
card, drift reference) and ``run/`` (summary.json, metrics.jsonl, config.toml). Its tags hold the
sha256 of every file of both (``sha256.<file>``, ``run_sha256.<file>``): serving and the gate
compare downloaded files against them, so an edited export.json or summary.json is refused. The
gate policy is stored with the version (tag ``gate.policy``, and the run's write-once param of the
same name) and applied by every later promotion.

MLflow records absolute artifact paths. A registry folder (database + ``registry-artifacts/``)
that was moved is still readable: artifacts are looked up relative to the database's folder when
the recorded path is gone; when they are missing in both places the error says so.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from fedshield.deployment.artifacts import (
    EXPORT_JSON,
    IntegrityError,
    NotDeployable,
    hash_folder,
    hash_mismatches,
    read_json,
    verify,
)
from fedshield.deployment.card import ModelCard, privacy_warning, read_run
from fedshield.deployment.export import ExportResult
from fedshield.deployment.mlflow_store import (  # the store's layout, shared with tracking
    ARTIFACT_DIR,
    artifact_root,
    experiment_id,
    normalise_uri,
)
from fedshield.deployment.policy import POLICY_TAG, GatePolicy
from fedshield.privacy.audit import AUDIT_JSON
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from fedshield.configio import flatten
from fedshield.errors import ConfigError, FedShieldError
from fedshield.run_records import (
    METRICS_FILE,
    SUMMARY_FILE,
    MetricsLine,
    PrivacySummary,
    RunSummary,
)

EXPERIMENT = "fedshield"
HASH_TAG = "sha256."
RUN_HASH_TAG = "run_sha256."
RUN_FILES = (SUMMARY_FILE, METRICS_FILE, "config.toml", AUDIT_JSON)  # audit.json: if audited
MODEL_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


class RegistryError(FedShieldError):
    """The registry has no such model, version or alias."""


def client_for(tracking_uri: str, create: bool = True) -> MlflowClient:
    """A client on the registry; ``create=False`` refuses a sqlite database that does not exist
    (MLflow would silently create an empty one, and every lookup would then say "no model")."""
    uri = normalise_uri(tracking_uri)
    db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if db is not None and db.is_file() and db.stat().st_size and not _is_sqlite(db):
        raise RegistryError(f"{db} is not a registry database (not SQLite); pass --registry-uri "
                            f"sqlite:///PATH/registry.db of a fedshield registry")
    if not create and db is not None and not db.is_file():
        raise RegistryError(f"no registry database at {uri[len('sqlite:///'):]}; pass "
                            f"--registry-uri sqlite:///PATH/registry.db of an existing registry (a "
                            f"moved registry keeps working when its database and {ARTIFACT_DIR}/ "
                            f"move together)")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(16) == b"SQLite format 3\x00"


def _local_path(uri: str) -> Path | None:
    """The filesystem path of a ``file:`` or plain-path artifact URI (None for remote stores)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


def run_artifact_dir(client: MlflowClient, run_id: str, tracking_uri: str) -> Path | None:
    """The run's local artifact folder, found relative to the registry when it was moved.

    None for remote artifact stores (download through MLflow then). Raises RegistryError when the
    artifacts are neither where MLflow recorded them nor at the same place under the registry.
    """
    try:
        recorded_uri = client.get_run(run_id).info.artifact_uri
    except MlflowException as exc:
        raise RegistryError(f"run {run_id} of this version is not in the registry "
                            f"({exc.message.splitlines()[0]})") from None
    recorded = _local_path(recorded_uri)
    if recorded is None:
        return None
    if recorded.is_dir():
        return recorded
    root = artifact_root(normalise_uri(tracking_uri))
    parts = recorded.parts
    moved = None
    if root and ARTIFACT_DIR in parts:
        rel = parts[len(parts) - parts[::-1].index(ARTIFACT_DIR):]
        moved = Path(root).joinpath(*rel)
        if moved.is_dir():
            return moved
    elsewhere = f" nor at {moved} (relative to the registry)" if moved else ""
    raise RegistryError(f"the artifacts of run {run_id} are missing: not at {recorded} (where they "
                        f"were registered){elsewhere}; move the registry database and its "
                        f"{ARTIFACT_DIR}/ folder together, or register the run again")


def _experiment_id(client: MlflowClient, tracking_uri: str) -> str:
    return experiment_id(client, EXPERIMENT, tracking_uri)


def _params(config: dict) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in sorted(flatten(config).items())]


def _metrics(rounds: list[MetricsLine], export: ExportResult) -> list[Metric]:
    now = int(time.time() * 1000)
    out = []
    for r in rounds:
        for key, value in (("accuracy", r.accuracy), ("loss", r.loss),
                           ("epsilon_max", r.epsilon_max), ("epsilon_mean", r.epsilon_mean),
                           ("seconds", r.seconds)):
            if value is not None:
                out.append(Metric(f"round_{key}", value, now, r.round))
    out += [Metric("test_onnx_accuracy", export.parity["onnx_accuracy"], now, 0),
            Metric("onnx_parity_max_abs_diff", export.parity["max_abs_diff"], now, 0)]
    if export.int8:
        out.append(Metric("test_int8_accuracy", export.int8["accuracy"], now, 0))
    return out


def refuse_failed_run(summary: RunSummary, where: str | Path) -> None:
    """A failed run is never registered, promoted or handed off (summary ``status``)."""
    if summary.failed:
        why = summary.stopped_early or summary.failure or f"see its {SUMMARY_FILE}"
        raise NotDeployable(f"run {summary.name or where} failed ({why}); a failed run is "
                            f"never registered or promoted: fix the cause and run the federation "
                            f"again")


def epsilon_tag(privacy: PrivacySummary) -> str:
    """The registry's epsilon column; LOUD when the epsilon does not hold against the server."""
    eps = str(privacy.epsilon_max if privacy.enabled else "none")
    return f"{eps} (NOT VALID against the server: reproducible noise)" \
        if privacy.reproducible_noise else eps


def register(run_dir: str | Path, export: ExportResult, card: ModelCard, tracking_uri: str,
             model_name: str, policy: GatePolicy | None = None) -> str:
    """Log the run (params, metrics, card, artifacts) and register a new version; returns it.

    Every file of ``model/`` and ``run/`` is hashed into the version's tags; ``policy`` (the gate
    policy later promotions apply) is stored with it. A failed run, or an export folder whose
    model files differ from its export record, is refused.
    """
    summary, config, rounds = read_run(run_dir)
    refuse_failed_run(summary, run_dir)
    if problems := hash_mismatches(export.out_dir, export.sha256):
        raise IntegrityError("refusing to register a changed export: " + "; ".join(problems))
    client = client_for(tracking_uri)
    run = client.create_run(_experiment_id(client, tracking_uri), run_name=summary.name,
                            tags={"task": export.task, "run_dir": str(Path(run_dir).resolve())})
    run_id = run.info.run_id
    params = _params(config)
    if policy is not None:  # params are write-once in MLflow: a later edit of the tag shows
        params.append(Param(POLICY_TAG, policy.to_json()))
    client.log_batch(run_id, metrics=_metrics(rounds, export), params=params)
    model_hashes = hash_folder(export.out_dir)
    client.log_artifacts(run_id, export.out_dir, "model")
    with tempfile.TemporaryDirectory() as tmp:
        for name in RUN_FILES:
            src = Path(run_dir) / name
            if src.is_file():
                (Path(tmp) / name).write_bytes(src.read_bytes())
        run_hashes = hash_folder(tmp)  # the bytes logged, not a later state of the run folder
        client.log_artifacts(run_id, tmp, "run")
    client.set_terminated(run_id)
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="fedshield federated model")
    privacy = summary.privacy
    tags = {f"{HASH_TAG}{n}": h for n, h in model_hashes.items()} | {
        f"{RUN_HASH_TAG}{n}": h for n, h in run_hashes.items()} | {
        "task": export.task, "test_accuracy": f"{export.accuracy:.6f}",
        "epsilon_max": epsilon_tag(privacy), "card": "model/model_card.md"}
    if warning := privacy_warning(privacy):
        tags["privacy.warning"] = warning
    if policy is not None:
        tags[POLICY_TAG] = policy.to_json()
    version = client.create_model_version(model_name, source=f"{run.info.artifact_uri}/model",
                                          run_id=run_id, tags=tags,
                                          description=f"run {summary.name} ({export.task})")
    return str(version.version)


@dataclass
class ResolvedModel:
    """A registered version downloaded locally, with its recorded hashes and tags."""
    name: str
    version: str
    local_dir: Path
    sha256: dict[str, str]
    tags: dict[str, str]


def parse_ref(model_ref: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, alias, version)."""
    match = MODEL_REF.match(model_ref)
    if not match:
        raise ConfigError(f"model reference {model_ref!r} is not models:/NAME@ALIAS or "
                          "models:/NAME/VERSION, e.g. models:/fedshield-digits@champion")
    return match["name"], match["alias"], match["version"]


def get_version(client: MlflowClient, name: str, alias: str | None = None,
                version: str | None = None):
    """The model version at ``alias`` or ``version`` (RegistryError if there is none)."""
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        what = f"alias @{alias}" if alias else f"version {version}"
        raise RegistryError(f"model {name!r} has no {what} in the registry "
                            f"({exc.message.splitlines()[0]}); see `fedshield registry "
                            "list`") from None


def expected_hashes(tags: dict[str, str]) -> dict[str, str]:
    """``model/`` file -> sha256 recorded at registration."""
    return {k[len(HASH_TAG):]: v for k, v in tags.items() if k.startswith(HASH_TAG)}


def expected_run_hashes(tags: dict[str, str]) -> dict[str, str]:
    """``run/`` file (summary.json, ...) -> sha256 recorded at registration."""
    return {k[len(RUN_HASH_TAG):]: v for k, v in tags.items() if k.startswith(RUN_HASH_TAG)}


def download(client: MlflowClient, mv, dst: str | Path | None = None,
             tracking_uri: str | None = None, folder: str = "model") -> Path:
    """Copy a version's ``model/`` (or ``run/``) artifacts to ``dst``; works on a moved registry."""
    dst = Path(dst or tempfile.mkdtemp(prefix="fedshield-model-"))
    local = run_artifact_dir(client, mv.run_id, tracking_uri) if tracking_uri else None
    if local is not None:
        if not (local / folder).is_dir():
            raise RegistryError(f"version {mv.version} has no {folder}/ artifacts in {local}; "
                                f"register the run again")
        return Path(shutil.copytree(local / folder, dst / folder, dirs_exist_ok=True))
    try:
        return Path(client.download_artifacts(mv.run_id, folder, str(dst)))
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"cannot download {folder}/ of version {mv.version}: {exc}; check that "
                            f"the registry's artifact store is reachable") from None


def resolve(model_ref: str, tracking_uri: str, dst: str | Path | None = None) -> ResolvedModel:
    """Download a registered model and verify every artifact against the registry's sha256 tags."""
    client = client_for(tracking_uri, create=False)
    name, alias, version = parse_ref(model_ref)
    mv = get_version(client, name, alias, version)
    local = download(client, mv, dst, tracking_uri)
    hashes = expected_hashes(mv.tags)
    verify(local, hashes)
    return ResolvedModel(name, str(mv.version), local, hashes, dict(mv.tags))


def list_versions(tracking_uri: str, model_name: str) -> list[dict]:
    """Every version of ``model_name``, one row each: aliases, gate, accuracy, epsilon, warning."""
    client = client_for(tracking_uri, create=False)
    try:
        aliases = client.get_registered_model(model_name).aliases  # alias -> version
    except MlflowException:
        raise RegistryError(f"no model named {model_name!r} in {tracking_uri}; run a federation "
                            "with deployment.handoff = true first, or pass --model-name") from None
    rows = []
    for mv in client.search_model_versions(f"name='{model_name}'"):
        rows.append({"version": str(mv.version),
                     "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
                     "gate": mv.tags.get("gate", ""),
                     "test_accuracy": mv.tags.get("test_accuracy"),
                     "epsilon_max": mv.tags.get("epsilon_max"),
                     "warning": mv.tags.get("privacy.warning", ""),
                     "created": time.strftime("%Y-%m-%d %H:%M:%S",
                                              time.gmtime(mv.creation_timestamp / 1000)),
                     "run_id": mv.run_id})
    return sorted(rows, key=lambda r: int(r["version"]))


def show(tracking_uri: str, model_name: str, version: str) -> dict:
    """A version's aliases, tags and export record (hashes, parity, sizes)."""
    client = client_for(tracking_uri, create=False)
    mv = get_version(client, model_name, version=version)
    with tempfile.TemporaryDirectory() as tmp:
        export = read_json(download(client, mv, tmp, tracking_uri) / EXPORT_JSON)
    return {"name": model_name, "version": str(mv.version), "aliases": list(mv.aliases),
            "tags": dict(mv.tags),
            "source": mv.source, "run_id": mv.run_id, "export": export}
