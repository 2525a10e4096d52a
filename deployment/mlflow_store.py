"""Where fedshield's MLflow data lives: one local sqlite store (no server) with the artifacts
beside the database, shared by the registry (deployment/registry.py) and run tracking
(deployment/tracking.py), so one ``mlflow ui --backend-store-uri sqlite:///...`` shows both.

Only the standard library here: tracking must work with MLflow alone, without the rest of the
``[deploy]`` extra (ONNX, onnxruntime, Captum) that the registry's imports need.
"""

from __future__ import annotations

from pathlib import Path

ARTIFACT_DIR = "registry-artifacts"


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
        return str(Path(tracking_uri[len("sqlite:///"):]).parent / ARTIFACT_DIR)
    return None


def experiment_id(client, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name`` on ``client``'s store, created (artifacts beside a sqlite
    database) when it does not exist yet."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(
        normalise_uri(tracking_uri)))
