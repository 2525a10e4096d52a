"""The hand-off after the last round: export -> card -> register -> gate.

It runs as the ServerApp's post-run hook (server/hooks.py), which deployment/hooks.py registers
when the ``[deploy]`` extra is installed; the ServerApp never imports this module.

A run whose summary says ``status = "failed"`` is refused before anything is exported."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from fedshield.deployment.artifacts import CARD_MD, REFERENCE_JSON, load_weights
from fedshield.deployment.card import build_card
from fedshield.deployment.export import export_model
from fedshield.deployment.gate import promote
from fedshield.deployment.policy import GatePolicy
from fedshield.deployment.reference_stats import (
    Reference,
    distance_from,
    histograms,
    merge_histograms,
    monitored_features,
    names_for,
    normalise,
    reference_from_data,
    with_client_class_priors,
)
from fedshield.deployment.registry import refuse_failed_run, register
from fedshield.privacy.reference import CLIENT_REFERENCE_JSON, TRUTH_JSON, ClientReference
from fedshield.tasks import task_for

from fedshield.errors import FedShieldError
from fedshield.run_records import DataQuality, read_summary
from fedshield.schema import Config

EXPORT_DIR = "export"


@dataclass
class HandoffResult:
    """What the hand-off of a finished run registered: version, gate verdict, card and export."""
    model_name: str
    version: str
    passed: bool
    reasons: list[str]
    card_path: str
    export_dir: str
    model_uri: str          # models:/NAME/VERSION
    checks: list[dict]

    def to_dict(self) -> dict:
        """The result as a JSON-ready dict."""
        return asdict(self)


def model_name_for(cfg: Config) -> str:
    """The registered model name: deployment.model_name, else ``fedshield-<task>``."""
    return cfg.deployment.model_name or f"fedshield-{cfg.task.name.replace(':', '-')}"


def client_reference(run_dir: Path) -> ClientReference | None:
    """The clients' counts the ServerApp collected (server/reference.py), None when there are
    none or the file is unreadable (the hand-off then falls back to the server's split)."""
    path = run_dir / CLIENT_REFERENCE_JSON
    try:
        return ClientReference.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _truth(run_dir: Path, shape: tuple[int, ...], num_classes: int):
    """A simulation's exact pooled counts (reference_truth.json), None on a real federation."""
    try:
        doc = json.loads((run_dir / TRUTH_JSON).read_text())
        features = np.asarray(doc["feature_counts"], dtype=np.float64)
        classes = np.asarray(doc["label_counts"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if features.shape != shape or classes.shape != (num_classes,):
        return None
    return features, classes


def drift_reference(run_dir: Path, cfg: Config, out_dir: Path,
                    data_quality: DataQuality | Mapping | None = None) -> Reference:
    """The run's drift reference, written to ``out_dir``.

    ``deployment.reference_source = "clients"`` and counts reached the server: the clients'
    releases merged (noised under DP: source "clients (DP)"); in a simulation with its distance
    from the true pooled histograms, and the server split's for comparison. Otherwise the
    server's evaluation split, with the class priors of the clients' released class histograms
    (``data_quality``) when known."""
    task = task_for(cfg.task)
    test = task.load()[1]
    names = names_for(task.input_shape, task.feature_names)
    collected = client_reference(run_dir) if cfg.deployment.reference_source == "clients" \
        else None
    if collected is not None and collected.parts:
        reference = merge_histograms(list(collected.parts.values()), collected.edges,
                                     collected.feature_names, task.input_shape)
        missing = {**collected.refused, **collected.rejected}
        if missing:
            reference.details += (f"; no counts from {len(missing)} client(s): "
                                  + "; ".join(f"{k}: {v}"[:160] for k, v in missing.items()))
        truth = _truth(run_dir, reference.probs.shape, task.num_classes)
        if truth is not None:
            server = histograms(monitored_features(test.x, task.input_shape), reference.edges)
            server_split = Reference(reference.edges, normalise(server),
                                     normalise(np.bincount(test.y, minlength=task.num_classes)
                                               .astype(np.float64)), names, task.input_shape,
                                     "server evaluation split")
            reference.distance = {"truth": "pooled training data of every simulated client",
                                  **distance_from(reference, *truth),
                                  "server_split": distance_from(server_split, *truth)}
    else:
        reference = reference_from_data(test.x, test.y, task.input_shape, task.num_classes,
                                        names, cfg.deployment.reference_bins,
                                        "server evaluation split (no client data, no noise)")
        if cfg.deployment.reference_source == "clients":
            reference.details = ("no client counts reached the server (" + (
                f"{len(collected.refused) + len(collected.rejected)} refused or rejected, see "
                f"{CLIENT_REFERENCE_JSON}" if collected is not None else
                f"{CLIENT_REFERENCE_JSON} missing") + ")")
        reference = with_client_class_priors(reference, data_quality)
    reference.save(out_dir / REFERENCE_JSON)
    return reference


def reference_view(reference: Reference) -> dict:
    """What the model card says about the drift reference: source, how built, distance."""
    return {"source": reference.source, "details": reference.details,
            "noise_std": reference.noise_std,
            "distance": reference.distance if reference.distance is not None else "unknown"}


def handoff(run_dir: str | Path, cfg: Config) -> HandoffResult:
    """Export, document, register and gate the run's model; also writes ``run_dir/handoff.json``."""
    run = Path(run_dir)
    weights = run / ("best.safetensors" if cfg.deployment.weights == "best"
                     else "model.safetensors")
    if not weights.is_file():
        raise FedShieldError(f"{weights} does not exist; the run folder must hold the global "
                             f"weights (deployment.weights = {cfg.deployment.weights!r})")
    summary = read_summary(run)
    refuse_failed_run(summary, run)  # before anything is exported or registered
    task = task_for(cfg.task)
    out = run / EXPORT_DIR
    if out.exists():
        shutil.rmtree(out)
    privacy = summary.privacy
    metadata = {"run": summary.name or run.name, "weights": cfg.deployment.weights,
                "rounds": summary.rounds, "dp": privacy.enabled,
                "epsilon_max": privacy.epsilon_max}
    test = task.load()[1]
    if cfg.task.eval_examples:
        test = test.subset(np.arange(min(cfg.task.eval_examples, len(test))))
    export = export_model(task, load_weights(weights), out, metadata,
                          quantize=cfg.deployment.quantize, test=test)
    reference = drift_reference(run, cfg, out, summary.data_quality)
    card = build_card(run, export, cfg.deployment.explain_examples, reference.source,
                      reference_view(reference))
    name = model_name_for(cfg)
    # The policy is stored with the version; this and every later promotion applies it.
    version = register(run, export, card, cfg.deployment.registry_uri, name,
                       policy=GatePolicy.from_deployment(cfg.deployment))
    decision = promote(cfg.deployment.registry_uri, name, version)
    result = HandoffResult(name, version, decision.passed, decision.reasons, str(out / CARD_MD),
                           str(out),
                           f"models:/{name}/{version}", decision.checks)
    (run / "handoff.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result
